"""The fast mode's compact weights: block conversions, fused projections of mixed types, whole tiny models.

Stated tolerances (relative: max |error| / max |float32 value|):
- Q4_0/Q4_1/Q4_K -> int4 are exact re-expressions (1e-6, float32 arithmetic);
- 5/6/8-bit types -> int8 per row: each weight within half a step of its row scale (absmax / 254);
- one compact matmul with bfloat16 activations: within 2% of the float32 product
  (measured 0.3-0.9%: int8 rows cost about twice bfloat16's own rounding);
- whole tiny models in the fast mode: logits within 15% and the same argmax at >= 85% of positions
  (measured: Gemma 3 at most 1.5%; the random tiny Qwen2, which has no QK norm, amplifies rounding:
  dense bfloat16 alone gives 2.7%, its int8 forms 8-9%).
"""

from __future__ import annotations

import gguf
import pytest
import torch

from seriatim import LLM
from seriatim.kernels import library
from seriatim.model.quant import (
    INT4_CROSSOVERS,
    INT8_CROSSOVERS,
    BlockWeight,
    Int4Linear,
    Int8Linear,
    compact_linear,
    int4_from_blocks,
    int8_from_blocks,
)
from support.kquants import quantize_k
from support.parity import CHUNKS, random_ids, run_chunks
from support.tiny_models import K_QUANT_TYPES

QT = gguf.GGMLQuantizationType
ROWS, COLS = 48, 512
INT8_FORM = ["Q8_0", "Q6_K", "Q5_K", "Q5_0"]


def blocks(qtype: str, seed: int = 0, rows: int = ROWS) -> tuple[BlockWeight, torch.Tensor]:
    """Random weights stored as `qtype`; returns the blocks and the original float32 matrix."""
    w = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(seed)) * 0.05
    qt = QT[qtype]
    data = quantize_k(w.numpy(), qt) if qtype.endswith("_K") else gguf.quants.quantize(w.numpy(), qt)
    return BlockWeight(qt, data, COLS), w


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def worst_row_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest `rel` over rows (positions)."""
    return ((a - b).abs().amax(-1) / b.abs().amax(-1)).max().item()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_test_encoder_writes_valid_k_quants(qtype):
    """The tests' own K-quant encoder: gguf-py decodes its blocks to close to the input."""
    bw, w = blocks(qtype)
    bound = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}[qtype]  # about a step of 4, 5 and 6 bits
    assert rel(bw.dequantize(), w) < bound


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_forms_are_exact(qtype):
    bw, _ = blocks(qtype)
    q, scale, minimum = int4_from_blocks(bw)
    assert q.min() >= 0 and q.max() <= 15
    rebuilt = (q.float().view(ROWS, -1, 32) * scale[..., None] + minimum[..., None]).view(ROWS, COLS)
    assert rel(rebuilt, bw.dequantize()) < 1e-6


@pytest.mark.parametrize("qtype", INT8_FORM)
def test_int8_rows_within_half_a_step(qtype):
    bw, _ = blocks(qtype)
    q, scale = int8_from_blocks(bw)
    error = (q.float() * scale[:, None] - bw.dequantize()).abs().amax(dim=1)
    assert torch.all(error <= scale / 2 * (1 + 1e-5))


def test_int8_rows_are_converted_in_chunks(monkeypatch):
    import seriatim.model.quant

    monkeypatch.setattr(seriatim.model.quant, "ROW_CHUNK", 7)  # uneven chunks give the same matrix
    bw, _ = blocks("Q5_0")
    chunked = int8_from_blocks(bw)
    monkeypatch.setattr(seriatim.model.quant, "ROW_CHUNK", 4096)
    whole = int8_from_blocks(bw)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


@pytest.mark.parametrize("types, kind", [
    (["Q4_K"], Int4Linear),
    (["Q4_0", "Q4_K", "Q4_1"], Int4Linear),  # different int4 types still fuse as int4
    (["Q5_0"], Int8Linear),
    (["Q6_K"], Int8Linear),
    (["Q4_K", "Q4_K", "Q6_K"], Int8Linear),  # a K-quant file's QKV: int4 parts join the int8 one
    (["Q4_K", "Q5_K"], Int8Linear),
])
def test_compact_matmul_close_to_float32(types, kind):
    parts = [blocks(t, seed)[0] for seed, t in enumerate(types)]
    module = compact_linear(parts, torch.bfloat16)
    assert isinstance(module, kind)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(9))
    expected = x @ torch.cat([p.dequantize() for p in parts]).T
    assert rel(module(x.bfloat16()).float(), expected) < 0.02


def test_float_part_makes_a_dense_projection():
    module = compact_linear([blocks("Q4_K")[0], torch.randn(8, COLS)], torch.bfloat16)
    assert isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("family, source", [
    *(("gemma3", t) for t in ["Q8_0", *K_QUANT_TYPES, "mixed"]), ("qwen2", "Q5_0"), ("qwen2", "mixed"),
])
def test_fast_mode_logits_close_to_float32(family, source, request):
    from seriatim.weights.loader import Precision, build_model, load

    root = request.getfixturevalue(f"tiny_{family}")
    reference = LLM(str(root / f"{source}.gguf"), dtype="float32")
    fast = LLM(str(root / f"{source}.gguf"), dtype="float32")  # then swap in the compact model:
    compact = Precision(torch.bfloat16, compact=True)  # what dtype="auto" picks on a CPU with bfloat16
    fast.model = build_model(load(root / f"{source}.gguf", compact, None)[0], compact, fast.device)
    linears = {type(m) for m in fast.model.modules() if isinstance(m, (Int4Linear, Int8Linear, torch.nn.Linear))}
    assert torch.nn.Linear not in linears  # every projection stayed compact
    ids = random_ids(reference)
    expected, got = run_chunks(reference, ids, CHUNKS), run_chunks(fast, ids, CHUNKS, torch.bfloat16)
    assert worst_row_rel(got, expected) < 0.15
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.85


def test_int4_dequantize_reads_the_packed_layout():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (192, 96), dtype=torch.int32, generator=gen)
    scale, minimum = torch.rand(192, 3, generator=gen) / 10, -torch.rand(192, 3, generator=gen)
    expected = q.float() * scale.repeat_interleave(32, 1) + minimum.repeat_interleave(32, 1)
    got = Int4Linear.from_int4(q, scale, minimum, torch.float32).dequantize()
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("types", [["Q4_1"], ["Q6_K"]])
def test_many_rows_take_the_dense_path_and_agree_with_the_kernel(types):
    """Without batch invariance, long chunks expand the weight for one dense matmul where the CPU multiplies
    bfloat16: other sums than a few rows at a time, close to them (at the avx2 tier, no dense product: the
    same bits). With it (the default), every row count gives a row the same bits."""
    parts = [blocks(t, seed, rows=64)[0] for seed, t in enumerate(types * 2)]  # int4 packs 64 rows a block
    module = compact_linear(parts, torch.bfloat16)
    int4 = isinstance(module, Int4Linear)
    longest = max(max(c.dense_amx, c.dense, c.dense_unaided) for c in (INT4_CROSSOVERS, INT8_CROSSOVERS))
    x = torch.randn(longest + 8, COLS, generator=torch.Generator().manual_seed(4)).bfloat16()
    by_rows = torch.cat([module(x[i : i + 4]) for i in range(0, len(x), 4)])  # a few rows at a time
    dense = x @ (module.dequantize_t() if int4 else module.dequantize().T)  # expanded weight, one matmul
    assert torch.equal(module(x), by_rows) == (library.ops() is not None)
    module.batch_invariant = False
    got = module(x)
    if library.ops() is not None and not library.bf16_matmul():
        assert torch.equal(got, by_rows)
        return
    assert torch.equal(got, dense) and not torch.equal(by_rows, dense)
    assert rel(got.float(), by_rows.float()) < 0.01
