"""The engine's KV cache: one pool of blocks for all sequences, and the attention over it.

Storage is [layers][kv_heads, num_blocks * block_size, head_dim]: a position's
"slot" is block * block_size + offset, so one sequence's keys are gathered
with a single index_select, or taken as a plain view when its blocks happen
to be consecutive (the common case for a lone request).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import MaskKey, attend


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.device = device

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.kv_size * dtype.itemsize

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor | slice:
        """Slots of positions [start, end): a slice when they are consecutive in storage."""
        bs = self.block_size
        run = blocks[start // bs : (end - 1) // bs + 1]
        if run == list(range(run[0], run[0] + len(run))):
            base = run[0] * bs + start % bs
            return slice(base, base + end - start)
        pos = torch.arange(start, end)
        table = torch.tensor(blocks)
        return (table[pos // bs] * bs + pos % bs).to(self.device)


@dataclass
class PagedSpan:
    """The new tokens of one sequence inside a flat batch."""

    start: int  # position of the first new token (= tokens already cached)
    length: int
    write: torch.Tensor | slice  # slots of the new tokens
    read: torch.Tensor | slice  # slots of positions [0, start + length)


class PagedAttention:
    """`model.AttentionBackend` over a `PagedKVCache` for a flat batch of spans.

    With `batch_decodes`, the single-token spans of the pass attend together (`DecodeBatch`): one
    gather and one SDPA call per layer instead of one per sequence. The float32 reference keeps one
    call per sequence, because a padded batch can change the summation order in the last bits and its
    greedy tokens are promised to be batch-invariant.
    """

    def __init__(self, cache: PagedKVCache, spans: list[PagedSpan], batch_decodes: bool = False):
        self.cache = cache
        offsets = [0, *itertools.accumulate(s.length for s in spans)]
        self.rows = [(slice(a, b), span) for a, b, span in zip(offsets, offsets[1:], spans)]
        self.masks: dict[MaskKey, torch.Tensor] = {}  # shared by the layers of one pass
        single = [(sl.start, span) for sl, span in self.rows if span.length == 1]
        self.decodes = DecodeBatch.of(single, cache.device) if batch_decodes and len(single) > 1 else None
        if self.decodes is not None:
            self.rows = [(sl, span) for sl, span in self.rows if span.length > 1]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: [T, H, Dh], k/v: [T, Hkv, Dh] -> [T, H, Dh]. A sliding layer still stores every position
        here; attention masks (or, for one query, drops) the keys outside its window."""
        k_store, v_store = self.cache.k[layer], self.cache.v[layer]  # [Hkv, slots, Dh]
        outs = []
        for sl, span in self.rows:
            _store(k_store, span.write, k[sl])
            _store(v_store, span.write, v[sl])
            keys, values = _load(k_store, span.read), _load(v_store, span.read)
            outs.append(attend(q[sl], keys, values, span.start, scale, window, self.masks))
        if self.decodes is None:
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        out = q.new_empty(q.shape)
        out[self.decodes.rows] = self.decodes.attend(k_store, v_store, q, k, v, scale, window)
        for (sl, _), part in zip(self.rows, outs):
            out[sl] = part
        return out


@dataclass
class DecodeBatch:
    """The single-token spans of a pass, attended together: each sequence's keys gathered into one
    padded [B, Hkv, width, Dh] batch and masked to its own length (and window)."""

    rows: torch.Tensor  # [B] their rows in the flat batch
    write: torch.Tensor  # [B] slot of each new token
    read: torch.Tensor  # [B * width] slots of each sequence's positions, padded with slot 0
    lengths: torch.Tensor  # [B] keys per sequence (its position + 1)
    width: int
    masks: dict[int | None, torch.Tensor]

    @classmethod
    def of(cls, spans: list[tuple[int, PagedSpan]], device: torch.device) -> DecodeBatch:
        width = max(span.start + 1 for _, span in spans)
        reads = [_as_tensor(span.read, device) for _, span in spans]
        read = torch.zeros(len(spans), width, dtype=torch.long, device=device)
        for row, slots in zip(read, reads):
            row[: len(slots)] = slots
        return cls(
            rows=torch.tensor([row for row, _ in spans], device=device),
            write=torch.cat([_as_tensor(span.write, device) for _, span in spans]),
            read=read.flatten(),
            lengths=torch.tensor([span.start + 1 for _, span in spans], device=device),
            width=width,
            masks={},
        )

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, width]: key j is visible to sequence b's query when j < length_b (and within the window)."""
        if window not in self.masks:
            keys = torch.arange(self.width, device=self.lengths.device)[None, :]
            visible = keys < self.lengths[:, None]
            if window is not None:
                visible &= keys >= self.lengths[:, None] - window
            self.masks[window] = visible[:, None, None, :]
        return self.masks[window]

    def attend(self, k_store: torch.Tensor, v_store: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
        """Store the new keys/values, then attend -> [B, H, Dh]."""
        k_store.index_copy_(1, self.write, k[self.rows].transpose(0, 1))
        v_store.index_copy_(1, self.write, v[self.rows].transpose(0, 1))
        batch, (kv_heads, _, dim) = len(self.rows), k_store.shape
        keys = k_store.index_select(1, self.read).view(kv_heads, batch, self.width, dim).transpose(0, 1)
        values = v_store.index_select(1, self.read).view(kv_heads, batch, self.width, dim).transpose(0, 1)
        # Query heads sharing a KV head folded into the query axis, as for a lone decode: [B, Hkv, H/Hkv, Dh].
        queries = q[self.rows].view(batch, kv_heads, -1, dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.mask(window), scale=scale)
        return out.reshape(batch, -1, dim)


def _as_tensor(slots: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
    return torch.arange(slots.start, slots.stop, device=device) if isinstance(slots, slice) else slots


def _store(store: torch.Tensor, slots: torch.Tensor | slice, x: torch.Tensor) -> None:
    """x: [n, Hkv, Dh] into store[:, slots]"""
    if isinstance(slots, slice):
        store[:, slots] = x.transpose(0, 1)
    else:
        store.index_copy_(1, slots, x.transpose(0, 1))


def _load(store: torch.Tensor, slots: torch.Tensor | slice) -> torch.Tensor:
    return store[:, slots] if isinstance(slots, slice) else store.index_select(1, slots)
