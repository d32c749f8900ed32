"""The engine's KV cache: one pool of blocks for all sequences, and the attention over it.

Storage is [layers][kv_heads, num_blocks * block_size, head_dim]: a position's
"slot" is block * block_size + offset, so one sequence's keys are gathered
with a single index_select, or taken as a plain view when its blocks happen
to be consecutive (the common case for a lone request).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """`model.AttentionBackend` over a `PagedKVCache` for a flat batch of spans."""

    def __init__(self, cache: PagedKVCache, spans: list[PagedSpan]):
        self.cache = cache
        self.spans = spans
        self.masks: dict[MaskKey, torch.Tensor] = {}  # shared by the layers of one pass

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: [T, H, Dh], k/v: [T, Hkv, Dh] -> [T, H, Dh]. A sliding layer still stores every position
        here; `attend` masks (or, for one query, drops) the keys outside its window."""
        k_store, v_store = self.cache.k[layer], self.cache.v[layer]  # [Hkv, slots, Dh]
        outs = []
        offset = 0
        for span in self.spans:
            sl = slice(offset, offset + span.length)
            _store(k_store, span.write, k[sl])
            _store(v_store, span.write, v[sl])
            keys, values = _load(k_store, span.read), _load(v_store, span.read)
            outs.append(attend(q[sl], keys, values, span.start, scale, window, self.masks))
            offset += span.length
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _store(store: torch.Tensor, slots: torch.Tensor | slice, x: torch.Tensor) -> None:
    """x: [n, Hkv, Dh] into store[:, slots]"""
    if isinstance(slots, slice):
        store[:, slots] = x.transpose(0, 1)
    else:
        store.index_copy_(1, slots, x.transpose(0, 1))


def _load(store: torch.Tensor, slots: torch.Tensor | slice) -> torch.Tensor:
    return store[:, slots] if isinstance(slots, slice) else store.index_select(1, slots)
