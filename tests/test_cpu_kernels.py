"""seriatim's compiled AVX-512 expansion kernel (csrc/expand.cpp) and its fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from seriatim import cpu_kernels
from seriatim.quant import DENSE_FROM_ROWS, INT4_DENSE_FROM_ROWS_UNEXPANDED, Int4Linear


def int4_module(rows: int, cols: int, seed: int = 0) -> Int4Linear:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=gen)
    scale, minimum = torch.rand(rows, cols // 32, generator=gen) / 10, -torch.rand(rows, cols // 32, generator=gen)
    return Int4Linear.from_int4(q, scale, minimum, torch.bfloat16)


@pytest.mark.skipif(not cpu_kernels._cpu_supports(), reason="needs AVX-512 with BF16")
@pytest.mark.parametrize("shape", [(64, 32), (192, 96), (960, 576), (576, 1536)])
def test_kernel_expands_exactly_like_the_tensor_ops(shape):
    assert cpu_kernels.ops() is not None, "the kernel must build where the CPU supports it"
    module = int4_module(*shape)
    got = module.dequantize_t()
    assert got.shape == (shape[1], shape[0]) and got.dtype == torch.bfloat16
    assert torch.equal(got, module.dequantize().T)
    assert module.dense_from_rows() == DENSE_FROM_ROWS


def test_without_the_kernel_the_tensor_ops_expand_from_more_rows(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ops", lambda: None)
    module = int4_module(128, 64)
    assert module.dense_from_rows() == INT4_DENSE_FROM_ROWS_UNEXPANDED
    assert torch.equal(module.dequantize_t(), module.dequantize().T)
    x = torch.randn(INT4_DENSE_FROM_ROWS_UNEXPANDED, 64).bfloat16()
    assert torch.equal(module(x), x @ module.dequantize().T)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    def broken(folder):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_cpu_supports", lambda: True)
    monkeypatch.setattr(cpu_kernels, "_build_dir", lambda: tmp_path)
    monkeypatch.setattr(cpu_kernels, "_build", broken)
    cpu_kernels.ops.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="seriatim.cpu_kernels"):
            assert cpu_kernels.ops() is None and cpu_kernels.ops() is None
        assert [r.getMessage() for r in caplog.records] == [
            "seriatim's expansion kernel is unavailable (no compiler here); expanding int4 weights with tensor ops (slower prefill)"]
    finally:
        cpu_kernels.ops.cache_clear()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SERIATIM_KERNELS", "0")
    cpu_kernels.ops.cache_clear()
    try:
        assert cpu_kernels.ops() is None
    finally:
        cpu_kernels.ops.cache_clear()
