"""seriatim's compiled CPU kernels (csrc/): expansion, fused ops, AMX products, and their fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from seriatim.hardware import cpu_model
from seriatim.kernels import isa, library
from seriatim.model import quant
from seriatim.model import transformer as model
from seriatim.model.quant import (
    GROUP,
    INT4_CROSSOVERS,
    INT8_CROSSOVERS,
    Int4Linear,
    Int8Linear,
    Product,
    int8_rows,
    product_path,
)
from seriatim.weights.loader import Precision

needs_kernels = pytest.mark.skipif(library.ops() is None, reason="needs seriatim's kernels (ISA tier avx2 or above)")
needs_amx = pytest.mark.skipif(not library.amx(), reason="needs AMX-BF16")


def int4_module(rows: int, cols: int, seed: int = 0) -> Int4Linear:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=gen)
    scale, minimum = torch.rand(rows, cols // 32, generator=gen) / 10, -torch.rand(rows, cols // 32, generator=gen)
    return Int4Linear.from_int4(q, scale, minimum, torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("shape", [(64, 32), (192, 96), (960, 576), (576, 1536)])
def test_kernel_expands_exactly_like_the_tensor_ops(shape):
    assert library.ops() is not None, "the kernel must build where the CPU supports it"
    module = int4_module(*shape)
    got = module.dequantize_t()
    assert got.shape == (shape[1], shape[0]) and got.dtype == torch.bfloat16
    assert torch.equal(got, module.dequantize().T)


@pytest.mark.parametrize("at", [INT4_CROSSOVERS, INT8_CROSSOVERS])
def test_paths_by_rows(monkeypatch, at):
    kernels = object()
    monkeypatch.setattr(library, "bf16_matmul", lambda: True)
    for amx in (False, True):
        monkeypatch.setattr(library, "amx", lambda amx=amx: amx)
        dense = at.dense_amx if amx else at.dense
        assert product_path(1, kernels, True, at, False) == Product.VECTOR
        assert product_path(at.amx, kernels, True, at, False) == (Product.AMX if amx else Product.VECTOR)
        assert product_path(dense - 1, kernels, True, at, False) == (Product.AMX if amx else Product.VECTOR)
        assert product_path(dense, kernels, True, at, False) == Product.DENSE
        assert product_path(at.amx, kernels, False, at, False) == Product.VECTOR  # shape unfit for AMX
        assert product_path(at.amx, None, True, at, False) == Product.VECTOR  # no compiled kernels
        assert product_path(at.dense_unaided, None, True, at, False) == Product.DENSE
        # Batch-invariant: our vector kernels at every row count; without them, the rules above.
        assert {product_path(rows, kernels, True, at, True) for rows in (1, at.amx, dense, 4096)} == {Product.VECTOR}
        assert product_path(at.dense_unaided, None, True, at, True) == Product.DENSE
    # Without bfloat16 arithmetic (avx2) no dense bfloat16 matmul: our vector kernels at every row count.
    monkeypatch.setattr(library, "bf16_matmul", lambda: False)
    monkeypatch.setattr(library, "amx", lambda: False)
    assert {product_path(rows, kernels, True, at, False) for rows in (1, at.dense, 4096)} == {Product.VECTOR}


def test_dense_weights_stay_float32_without_bfloat16_arithmetic(tiny_llama, tier):
    """An HF directory's dense weights in the fast mode: bfloat16 where the CPU multiplies it, float32
    (`Float32Linear`, bfloat16 activations in and out) at the avx2 tier, whose bfloat16 matmuls crawl."""
    from seriatim.llm import LLM

    for name in ("avx2", "avx512"):
        if isa.Tier[name.upper()] > isa.machine_tier():
            continue
        tier(name)
        model = LLM(str(tiny_llama[0] / "hf")).model
        head = model.lm_head
        assert (type(head) is quant.Float32Linear) == (name == "avx2")
        assert head.weight.dtype == (torch.float32 if name == "avx2" else torch.bfloat16)
        x = torch.randn(3, head.in_features).bfloat16()
        assert head(x).dtype == torch.bfloat16
        assert rel(head(x), x.float() @ head.weight.float().T) < 1e-2


def test_without_the_kernel_the_tensor_ops_expand_from_more_rows(monkeypatch):
    monkeypatch.setattr(library, "ops", lambda: None)
    module = int4_module(128, 64)
    unaided = INT4_CROSSOVERS.dense_unaided
    assert product_path(unaided - 1, None, True, INT4_CROSSOVERS, True) == Product.VECTOR
    assert torch.equal(module.dequantize_t(), module.dequantize().T)
    x = torch.randn(unaided, 64).bfloat16()
    assert torch.equal(module(x), x @ module.dequantize().T)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    def broken(build, folder):
        raise RuntimeError("no compiler here")

    build = library.Build("seriatim_nowhere", (), ())
    monkeypatch.setattr(library, "build_for", lambda tier: build)
    monkeypatch.setattr(library, "_build_dir", lambda build: tmp_path)
    monkeypatch.setattr(library, "_compile", broken)
    with caplog.at_level(logging.WARNING, logger="seriatim.kernels.library"):
        assert library.ops() is None and library.ops() is None
    assert [r.getMessage() for r in caplog.records] == [
        "seriatim's CPU kernels are unavailable (no compiler here); using tensor ops (slower)"]


def test_a_build_killed_half_way_does_not_stop_the_next(monkeypatch, tmp_path):
    """A build killed half-way (kill -9) leaves PyTorch's lock file and perhaps a truncated library: the next
    process builds again (through PyTorch's builder, its compile step stubbed) instead of waiting on that lock
    forever or loading that library."""
    from torch.utils import cpp_extension, file_baton

    build = library.Build("seriatim_rebuilt", (), ())
    (tmp_path / "lock").touch()
    (tmp_path / f"{build.name}.so").write_bytes(b"\x7fELF cut short")
    compiled, loaded = [], []
    monkeypatch.setattr(library, "build_for", lambda tier: build)
    monkeypatch.setattr(library, "_build_dir", lambda build: tmp_path)
    monkeypatch.setattr(file_baton.FileBaton, "wait", lambda self: pytest.fail("waited on a dead build's lock"))
    monkeypatch.setattr(cpp_extension, "_write_ninja_file_and_build_library", lambda **kw: compiled.append(kw["name"]))
    monkeypatch.setattr(cpp_extension, "_import_module_from_library", lambda *args: None)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)

    assert library.ops() is torch.ops.seriatim_rebuilt
    assert compiled == [build.name] and loaded == [str(tmp_path / f"{build.name}.so")]
    assert not (tmp_path / "lock").exists() and (tmp_path / library.FINISHED).exists()


AVX2_FLAGS = {"avx2", "fma", "f16c"}
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512vbmi",
                             "avx512_vnni"}


@pytest.mark.parametrize("flags, granted, expected", [
    (set(), True, isa.Tier.NONE),
    ({"avx2", "fma"}, True, isa.Tier.NONE),  # AVX2 without F16C
    (AVX2_FLAGS, True, isa.Tier.AVX2),
    (AVX512_FLAGS - {"avx512_bf16"}, True, isa.Tier.AVX2),  # Skylake-X: AVX-512 without BF16
    (AVX512_FLAGS, True, isa.Tier.AVX512),  # Zen 4/5, Ice Lake
    (AVX512_FLAGS | {"amx_tile", "amx_bf16", "amx_int8"}, False, isa.Tier.AVX512),  # AMX Linux does not grant
    (AVX512_FLAGS | {"amx_tile", "amx_bf16", "amx_int8"}, True, isa.Tier.AMX),  # Sapphire Rapids
])
def test_the_tier_follows_the_cpu_flags(tier, monkeypatch, flags, granted, expected):
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(isa, "_amx_granted", lambda: granted)
    isa.machine_tier.cache_clear()
    tier(None)
    assert isa.machine_tier() is expected and isa.tier() is expected


def test_seriatim_isa_lowers_the_tier_and_never_raises_it(tier):
    machine = isa.machine_tier()
    for lower in [t for t in isa.Tier if t <= machine]:
        tier(str(lower))
        assert isa.tier() is lower
        # Each tier with kernels has its own library, in its own namespace; none has none.
        ops = library.ops()
        assert (ops is None) == (lower is isa.Tier.NONE)
        if ops is not None:
            assert ops.__name__ == f"torch.ops.{'seriatim_avx2' if lower is isa.Tier.AVX2 else 'seriatim'}"
        assert library.amx() == (lower is isa.Tier.AMX)
    for higher in [t for t in isa.Tier if t > machine]:
        tier(str(higher))
        assert isa.tier() is machine
    tier("AVX512 ")  # case and spaces do not matter
    assert isa.tier() is min(machine, isa.Tier.AVX512)
    tier("sse2")
    with pytest.raises(ValueError, match="SERIATIM_ISA='sse2' is no ISA tier; use one of: amx, avx512, avx2, none"):
        isa.tier()


def test_describe_names_the_cpu_and_the_tier(tier):
    tier("none")
    text = isa.describe()
    assert text.startswith(cpu_model()) and "ISA tier none" in text
    if isa.machine_tier() > isa.Tier.NONE:
        assert f"lowered from {isa.machine_tier()}" in text


def eager(fn, *args):
    """Run a model function with the fused ops switched off (the tensor-op path)."""
    from unittest import mock

    with mock.patch.object(library, "for_tensor", lambda x: None):
        return fn(*args)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bfloat16 steps between two bfloat16 tensors of the same sign pattern."""
    ia, ib = (t.view(torch.int16).int() for t in (a, b))
    return int((ia - ib).abs().max())


@needs_kernels
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (3, 12, 64)])
def test_fused_rms_norm_matches_the_eager_ops(shape, gemma):
    gen = torch.Generator().manual_seed(5)
    norm = model.RMSNorm(shape[1:], 1e-6, scale_in_float32=gemma)
    norm.weight.data = torch.randn(shape[1:], generator=gen).to(torch.float32 if gemma else torch.bfloat16)
    wide = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=gen).bfloat16()
    x = wide[:, : shape[1]]  # a strided view, as the per-head norm gets from the fused QKV output
    got, expected = norm(x), eager(norm, x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert ulps_apart(got, expected) <= 2  # float32 sums in another order, one rounding instead of two
    assert torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=1e-2)


@needs_kernels
def test_fused_rotary_matches_the_eager_ops():
    gen = torch.Generator().manual_seed(6)
    rope = model.Rotary(64, 10000.0)
    cos, sin = rope(torch.tensor([0, 5, 900]), torch.bfloat16)
    qkv = torch.randn(3, 15 * 64, generator=gen).bfloat16()
    x = qkv[:, : 12 * 64].view(3, 12, 64)  # queries and keys of a fused projection: rows strided
    got, expected = model.apply_rotary(x, cos, sin), eager(model.apply_rotary, x, cos, sin)
    exact = model.apply_rotary(x.float(), cos.float(), sin.float())  # float32: the eager ops
    assert torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    # One rounding of the float32 result (the eager bfloat16 ops round three times).
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8).all()


@needs_kernels
def test_fused_silu_mul_matches_the_eager_ops():
    gen = torch.Generator().manual_seed(8)
    gate_up = torch.randn(5, 2 * 200, generator=gen).bfloat16()  # 200: a partial last vector
    gate_up[0, :6] = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0, 1e-3])  # exp's far ends and zero
    gate, up = gate_up.float().chunk(2, dim=-1)
    exact = torch.nn.functional.silu(gate) * up  # float32
    got = library.ops().silu_mul(gate_up)
    assert got.shape == (5, 200)
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()  # one bfloat16 rounding


def test_float32_keeps_the_eager_ops():
    assert library.for_tensor(torch.zeros(2, 2)) is None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_amx
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 40])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536)])
def test_amx_int4_product_matches_torchs_kernel(shape, rows):
    module = int4_module(*shape, seed=rows)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(7)).bfloat16()
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x, module.weight, GROUP, module.scales_zeros)
    got = library.ops().int4_mm_amx(x, module.weight, module.scales_zeros, GROUP)
    # Both use the exact weights and float32 sums; only the summation order (and the final bfloat16
    # rounding of a few values) differ. A wrong nibble or scale would be off by ~10%.
    assert got.shape == expected.shape and rel(got, expected) < 1e-3
    assert rel(module(x), expected) < 1e-3  # whichever path the module takes for this many rows


@needs_amx
@pytest.mark.parametrize("rows", [64, 65, 100, 223])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536)])
def test_amx_int4_product_of_many_rows_uses_the_dense_paths_weights(shape, rows):
    """From 64 rows the kernel expands each block once to the bfloat16 weights of `dequantize_t` (the
    dense path's): the float32 product of those, each value at most one bfloat16 step away."""
    module = int4_module(*shape, seed=rows)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(7)).bfloat16()
    exact = x.float() @ module.dequantize_t().float()
    got = library.ops().int4_mm_amx(x, module.weight, module.scales_zeros, GROUP).float()
    assert got.shape == exact.shape
    assert ((got - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()


@needs_amx
@pytest.mark.parametrize("rows", [1, 16, 33])
def test_amx_int8_product_matches_torchs_kernel(rows):
    gen = torch.Generator().manual_seed(rows)
    module = Int8Linear(*int8_rows(torch.randn(320, 576, generator=gen)), torch.bfloat16)
    x = torch.randn(rows, 576, generator=gen)
    x[:, 5] *= 100  # an outlier column, as hidden states have: it sets the row's quantization scale
    x = x.bfloat16()
    expected = torch.ops.aten._weight_int8pack_mm(x, module.weight, module.scale)
    got = library.ops().int8_mm_amx(x, module.weight, module.scale)
    assert got.shape == expected.shape and rel(got, expected) < 1e-3


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 6, 17])
def test_int8_vector_product_matches_torchs_kernel_and_amx(rows):
    gen = torch.Generator().manual_seed(rows)
    module = Int8Linear(*int8_rows(torch.randn(320, 576, generator=gen)), torch.bfloat16)
    x = torch.randn(rows, 576, generator=gen)
    x[:, 5] *= 100  # an outlier column: it sets the row's quantization scale
    x = x.bfloat16()
    expected = torch.ops.aten._weight_int8pack_mm(x, module.weight, module.scale)
    got = library.ops().int8_gemv(x, module.weight, module.scale)
    assert got.shape == expected.shape and rel(got, expected) < 1e-3
    if library.amx():  # the same integer sums: equal up to the float32 summation order
        assert rel(got, library.ops().int8_mm_amx(x, module.weight, module.scale)) < 1e-5
    assert rel(module(x), expected) < 1e-3  # whichever path the module takes for this many rows


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 15, 16, 70])
@pytest.mark.parametrize("shape", [(130, 192), (320, 576), (64, 8320)])
def test_int8_products_are_the_exact_integer_totals(shape, rows):
    """Every int8 path (the vector kernel for a few rows, integer matrix products for many) computes the
    exact integer total of the int16-quantized row and the int8 weight row, rounded once: bit for bit the
    reference below, so a row's result cannot depend on how many rows share the call. K of 8320 crosses
    the point where the vector kernel's int32 lane sums move to int64."""
    gen = torch.Generator().manual_seed(rows)
    n, k = shape
    module = Int8Linear(*int8_rows(torch.randn(n, k, generator=gen)), torch.bfloat16)
    x = (torch.randn(rows, k, generator=gen) * torch.linspace(0.1, 30, k)).bfloat16()
    xf = x.float()
    row_scale = xf.abs().amax(dim=1) / 32639
    q = torch.round(xf * (1 / row_scale)[:, None]).long()
    expected = (q @ module.weight.long().T).float() * row_scale[:, None] * module.scale.float()[None, :]
    got = library.ops().int8_gemv(x, module.weight, module.scale, True)
    assert torch.equal(got, expected)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 16, 600])
def test_int8_head_writes_float32_that_rounds_to_its_bfloat16_product(rows):
    """float_out (the logits): the same float32 values the bfloat16 products are rounded from, for each
    path the module takes (vector kernel, AMX, dense from 512 rows)."""
    gen = torch.Generator().manual_seed(rows)
    module = Int8Linear(*int8_rows(torch.randn(320, 576, generator=gen)), torch.bfloat16)
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    got = module(x, float_out=True)
    assert got.dtype == torch.float32 and torch.equal(got.bfloat16(), module(x))
    kernels = [library.ops().int8_gemv] + ([library.ops().int8_mm_amx] if library.amx() else [])
    for kernel in kernels:
        wide = kernel(x, module.weight, module.scale, True)
        assert wide.dtype == torch.float32 and torch.equal(wide.bfloat16(), kernel(x, module.weight, module.scale))
        assert not torch.equal(wide, wide.bfloat16().float())  # not rounded: the bits below bfloat16 are kept


# How close the int4 vector kernel comes to the float32 product of the exact weights, per tier: bfloat16
# activations as given (avx512), or quantized to int8 per 32 columns (avx2, as llama.cpp's Q8_0) with an
# outlier in one span of each row. A wrong nibble or scale would be off by ~10%.
INT4_VECTOR_ERROR = {isa.Tier.AVX512: 1e-3, isa.Tier.AMX: 1e-3, isa.Tier.AVX2: 2e-2}


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 33, 64])
@pytest.mark.parametrize("shape", [(64, 32), (960, 576), (576, 1536)])
def test_int4_vector_product_matches_the_exact_weights(shape, rows):
    """Any number of rows, each row's result the same as alone (rows share a pass over a block, each summed
    in the same order), and what the module runs below the dense path."""
    module = int4_module(*shape, seed=3)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(5)).bfloat16()
    x[:, 3] *= 50  # an outlier column, as hidden states have
    expected = x.float() @ module.dequantize().float().T
    got = library.ops().int4_gemv(x, module.weight, module.scales_zeros, GROUP)
    assert got.shape == expected.shape and rel(got, expected) < INT4_VECTOR_ERROR[isa.tier()]
    alone = torch.cat([library.ops().int4_gemv(x[i : i + 1], module.weight, module.scales_zeros, GROUP)
                       for i in range(rows)])
    assert torch.equal(alone, got)
    assert module.product(rows) is Product.VECTOR
    assert torch.equal(module(x), got)


@pytest.mark.parametrize("layout", ["columns", "quads"])
def test_int4_layouts_pack_and_unpack(layout):
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    packed = quant.pack_int4(q, layout)
    assert packed.shape == (128, 32) and torch.equal(quant.unpack_int4(packed, 128, 64, layout).int(), q)


def test_the_columns_layout_is_torchs_where_torch_says_so(tier):
    """"columns" is PyTorch's packing on AVX-512 CPUs; elsewhere (AVX2) the modules do not hand our layouts
    to PyTorch's weight-only kernel, and a module whose layout is not the tier's is expanded by tensor ops."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    torchs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    assert quant._torch_reads_columns() == torch.equal(torchs, quant.pack_int4(q, "columns"))
    if isa.machine_tier() >= isa.Tier.AVX512:
        assert quant._torch_reads_columns()
    for layout in ("columns", "quads"):
        module = Int4Linear(quant.pack_int4(q, layout), torch.stack([torch.ones(2, 128), torch.zeros(2, 128)], -1)
                            .bfloat16(), layout)
        assert torch.equal(module.dequantize().float(), q.float() - 8)
        for name in ("none", "avx2", "avx512"):
            tier(name)
            x = torch.randn(3, 64).bfloat16()
            expected = x.float() @ (q.float() - 8).T
            assert rel(module(x), expected) < 2e-2, (layout, name)
            if module.layout != library.int4_layout():
                assert module.product(3) in (Product.DENSE, Product.WEIGHT_ONLY)


@needs_kernels
@pytest.mark.parametrize("dim, group", [(16, 1), (48, 3), (64, 7), (128, 2), (256, 5)])
def test_decode_attention_matches_sdpa_for_head_sizes(dim, group):
    """Every head size the kernel takes (its code is specialised per multiple of 16) and groups of query
    heads larger than the four whose sums it keeps in registers; lengths below, at and above 16 keys."""
    gen = torch.Generator().manual_seed(dim)
    kv_heads, lengths = 2, torch.tensor([1, 16, 37])
    batch, width = len(lengths), int(lengths.max())
    k_cache = torch.randn(kv_heads, batch * width, dim, generator=gen).bfloat16()
    v_cache = torch.randn(kv_heads, batch * width, dim, generator=gen).bfloat16()
    q = torch.randn(batch, kv_heads * group, dim, generator=gen).bfloat16()
    k, v = (torch.randn(batch, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
    slots = torch.arange(batch * width).view(batch, width)
    write = slots[torch.arange(batch), lengths - 1]
    got = library.ops().decode_attention(q, k, v, k_cache, v_cache, torch.arange(batch), write, slots, lengths, 0.3)
    for b, n in enumerate(lengths.tolist()):
        keys, values = k_cache[:, slots[b, :n]].float(), v_cache[:, slots[b, :n]].float()  # [Hkv, n, Dh]
        assert torch.equal(keys[:, -1].bfloat16(), k[b]) and torch.equal(values[:, -1].bfloat16(), v[b])
        queries = q[b].float().view(kv_heads, group, dim)
        expected = F.scaled_dot_product_attention(queries, keys, values, scale=0.3).reshape(-1, dim)
        assert rel(got[b], expected) < 5e-3  # bfloat16 output rounding; a misplaced head is ~1


@needs_amx
@pytest.mark.parametrize("batch, n, heads, kv_heads, dim, start, first, length, window", [
    (1, 37, 9, 3, 64, 0, 0, 37, 0),     # a whole prompt, partial query and key blocks (SmolLM2's heads)
    (3, 64, 9, 3, 64, 0, 0, 64, 0),     # prompts side by side (the engine's fresh runs)
    (1, 20, 4, 2, 64, 50, 0, 70, 0),    # a chunk after 50 cached positions
    (1, 33, 4, 1, 128, 10, 5, 38, 16),  # a sliding window, keys starting at position 5
    (1, 5, 8, 4, 256, 3, 0, 8, 0),      # Gemma 3's head size
    (1, 300, 2, 1, 64, 0, 0, 300, 0),   # many key steps: the running maximum moves and is rescaled
])
def test_prefill_attention_matches_float32_sdpa(batch, n, heads, kv_heads, dim, start, first, length, window):
    gen = torch.Generator().manual_seed(n)
    q = (3 * torch.randn(batch, n, heads, dim, generator=gen)).bfloat16()  # large scores: a sharp softmax
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen).bfloat16() for _ in range(2))
    got = library.ops().prefill_attention(q, k, v, start, first, window, dim ** -0.5)
    group = heads // kv_heads
    queries = torch.arange(start, start + n)[:, None]
    keys = torch.arange(first, first + length)[None, :]
    visible = (keys <= queries) & ((keys > queries - window) if window else True)
    expected = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1),
        attn_mask=visible, scale=dim ** -0.5).transpose(1, 2)
    assert got.shape == expected.shape and rel(got, expected) < 5e-3  # bfloat16 rounding; a wrong key is ~1


@needs_amx
def test_prefill_attention_reads_views_in_place():
    """The engine passes views of its fused QKV projection: rows of q, k and v are strided, read as they lie."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 40, 9 + 2 * 3, 64, generator=gen).bfloat16()  # [B, n, H + 2 Hkv, Dh]
    q, k, v = qkv[:, :, :9], qkv[:, :, 9:12].transpose(1, 2), qkv[:, :, 12:].transpose(1, 2)
    got = library.ops().prefill_attention(q, k, v, 0, 0, 0, 0.125)
    expected = library.ops().prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0, 0, 0, 0.125)
    assert not q.is_contiguous() and torch.equal(got, expected)


@needs_kernels
@pytest.mark.parametrize("vocab", [1, 15, 16, 49152, 151_937])
def test_argmax_rows_equals_torch(vocab):
    """The first index of the largest value, ties and NaN (torch counts it largest) included."""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randint(-3, 4, (7, vocab), generator=gen).float()  # few values: many ties
    x[1] = -torch.inf
    x[2, vocab // 2] = torch.nan
    x[3] = torch.randn(vocab, generator=gen)
    x[4, -1] = 10.0  # the largest in the tail lanes
    assert torch.equal(library.ops().argmax_rows(x), x.argmax(dim=-1))


def test_the_fast_mode_follows_the_tier(tier):
    """From avx2 up (where seriatim has kernels) the fast mode keeps weights compact; below, float32."""
    from seriatim.weights.loader import choose_precision

    cpu = torch.device("cpu")
    tier("none")
    assert choose_precision("auto", cpu) == Precision(torch.float32, compact=False)
    if isa.machine_tier() >= isa.Tier.AVX2:
        tier("avx2")
        assert choose_precision("auto", cpu) == Precision(torch.bfloat16, compact=True)


@needs_kernels
@pytest.mark.parametrize("vocab, width", [(49152, 49152), (1000, 1024), (77, 96), (130, 64)])
def test_apply_bitmask_equals_the_tensor_ops(vocab, width):
    """The kernel against grammar.state's tensor-op path: masked rows get -inf exactly where a bit is clear
    (tokens past the mask's width too), other rows and allowed tokens keep their logits, the input is left as
    it was."""
    from seriatim.grammar.state import unpack

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    bits = torch.randint(-(2**31), 2**31 - 1, (3, width // 32), dtype=torch.int32, generator=g)
    bits[1] = -1  # every token allowed
    rows = torch.tensor([4, 0, 2])
    before = x.clone()
    got = library.ops().apply_bitmask(x, bits, rows)
    allowed = torch.zeros(3, vocab, dtype=torch.bool)
    allowed[:, : min(width, vocab)] = unpack(bits, vocab)
    expected = x.clone()
    expected[rows] = x[rows].masked_fill(~allowed, -torch.inf)
    assert torch.equal(got, expected) and torch.equal(x, before)
