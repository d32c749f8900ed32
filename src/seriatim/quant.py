"""Weights kept compact in memory, multiplied without being expanded.

GGUF stores weights in blocks of 32 along the input dimension. Q4_0/Q4_1
blocks (a scale, for Q4_1 also a minimum, and 32 nibbles) are exactly
group-wise asymmetric 4-bit, which PyTorch's CPU int4 kernel multiplies
directly with bfloat16 activations. Q8_0 (a scale and 32 int8s per block) is
re-expressed with one scale per row for the int8 kernel; the rounding that
costs is within one step of the row scale and is measured by perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from torch import nn

GROUP = 32  # GGUF block size: weights per scale
INT4_TYPES = (QT.Q4_0, QT.Q4_1)


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

    def take_rows(self, order: np.ndarray) -> BlockWeight:
        """Reorder output rows (blocks run along a row, so rows move whole)."""
        return BlockWeight(self.qtype, self.data[order], self.cols)

    @staticmethod
    def cat(parts: list[BlockWeight]) -> BlockWeight | None:
        """Stack the rows of same-typed weights (fused projections); None if the types differ."""
        if len({p.qtype for p in parts}) != 1:
            return None
        return BlockWeight(parts[0].qtype, np.concatenate([p.data for p in parts]), parts[0].cols)


def _blocks(w: BlockWeight, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(w.data).reshape(w.rows, w.cols // GROUP, block_bytes)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian float16 fields of the blocks -> float32 tensor [rows, groups]."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def int4_from_blocks(w: BlockWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0/Q4_1 blocks -> (nibbles int32 [N, K], scale [N, K/32], minimum [N, K/32]); w = q*scale + min."""
    size = 20 if w.qtype == QT.Q4_1 else 18
    b = _blocks(w, size)
    scale = _f16(b[..., 0:2])
    qs = b[..., size - 16 :]  # 16 bytes: low nibbles are weights 0..15, high nibbles 16..31
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(w.rows, w.cols)
    minimum = _f16(b[..., 2:4]) if w.qtype == QT.Q4_1 else -8 * scale
    return torch.from_numpy(q.astype(np.int32)), scale, minimum


def int8_from_blocks(w: BlockWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks -> (int8 [N, K], one float32 scale per row), re-rounded to the row's largest scale."""
    b = _blocks(w, 34)
    scale = _f16(b[..., 0:2])  # [N, G]
    q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32))  # [N, G, 32]
    row_scale = scale.amax(dim=1).clamp(min=1e-12)
    requant = (q * (scale / row_scale[:, None])[..., None]).round().clamp(-127, 127)
    return requant.reshape(w.rows, w.cols).to(torch.int8), row_scale


class Int4Linear(nn.Module):
    """y = x W^T with W as group-wise asymmetric int4 (torch's CPU int4 kernel, bfloat16 activations)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        # The kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale.
        sz = torch.stack([scale, minimum + 8 * scale], dim=-1)  # [N, K/32, 2]
        self.register_buffer("scales_zeros", sz.transpose(0, 1).contiguous().to(dtype))  # [K/32, N, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N]"""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, GROUP, self.scales_zeros)


class Int8Linear(nn.Module):
    """y = x W^T with W as int8 and one scale per output row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N]"""
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows as embeddings: a tied embedding shares this storage instead of a float copy."""
        return self.weight[tokens].to(self.scale.dtype) * self.scale[tokens, None]


class Int8Embedding(nn.Module):
    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.embed(tokens)


def compact_linear(weight: torch.Tensor | BlockWeight, dtype: torch.dtype) -> nn.Module:
    """The module that multiplies by `weight` fastest while keeping it compact."""
    if isinstance(weight, BlockWeight) and weight.qtype in INT4_TYPES:
        return Int4Linear(*int4_from_blocks(weight), dtype)
    if isinstance(weight, BlockWeight) and weight.qtype == QT.Q8_0:
        return Int8Linear(*int8_from_blocks(weight), dtype)
    dense = weight.dequantize() if isinstance(weight, BlockWeight) else weight
    linear = nn.Linear(dense.shape[1], dense.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(dense.to(dtype), requires_grad=False)
    return linear
