"""Key/value cache and the attention over it.

Each sequence owns a contiguous cache of exactly the size it can reach
(prompt + max new tokens, capped by the context), so nothing grows or is
copied while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig


class SequenceCache:
    """K/V storage of one sequence: [layers, kv_heads, capacity, head_dim] each."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # tokens whose K/V are stored

    def truncate(self, length: int) -> None:
        """Forget everything from `length` on (e.g. rejected speculative tokens)."""
        self.length = min(self.length, length)


@dataclass
class Span:
    """The new tokens of one sequence inside a flat batch."""

    cache: SequenceCache
    start: int  # position of the first new token (= tokens already cached)
    length: int  # number of new tokens


class BatchAttention:
    """`model.AttentionBackend` for a flat batch of spans, each over its own `SequenceCache`."""

    def __init__(self, spans: list[Span]):
        self.spans = spans
        self.masks = [_causal_mask(s.start, s.length, s.cache.k.device) for s in spans]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, Dh], k/v: [T, Hkv, Dh] -> [T, H, Dh]"""
        outs = []
        offset = 0
        for span, mask in zip(self.spans, self.masks):
            end = span.start + span.length
            sl = slice(offset, offset + span.length)
            span.cache.k[layer, :, span.start : end] = k[sl].transpose(0, 1)
            span.cache.v[layer, :, span.start : end] = v[sl].transpose(0, 1)
            keys, values = span.cache.k[layer, :, :end], span.cache.v[layer, :, :end]  # [Hkv, end, Dh]
            out = _attention(q[sl], keys, values, mask, causal=span.start == 0)
            outs.append(out)
            offset += span.length
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def commit(self) -> None:
        """Record that the spans' tokens are now cached (call after the forward pass)."""
        for span in self.spans:
            span.cache.length = span.start + span.length


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q: [n, H, Dh] over k/v: [Hkv, L, Dh] -> [n, H, Dh]. Inputs are 4-D: CPU SDPA's fast kernels want them."""
    n, heads, dim = q.shape
    k, v = k.unsqueeze(0), v.unsqueeze(0)
    if n == 1:
        # One query sees every cached key: fold the query heads sharing a KV head into the
        # query axis ([1, Hkv, H/Hkv, Dh]), a plain attention with no mask and no KV repetition.
        out = F.scaled_dot_product_attention(q.view(1, k.shape[1], -1, dim), k, v)
        return out.view(1, heads, dim)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask, is_causal=mask is None and causal, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def _causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [n, start+n] mask for new tokens after a cached prefix; None where SDPA needs none."""
    if length == 1 or start == 0:
        return None  # a single query sees everything; a fresh prompt uses is_causal
    keys = torch.arange(start + length, device=device)
    queries = torch.arange(start, start + length, device=device)
    return keys[None, :] <= queries[:, None]
