"""Weights kept compact in memory, and the product that serves each number of rows.

Two compact forms, multiplied with bfloat16 activations: group-wise (32)
asymmetric int4, and int8 with one scale per output row. A product takes a
vector kernel (seriatim's or PyTorch's weight-only ones) for a row or a few,
seriatim's AMX kernels for more, and for long chunks the weight expanded to
bfloat16 just before one dense matmul (`product_path`).
Every GGUF block type goes to the nearest of the two:

- Q4_0, Q4_1, Q4_K -> int4. Their blocks *are* a scale, a minimum and 32
  nibbles (Q4_K's 6-bit sub-block scales and minimums multiply out), so they
  are re-expressed exactly (the scales then round to bfloat16).
- Q8_0, Q6_K, Q5_K, Q5_0 -> int8 per row. There is no 5- or 6-bit kernel and
  int4 would drop their extra bits, so they are dequantized and re-rounded
  with the row's largest magnitude at 127: an error of at most half a step of
  the row scale, the price of one scale per row instead of one per block.
- A fused projection whose parts map to different forms (K-quant files mix
  Q4_K with Q6_K) becomes int8 as a whole: its int4 parts are re-rounded too,
  rather than expanded to dense bfloat16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf.quants import Q4_K, dequantize
from torch import nn

from ..kernels import library

GROUP = 32  # weights per scale in the int4 form (the size of a Q4_0/Q4_1 block, a Q4_K sub-block)
INT4_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K)
INT8_TYPES = (QT.Q8_0, QT.Q6_K, QT.Q5_K, QT.Q5_0)
COMPACT_TYPES = INT4_TYPES + INT8_TYPES  # kept as blocks until the compact modules are built
ROW_CHUNK = 4096  # rows dequantized at a time: a large embedding never exists whole in float32
# Which product serves a chunk of `rows` activation rows (measured on SmolLM2's shapes, 2 cores; `Crossovers`
# below). PyTorch's weight-only kernels are matrix-vector products in a loop: linear in rows. Our AMX
# kernels (csrc/amx_mm.cpp) multiply 16 rows per weight read; from 64 rows the int4 one expands a block of
# weights to bfloat16 tiles once for all rows. Without AMX, our int4 vector kernel (csrc/gemv.cpp) reads a
# block once for up to four rows, at about half PyTorch's time at every row count, until the expanded
# weight and one dense matmul catch up (~96 rows). For long chunks, expanding the weight and one dense
# matmul wins; the int4 expansion costs little (csrc/expand.cpp), the int8 head's is a float conversion of
# its whole weight, so dense wins late.
PACK_BLOCK = 64  # output rows per block in the CPU int4 kernel's packed layout (AVX-512 and AVX2)


class Product(IntEnum):
    """Which product multiplies a chunk of activation rows by a compact weight. Decided here, in Python, for
    the modules and the fused decode layers alike; the values are csrc/decode_layer.cpp's."""

    VECTOR = 0  # seriatim's vector kernel (csrc/gemv.cpp)
    WEIGHT_ONLY = 1  # PyTorch's weight-only kernel
    AMX = 2  # seriatim's AMX kernel (csrc/amx_mm.cpp)
    DENSE = 3  # the weight expanded to the activation dtype, then one dense matmul


@dataclass(frozen=True)
class Crossovers:
    """From how many activation rows each product takes over."""

    amx: int  # our AMX kernel, where it runs
    dense_amx: int  # expanded weight and a dense matmul, where AMX runs
    dense: int  # the same, with our kernels but without AMX
    dense_unaided: int  # the same, without our kernels (expansion by tensor ops)


INT4_CROSSOVERS = Crossovers(amx=2, dense_amx=224, dense=96, dense_unaided=128)
INT8_CROSSOVERS = Crossovers(amx=4, dense_amx=512, dense=160, dense_unaided=128)


@dataclass
class BlockWeight:
    """A GGUF tensor as stored: [rows, bytes per row] of blocks, `cols` weights per row."""

    qtype: QT
    data: np.ndarray
    cols: int

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(np.array(dequantize(self.data, self.qtype), dtype=np.float32))

    def take_rows(self, order: np.ndarray | slice) -> BlockWeight:
        """Select or reorder output rows (blocks run along a row, so rows move whole)."""
        return BlockWeight(self.qtype, self.data[order], self.cols)


Weight = torch.Tensor | BlockWeight  # float32 tensor or GGUF blocks


def compact_form(w: Weight) -> str:
    """'int4', 'int8' or 'dense': how `compact_linear` stores this weight when it is alone."""
    if isinstance(w, BlockWeight):
        return "int4" if w.qtype in INT4_TYPES else "int8" if w.qtype in INT8_TYPES else "dense"
    return "dense"


def dense(w: Weight) -> torch.Tensor:
    return w.dequantize() if isinstance(w, BlockWeight) else w


def _blocks(w: BlockWeight, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(w.data).reshape(w.rows, -1, block_bytes)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian float16 fields of the blocks -> float32 tensor [rows, blocks]."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def int4_from_blocks(w: BlockWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0/Q4_1/Q4_K -> (nibbles int32 [N, K], scale [N, K/32], minimum [N, K/32]); w = q*scale + min."""
    if w.qtype == QT.Q4_K:
        return _int4_from_q4_k(w)
    size = 20 if w.qtype == QT.Q4_1 else 18
    b = _blocks(w, size)
    scale = _f16(b[..., 0:2])
    qs = b[..., size - 16 :]  # 16 bytes: low nibbles are weights 0..15, high nibbles 16..31
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(w.rows, w.cols)
    minimum = _f16(b[..., 2:4]) if w.qtype == QT.Q4_1 else -8 * scale
    return torch.from_numpy(q.astype(np.int32)), scale, minimum


def _int4_from_q4_k(w: BlockWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks of 256 (d, dmin, 8 packed 6-bit scales and minimums, 128 bytes of nibbles):
    sub-block j is (q * d*sc[j] - dmin*m[j]), which is group-32 asymmetric int4 as it stands."""
    b = _blocks(w, 144)  # [N, S, 144]
    n, supers = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, S]
    sc, m = (torch.from_numpy(x.reshape(n, supers, 8).astype(np.float32))
             for x in Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12)))
    # Four runs of 32 bytes: run r holds sub-block 2r in its low nibbles and 2r+1 in its high ones.
    qs = b[..., 16:].reshape(n, supers, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, w.cols)
    scale = (d[..., None] * sc).reshape(n, -1)
    minimum = -(dmin[..., None] * m).reshape(n, -1)
    return torch.from_numpy(q.astype(np.int32)), scale, minimum


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float32 scale [N]); w ≈ q * scale, each row's largest magnitude at 127."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def int8_from_blocks(w: BlockWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Any block type -> int8 with one scale per row, dequantized a chunk of rows at a time."""
    parts = [int8_rows(w.take_rows(slice(i, i + ROW_CHUNK)).dequantize()) for i in range(0, w.rows, ROW_CHUNK)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


class Int4Linear(nn.Module):
    """y = x W^T with W as group-wise asymmetric int4 in one of our packed layouts (`pack_int4`; bfloat16 activations),
    by the product `product_path` picks for the number of rows."""

    batch_invariant = True  # see `set_batch_invariant`

    def __init__(self, weight: torch.Tensor, scales_zeros: torch.Tensor, layout: str = "columns"):
        """weight: packed [N, K/2] (uint8) in `layout` (`pack_int4`); scales_zeros: [K/32, N, 2]."""
        super().__init__()
        self.out_features, self.in_features = weight.shape[0], 2 * weight.shape[1]
        self.layout = layout
        self.register_buffer("weight", weight)
        self.register_buffer("scales_zeros", scales_zeros)

    @classmethod
    def from_int4(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype) -> Int4Linear:
        """From values q in [0, 16) ([N, K], int32) and per-group scale and minimum ([N, K/32])."""
        # The kernels compute (q - 8) * scale + zero, so zero = minimum + 8 * scale.
        sz = torch.stack([scale, minimum + 8 * scale], dim=-1)  # [N, K/32, 2]
        sz = sz.transpose(0, 1).contiguous().to(dtype)
        if q.shape[0] % PACK_BLOCK:  # not ours: PyTorch's packing, for its weight-only kernel
            return cls(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), sz)
        layout = library.int4_layout()
        return cls(pack_int4(q, layout), sz, layout)

    def product(self, rows: int) -> Product:
        """The product `forward` runs for `rows` activation rows (see `product_path`). Our kernels read our
        layouts (`pack_int4`), each tier's its own; PyTorch's weight-only kernel reads PyTorch's, which is
        "columns" on some CPUs (`_torch_reads_columns`). Where neither reads the weight, the tensor ops
        expand it."""
        ours = self.out_features % PACK_BLOCK == 0
        kernels = self._kernels() if ours else None
        path = product_path(rows, kernels, ours, INT4_CROSSOVERS, self.batch_invariant)
        if kernels is not None or (path is Product.DENSE and ours):
            return path
        return Product.WEIGHT_ONLY if not ours or (self.layout == "columns" and _torch_reads_columns()) \
            else Product.DENSE

    def _kernels(self) -> object | None:
        """Our kernels, where they serve this weight: built for the tier in use, which reads its layout."""
        ops = library.for_tensor(self.scales_zeros)
        return ops if ops is not None and self.layout == library.int4_layout() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N]"""
        product = self.product(x.shape[0])
        if product is Product.AMX:
            return library.ops().int4_mm_amx(x, self.weight, self.scales_zeros, GROUP)
        if product is Product.DENSE:
            return x @ self.dequantize_t()
        if product is Product.VECTOR:
            return library.ops().int4_gemv(x, self.weight, self.scales_zeros, GROUP)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, GROUP, self.scales_zeros)

    def dequantize_t(self) -> torch.Tensor:
        """[K, N] (the transpose of `dequantize`): one pass of our kernel where it runs."""
        ops = self._kernels()
        if ops is None:
            return self.dequantize().T
        return ops.int4_dequantize_t(self.weight, self.scales_zeros, GROUP)

    def dequantize(self) -> torch.Tensor:
        """[N, K] in the activation dtype, from our packed layout (`pack_int4`)."""
        n, k = self.out_features, self.in_features
        q = unpack_int4(self.weight, n, k, self.layout).float()
        scale, zero = self.scales_zeros.transpose(0, 1).float().contiguous().unsqueeze(-1).unbind(2)  # [N, K/32, 1]
        weight = torch.addcmul(zero - 8 * scale, q.view(n, k // GROUP, GROUP), scale)  # (q - 8) * scale + zero
        return weight.view(n, k).to(self.scales_zeros.dtype)


class Int8Linear(nn.Module):
    """y = x W^T with W as int8 and one scale per output row."""

    batch_invariant = True  # see `set_batch_invariant`
    writes_float = True  # forward(x, float_out=True) gives float32 products (model.logits)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(dtype))

    def product(self, rows: int) -> Product:
        """The product `forward` runs for `rows` activation rows (see `product_path`)."""
        ops = library.for_tensor(self.scale)
        path = product_path(rows, ops, self.out_features % 32 == 0 and self._steps_fit(), INT8_CROSSOVERS,
                            self.batch_invariant)
        if path is not Product.VECTOR:
            return path
        return Product.VECTOR if ops is not None and self._steps_fit() else Product.WEIGHT_ONLY

    def _steps_fit(self) -> bool:
        return self.in_features % 64 == 0  # our kernels step through K 64 columns at a time

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """x: [M, K] -> [M, N] in x's dtype, or float32 with float_out (our kernels write it unrounded)."""
        product = self.product(x.shape[0])
        if product is Product.AMX:
            return library.ops().int8_mm_amx(x, self.weight, self.scale, float_out)
        if product is Product.VECTOR:
            return library.ops().int8_gemv(x, self.weight, self.scale, float_out)
        if product is Product.DENSE:
            y = F.linear(x, self.dequantize())
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        return y.float() if float_out else y

    def dequantize(self) -> torch.Tensor:
        """[N, K] in the activation dtype."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows as embeddings: a tied embedding shares this storage instead of a float copy."""
        return self.weight[tokens].to(self.scale.dtype) * self.scale[tokens, None]


def leading_rows(module: nn.Module, n: int) -> nn.Module | None:
    """The product by the first `n` rows of `module`'s weight, sharing its storage (a head over the first `n`
    token ids); None for forms with no row slice as cheap (packed int4, dense)."""
    if isinstance(module, Int8Linear):
        return Int8Linear(module.weight[:n], module.scale[:n], module.scale.dtype)
    return None


class Int8Embedding(nn.Module):
    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.embed(tokens)


def product_path(rows: int, ops: object | None, amx_fits: bool, at: Crossovers, invariant: bool) -> Product:
    """VECTOR (a vector kernel: ours or PyTorch's weight-only, as the module decides), AMX (ours) or DENSE
    for a chunk of `rows` activation rows, given whether our kernels are built and the weight's shape
    suits AMX. Batch-invariant modules take our vector kernels at every row count where they run: a row's
    sums then run in one order however many rows share the pass (csrc/gemv.cpp); so do all modules where
    the CPU has no bfloat16 arithmetic (the dense product would be a bfloat16 matmul)."""
    if ops is not None and (invariant or not library.bf16_matmul()):
        return Product.VECTOR
    amx = ops is not None and amx_fits and library.amx()
    dense_from = at.dense_amx if amx else at.dense if ops is not None else at.dense_unaided
    if rows >= dense_from:
        return Product.DENSE
    return Product.AMX if amx and rows >= at.amx else Product.VECTOR


def set_batch_invariant(model: nn.Module, on: bool) -> None:
    """Whether the compact projections of `model` pick their product for batch invariance (the same kernel,
    the same order of sums for a row whatever the number of rows) or for speed alone (AMX tiles and
    expanded dense weights for long chunks, whose sums run in other orders)."""
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int8Linear)):
            module.batch_invariant = on


# Our int4 layouts, by block of 64 outputs (N a multiple of 64); the view of one block's bytes as
# [.., nibble (low: outputs 0-31, high: 32-63), ...] axes, and where each axis goes:
# - "columns" (the AVX-512 kernels', PyTorch's own packing on AVX-512 CPUs): per input column, 32 bytes,
#   output i in the low nibble of byte i and output 32 + i in its high nibble.
# - "quads" (the AVX2 kernels'): per four input columns, four vectors of 32 bytes; 32-bit lane l of vector
#   j holds output 8 j + l's weights of the four columns (byte i: column i), 32 + 8 j + l's in the high nibbles.
_INT4_LAYOUTS = {"columns", "quads"}


def pack_int4(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Values q in [0, 16) ([N, K] int32, N a multiple of 64) -> packed [N, K/2] uint8 in `layout`."""
    n, k = q.shape
    blocks = n // PACK_BLOCK
    if layout == "columns":
        halves = q.to(torch.uint8).view(blocks, 2, PACK_BLOCK // 2, k)
        return (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)
    if layout == "quads":
        halves = q.to(torch.uint8).view(blocks, 2, 4, 8, k // 4, 4)  # [B, nibble, j, l, K/4, i]
        return (halves[:, 0] | (halves[:, 1] << 4)).permute(0, 3, 1, 2, 4).contiguous().view(n, k // 2)
    raise ValueError(f"no int4 layout {layout!r}; one of {sorted(_INT4_LAYOUTS)}")


def unpack_int4(packed: torch.Tensor, n: int, k: int, layout: str) -> torch.Tensor:
    """The inverse of `pack_int4`: [N, K] uint8 values in [0, 16)."""
    blocks = n // PACK_BLOCK
    if layout == "columns":
        b = packed.view(blocks, k, PACK_BLOCK // 2).transpose(1, 2)  # [B, 32, K]
        return torch.stack([b & 15, b >> 4], dim=1).reshape(n, k)
    b = packed.view(blocks, k // 4, 4, 8, 4).permute(0, 2, 3, 1, 4)  # [B, j, l, K/4, i]
    return torch.stack([b & 15, b >> 4], dim=1).reshape(n, k)


@functools.cache
def _torch_reads_columns() -> bool:
    """Whether this PyTorch build, on this CPU, packs int4 in the "columns" layout, so that its weight-only
    kernel reads ours (checked once)."""
    q = torch.randint(0, 16, (2 * PACK_BLOCK, 2 * GROUP), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), pack_int4(q, "columns"))


class Float32Linear(nn.Linear):
    """A dense projection kept in float32 for bfloat16 activations, where the CPU has no bfloat16 arithmetic
    (`library.bf16_matmul`): each product runs in float32 and is rounded back. Each row is its own
    matrix-vector product (a batched product over rows): MKL's matrix kernel sums a row in another order
    than its vector kernel, so one matmul would make a row's result depend on how many rows share it.
    csrc/decode_layer.cpp computes the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N]"""
        rows = x.float().unsqueeze(1)  # [M, 1, K]
        return torch.bmm(rows, self.weight.T.expand(x.shape[0], -1, -1)).squeeze(1).to(x.dtype)


def dense_linear(weight: torch.Tensor, dtype: torch.dtype, float32: bool = False) -> nn.Linear:
    """A dense projection for `dtype` activations: in `dtype`, or with `float32` in float32 (`Float32Linear`)."""
    linear = (Float32Linear if float32 else nn.Linear)(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.to(torch.float32 if float32 else dtype), requires_grad=False)
    return linear


def compact_linear(parts: list[Weight], dtype: torch.dtype, dense_float32: bool = False) -> nn.Module:
    """One module multiplying by the row-wise concatenation of `parts` (a fused projection), in the
    compact form that all of them allow (see the module docstring); dense (`dense_linear`, in float32 with
    `dense_float32`) for float weights."""
    forms = {compact_form(w) for w in parts}
    if forms == {"int4"}:
        q, scale, minimum = (torch.cat(x) for x in zip(*(int4_from_blocks(w) for w in parts)))
        return Int4Linear.from_int4(q, scale, minimum, dtype)
    if "dense" not in forms:
        q, scale = (torch.cat(x) for x in zip(*(int8_from_blocks(w) for w in parts)))
        return Int8Linear(q, scale, dtype)
    return dense_linear(torch.cat([dense(w) for w in parts]), dtype, dense_float32)


def compact_embedding(w: Weight, tied_head: nn.Module | None, dtype: torch.dtype) -> nn.Module:
    """Token embeddings: rows of the tied int8 head when there is one, else int8 rows of their own
    when quantized (half the memory of bfloat16), else a dense table."""
    if isinstance(tied_head, Int8Linear):
        return Int8Embedding(tied_head)
    if isinstance(w, BlockWeight):
        return Int8Embedding(Int8Linear(*int8_from_blocks(w), dtype))
    return nn.Embedding.from_pretrained(dense(w).to(dtype))


def conversion_notice(qtypes: set[QT]) -> str | None:
    """One line saying which block types are re-rounded in the fast mode, if any are."""
    rerounded = sorted(t.name for t in qtypes if t in INT8_TYPES and t != QT.Q8_0)
    if not rerounded:
        return None
    return f"fast mode: {', '.join(rerounded)} weights re-rounded to int8 per row (no kernel for their bit width)"
