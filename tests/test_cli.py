"""The command line on the tiny model: streaming, --show-probs, chat, stats."""

from __future__ import annotations

import io

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
    code, out, err = run(["generate", "The quick brown fox", "--model", model, "--dtype", "float32",
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
