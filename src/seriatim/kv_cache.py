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
            out = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1),  # [H, n, Dh]
                span.cache.k[layer, :, :end],  # [Hkv, end, Dh]
                span.cache.v[layer, :, :end],
                attn_mask=mask,
                is_causal=mask is None and span.start == 0 and span.length > 1,
                enable_gqa=True,
            )
            outs.append(out.transpose(0, 1))
            offset += span.length
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def commit(self) -> None:
        """Record that the spans' tokens are now cached (call after the forward pass)."""
        for span in self.spans:
            span.cache.length = span.start + span.length


def _causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [n, start+n] mask for new tokens after a cached prefix; None where SDPA needs none."""
    if length == 1 or start == 0:
        return None  # a single query sees everything; a fresh prompt uses is_causal
    keys = torch.arange(start + length, device=device)
    queries = torch.arange(start, start + length, device=device)
    return keys[None, :] <= queries[:, None]
