"""Tiny model files for the loader's tests of malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_HF = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1)


@pytest.fixture(scope="session")
def gguf_seeds(tmp_path_factory) -> dict[str, Path]:
    """The fuzzer's seed corpus (tiny_models.write_fuzz_seeds), by file name: "llama-F32.gguf", ..."""
    from support.tiny_models import write_fuzz_seeds

    return {path.name: path for path in write_fuzz_seeds(tmp_path_factory.mktemp("gguf_seeds"))}


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A valid HF directory of a one-layer Llama, hidden size 8 (the tests copy it before changing it)."""
    from support.tiny_models import make_hf_model

    path = tmp_path_factory.mktemp("tiny_hf") / "hf"
    make_hf_model(path, "llama", **TINY_HF)
    return path
