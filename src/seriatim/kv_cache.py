"""Attention over a sequence's keys and values (`attend`, used by the engine's paged cache too), and a
plain per-sequence cache for work outside the engine (scoring.py: perplexity, prompt logprobs).

A `SequenceCache` is contiguous and of exactly the size its text needs. A sliding-window layer keeps
only its last `window` positions, in a ring: position p lives in slot p % window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .config import ModelConfig

MaskKey = tuple[int, int, int, int | None]


class SequenceCache:
    """K/V storage of one sequence: per layer [kv_heads, size, head_dim] each, where size is the capacity,
    or for a sliding layer the smaller of capacity and window (a ring once positions pass it)."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        sizes = [min(capacity, cfg.layer_window(i) or capacity) for i in range(cfg.num_layers)]
        self.k = [torch.empty(cfg.num_kv_heads, n, cfg.head_dim, dtype=dtype, device=device) for n in sizes]
        self.v = [torch.empty(cfg.num_kv_heads, n, cfg.head_dim, dtype=dtype, device=device) for n in sizes]
        self.capacity = capacity
        self.length = 0  # tokens whose K/V are stored

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the K/V of positions [start, start + n) (k/v: [n, Hkv, Dh]); return the keys and values the
        queries of those positions attend over ([Hkv, L, Dh]), at positions [start + n - L, start + n)."""
        return ring_store(self.k[layer], start, k), ring_store(self.v[layer], start, v)


def ring_store(ring: torch.Tensor, start: int, x: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """x: [n, Hkv, Dh] into ring [Hkv, size, Dh] at slots p % size; the keys the new queries see, in
    position order up to the last. A ring may be larger than the `window` its queries see (the
    engine's keep a margin so rejected speculative tokens can be rolled back)."""
    size, n = ring.shape[1], x.shape[0]
    window = window or size
    end = start + n
    if end <= size:  # no wrap yet: slot = position
        ring[:, start:end] = x.transpose(0, 1)
        return ring[:, :end]
    if n == 1 and window == size:  # one query: overwrite the oldest slot; the ring is its window (order is irrelevant)
        ring[:, start % size] = x[0]
        return ring
    # The old window in position order, then the new positions (whose earlier queries still need the
    # old keys its later positions will overwrite); only then write the last `size` new positions.
    old = ring.index_select(1, torch.arange(max(0, start - window), start, device=ring.device) % size)
    keep = min(n, size)
    ring.index_copy_(1, torch.arange(end - keep, end, device=ring.device) % size, x[n - keep :].transpose(0, 1))
    return torch.cat([old, x.transpose(0, 1)], dim=1)


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

    def commit(self) -> None:
        """Record that the spans' tokens are now cached (call after the forward pass)."""
        for span in self.spans:
            span.cache.length = span.start + span.length


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, window: int | None,
    masks: dict[MaskKey, torch.Tensor],
) -> torch.Tensor:
    """Causal attention of q: [n, H, Dh] at positions [start, start + n) over k/v: [Hkv, L, Dh] at positions
    [start + n - L, start + n), seeing only the last `window` positions if given -> [n, H, Dh].
    `masks` memoises the masks across the layers of a pass. Inputs are 4-D: CPU SDPA's fast kernels want them."""
    n, heads, dim = q.shape
    first = start + n - k.shape[1]  # position of the first key
    if window is not None and first < start - window + 1:  # drop the keys no query can see any more
        drop = start - window + 1 - first
        k, v, first = k[:, drop:], v[:, drop:], first + drop
    if n > 1 and (ops := flash_kernel(q)) is not None:
        return ops.prefill_attention(q[None], k[None], v[None], start, first, window or 0, scale)[0]
    k, v = k.unsqueeze(0), v.unsqueeze(0)
    if n == 1:
        # One query sees every remaining key: fold the query heads sharing a KV head into the
        # query axis ([1, Hkv, H/Hkv, Dh]), a plain attention with no mask and no KV repetition.
        out = F.scaled_dot_product_attention(q.view(1, k.shape[1], -1, dim), k, v, scale=scale)
        return out.reshape(1, heads, dim)
    plain_causal = first == start and (window is None or n <= window)  # SDPA's own causal mask is exact
    key = (first, start, n, window)
    if not plain_causal and key not in masks:
        masks[key] = _mask(first, start, n, window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=None if plain_causal else masks[key],
        is_causal=plain_causal, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def flash_kernel(q: torch.Tensor) -> object | None:
    """seriatim's kernels where their prefill attention (csrc/prefill_attention.cpp, ~1.5x torch's flash
    attention) serves queries like q: bfloat16 on a CPU with AMX, head size a multiple of 32 up to 256."""
    dim = q.shape[-1]
    return cpu_kernels.amx_for_tensor(q) if dim % 32 == 0 and dim <= 256 else None


def _mask(first: int, start: int, n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [n, L]: query position start+i sees key position first+j when it is not later (and is
    within the window)."""
    keys = torch.arange(first, start + n, device=device)[None, :]
    queries = torch.arange(start, start + n, device=device)[:, None]
    visible = keys <= queries
    return visible if window is None else visible & (keys > queries - window)
