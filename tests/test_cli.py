"""The command line on the tiny model: streaming, --show-probs, chat, stats."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest

from seriatim.cli import main


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_text_and_prints_stats(tiny_llama, tiny_llm, capsys):
    from seriatim import SamplingParams

    model = str(tiny_llama[0] / "hf")
    code, out, err = run(["generate", "The quick brown fox", "--raw", "--model", model, "--dtype", "float32",
                          "--temperature", "0", "--max-tokens", "12"], capsys)
    assert code == 0
    expected = tiny_llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12))[0].text
    assert out == expected + "\n"
    assert "prompt tokens" in err and "time to first token" in err and "prefill" in err


def test_show_probs_lists_alternatives(tiny_llama, capsys):
    code, out, _ = run(["generate", "hello", "--model", str(tiny_llama[0] / "hf"), "--temperature", "0",
                        "--max-tokens", "3", "--show-probs"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3
    assert all(" p=" in line and "|" in line for line in lines)


def test_chat_keeps_history_until_empty_line(tiny_llama, capsys, monkeypatch):
    code, out, err = run(["chat", "--model", str(tiny_llama[0] / "hf"), "--temperature", "0", "--max-tokens", "4"],
                         capsys, stdin="hi\nagain\n\n", monkeypatch=monkeypatch)
    assert code == 0
    assert err.count("prompt tokens") == 2  # one reply per message, stats after each


def test_a_failed_chat_turn_leaves_the_session_going(tiny_llama, capsys, monkeypatch):
    too_long = "word " * 400  # over the tiny model's context
    code, out, err = run(["chat", "--model", str(tiny_llama[0] / "hf"), "--temperature", "0", "--max-tokens", "4"],
                         capsys, stdin=f"{too_long}\nhi\n\n", monkeypatch=monkeypatch)
    assert code == 0 and "seriatim: error:" in err and "context" in err
    assert err.count("prompt tokens") == 1  # the next turn was answered


def test_models_lists_the_registry(capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "smollm2-135m" in out


def test_bench_rejects_unknown_engine(capsys):
    code, _, err = run(["bench", "--engines", "seriatim,nope"], capsys)
    assert code == 2 and "nope" in err


def test_the_command_line_starts_without_pytorch():
    """Only the commands that need PyTorch import it, inside main's error handling: Ctrl-C while it loads
    ends with exit code 130, not a traceback, and `--help` or `models` start at once."""
    import subprocess
    import sys

    code = "import sys, seriatim.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def without_template(tiny_llama, tmp_path):
    """The tiny Llama's HF directory without its chat template: a base model."""
    target = tmp_path / "base"
    shutil.copytree(tiny_llama[0] / "hf", target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return str(target)


def test_generate_renders_the_chat_template_by_default(tiny_llama, tiny_llm, capsys):
    from seriatim import SamplingParams

    argv = ["generate", "hi there", "--model", str(tiny_llama[0] / "hf"), "--dtype", "float32", "--temperature", "0",
            "--max-tokens", "6"]
    params = SamplingParams(temperature=0, max_tokens=6)
    chat = tiny_llm.generate(tiny_llm.chat_prompt([{"role": "user", "content": "hi there"}]), params)[0].text
    raw = tiny_llm.generate("hi there", params)[0].text
    assert chat != raw
    for flags, expected in (([], chat), (["--chat"], chat), (["--raw"], raw)):
        code, out, _ = run(argv + flags, capsys)
        assert (code, out) == (0, expected + "\n")


def test_a_base_model_continues_raw_text(tiny_llama, tmp_path, capsys):
    code, out, _ = run(["generate", "hi there", "--model", without_template(tiny_llama, tmp_path), "--dtype",
                        "float32", "--temperature", "0", "--max-tokens", "3"], capsys)
    assert code == 0 and out


@pytest.mark.parametrize("argv", [["generate", "hi", "--chat"], ["chat"]])
def test_chat_on_a_model_without_template_fails_before_loading(tiny_llama, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.setattr("seriatim.llm.LLM.__init__", lambda *a, **k: pytest.fail("loaded the weights"))
    code, _, err = run([*argv, "--model", without_template(tiny_llama, tmp_path)], capsys)
    assert code == 2 and "has no chat template" in err and len(err.strip().splitlines()) == 1


def test_version_names_the_cpu_and_the_isa_tier(capsys, monkeypatch):
    from seriatim.kernels import isa

    monkeypatch.setenv("SERIATIM_ISA", "none")
    isa.tier.cache_clear()
    try:
        with pytest.raises(SystemExit) as done:
            main(["--version"])
        assert done.value.code == 0
        assert "ISA tier none" in capsys.readouterr().out
        monkeypatch.setenv("SERIATIM_ISA", "sse2")
        isa.tier.cache_clear()
        with pytest.raises(SystemExit) as done:
            main(["--version"])
        assert done.value.code == 2 and "SERIATIM_ISA='sse2' is no ISA tier" in capsys.readouterr().err
    finally:
        isa.tier.cache_clear()


def test_generate_holds_the_reply_to_a_constraint(tiny_llama, tmp_path, capsys):
    model = ["--raw", "--model", str(tiny_llama[0] / "hf"), "--dtype", "float32", "--max-tokens", "200"]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}}, "required": ["n"]}))
    code, out, _ = run(["generate", "x", *model, "--json-schema", str(schema), "--seed", "1"], capsys)
    assert code == 0 and json.loads(out)["n"] in range(10)
    code, out, _ = run(["generate", "x", *model, "--regex", "[ab]{3}", "--seed", "2"], capsys)
    assert code == 0 and re.fullmatch("[ab]{3}\n", out)
    code, out, _ = run(["generate", "x", *model, "--choice", "left", "--choice", "right"], capsys)
    assert code == 0 and out in ("left\n", "right\n")
    code, _, err = run(["generate", "x", *model, "--grammar", str(tmp_path / "missing.lark")], capsys)
    assert code != 0 and "--grammar: cannot read" in err


def test_generate_speculates_with_the_same_greedy_output(tiny_llama, capsys):
    model = ["--raw", "--model", str(tiny_llama[0] / "hf"), "--dtype", "float32", "--temperature", "0",
             "--max-tokens", "20"]
    plain = run(["generate", "one two one two", *model], capsys)
    spec = run(["generate", "one two one two", *model, "--speculative", '{"method": "ngram", "k": 3}'], capsys)
    assert plain[0] == spec[0] == 0 and plain[1] == spec[1]
    with pytest.raises(SystemExit):
        run(["generate", "x", *model, "--speculative", "{oops"], capsys)


def test_kv_cache_memory_bounds_the_pool(tiny_llama, capsys, monkeypatch):
    """--kv-cache-memory takes bytes or K/M/G and reaches the engine; a bad size is refused by the parser."""
    import seriatim.llm

    sizes = []
    real = seriatim.llm.EngineConfig.resolve

    def resolve(*a, **kw):
        sizes.append(kw["kv_cache_memory"])
        return real(*a, **kw)

    monkeypatch.setattr(seriatim.llm.EngineConfig, "resolve", resolve)
    model = ["--raw", "--model", str(tiny_llama[0] / "hf"), "--dtype", "float32", "--max-tokens", "4"]
    assert run(["generate", "x", *model, "--kv-cache-memory", "1.5M"], capsys)[0] == 0
    assert sizes == [3 << 19]
    for bad in ("0", "12Q", "-1G"):
        with pytest.raises(SystemExit):
            run(["generate", "x", *model, "--kv-cache-memory", bad], capsys)
