"""Attention over the paged pool: decodes batched into one padded call equal one call per sequence."""

from __future__ import annotations

import pytest
import torch

from seriatim.config import ModelConfig
from seriatim.paged_kv import PagedAttention, PagedKVCache, PagedSpan

CFG = ModelConfig(arch="llama", vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, context_length=256,
                  tie_word_embeddings=True)
BLOCK = 4


def _pass(batched: bool, window: int | None) -> torch.Tensor:
    """A pass mixing decodes of different lengths (scattered blocks) with a prompt chunk."""
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(CFG, num_blocks=64, block_size=BLOCK, dtype=torch.float32, device=torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    tables = {0: [5, 2, 9, 30], 1: [7], 2: [40, 41, 42, 43, 44, 12], 3: [20, 21]}
    lengths = {0: (14, 1), 1: (2, 1), 2: (21, 1), 3: (3, 5)}  # sequence: (cached, new)
    spans = [PagedSpan(start, new, cache.slots(tables[s], start, start + new), cache.slots(tables[s], 0, start + new))
             for s, (start, new) in lengths.items()]
    tokens = sum(new for _, new in lengths.values())
    q = torch.randn(tokens, CFG.num_heads, CFG.head_dim, generator=gen)
    k, v = (torch.randn(tokens, CFG.num_kv_heads, CFG.head_dim, generator=gen) for _ in range(2))
    backend = PagedAttention(cache, spans, batch_decodes=batched)
    assert (backend.decodes is not None) == batched
    return backend.attend(0, q, k, v, CFG.attn_scale, window)


@pytest.mark.parametrize("window", [None, 6])
def test_batched_decodes_equal_one_call_per_sequence(window):
    torch.testing.assert_close(_pass(True, window), _pass(False, window), rtol=1e-5, atol=1e-5)
