"""Causal attention over one sequence's keys and values (`attend`), and the ring a sliding-window layer
keeps them in (`ring_store`: position p in slot p % size); the engine's paged cache and the
per-sequence cache (sequence_cache.py) both attend through these."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import library

MaskKey = tuple[int, int, int, int | None]


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
    return library.amx_for_tensor(q) if dim % 32 == 0 and dim <= 256 else None


def _mask(first: int, start: int, n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [n, L]: query position start+i sees key position first+j when it is not later (and is
    within the window)."""
    keys = torch.arange(first, start + n, device=device)[None, :]
    queries = torch.arange(start, start + n, device=device)[:, None]
    visible = keys <= queries
    return visible if window is None else visible & (keys > queries - window)
