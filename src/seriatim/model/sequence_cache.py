"""A plain per-sequence KV cache for work outside the engine (scoring.py: perplexity, prompt logprobs;
the parity tests): contiguous and of exactly the size its text needs. A sliding-window layer keeps
only its last `window` positions, in a ring."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import MaskKey, attend, ring_store
from .config import ModelConfig


class SequenceCache:
    """K/V storage of one sequence: per layer [kv_heads, size, head_dim] each, where size is the capacity,
    or for a sliding layer the smaller of capacity and window (a ring once positions pass it)."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        sizes = [min(capacity, cfg.layer_window(i) or capacity) for i in range(cfg.num_layers)]
        self.k = [torch.empty(cfg.num_kv_heads, n, cfg.head_dim, dtype=dtype, device=device) for n in sizes]
        self.v = [torch.empty(cfg.num_kv_heads, n, cfg.head_dim, dtype=dtype, device=device) for n in sizes]

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the K/V of positions [start, start + n) (k/v: [n, Hkv, Dh]); return the keys and values the
        queries of those positions attend over ([Hkv, L, Dh]), at positions [start + n - L, start + n)."""
        return ring_store(self.k[layer], start, k), ring_store(self.v[layer], start, v)


@dataclass
class Span:
    """The new tokens of one sequence inside a flat batch."""

    cache: SequenceCache
    start: int  # position of the first new token (= tokens already cached)
    length: int  # number of new tokens


@dataclass
class BatchAttention:
    """`model.AttentionBackend` for a flat batch of spans, each over its own `SequenceCache`."""

    spans: list[Span]
    masks: dict[MaskKey, torch.Tensor] = field(default_factory=dict)  # shared by the layers of one pass

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: [T, H, Dh], k/v: [T, Hkv, Dh] -> [T, H, Dh]"""
        outs = []
        offset = 0
        for span in self.spans:
            sl = slice(offset, offset + span.length)
            keys, values = span.cache.store(layer, span.start, k[sl], v[sl])
            outs.append(attend(q[sl], keys, values, span.start, scale, window, self.masks))
            offset += span.length
        return outs[0] if len(outs) == 1 else torch.cat(outs)
