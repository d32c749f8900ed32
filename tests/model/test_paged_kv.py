"""Attention over the engine's cache: decodes batched into one padded call equal one call per sequence;
sliding-window layers in bounded rings equal the reference attention over every position."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seriatim.kernels import library
from seriatim.model.attention import attend, flash_kernel
from seriatim.model.config import ModelConfig
from seriatim.model.paged_kv import ROLLBACK, PagedAttention, PagedKVCache, PagedSpan
from support.parity import refeed

CFG = ModelConfig(arch="llama", vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, context_length=256,
                  tie_word_embeddings=True)
BLOCK = 4


def _pass(batched: bool, dtype: torch.dtype = torch.float32, decodes_only: bool = False) -> torch.Tensor:
    """A pass mixing decodes of different lengths (scattered blocks) with a prompt chunk."""
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(CFG, num_blocks=64, block_size=BLOCK, dtype=dtype, device=torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    tables = {0: [5, 2, 9, 30], 1: [7], 2: [40, 41, 42, 43, 44, 12], 3: [20, 21]}
    lengths = {0: (14, 1), 1: (2, 1), 2: (21, 1), 3: (3, 5)}  # sequence: (cached, new)
    if decodes_only:
        lengths = {0: (14, 1)}
    spans = [PagedSpan(start, new, cache.slots(tables[s], start, start + new), cache.slots(tables[s], 0, start + new))
             for s, (start, new) in lengths.items()]
    tokens = sum(new for _, new in lengths.values())
    q = torch.randn(tokens, CFG.num_heads, CFG.head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(tokens, CFG.num_kv_heads, CFG.head_dim, generator=gen).to(dtype) for _ in range(2))
    backend = PagedAttention(cache, spans, batch_decodes=batched)
    kernel = library.for_tensor(cache.k) is not None
    assert (backend.decodes is not None) == (batched and (kernel or not decodes_only))
    return backend.attend(0, q, k, v, CFG.attn_scale, None)


def test_batched_decodes_equal_one_call_per_sequence():
    torch.testing.assert_close(_pass(True), _pass(False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decodes_only", [False, True])
def test_bfloat16_decodes_by_the_kernel_equal_sdpa(decodes_only):
    """In bfloat16 on the CPU, decodes go to seriatim's decode-attention kernel (a lone one too)."""
    got, expected = _pass(True, torch.bfloat16, decodes_only), _pass(False, torch.bfloat16, decodes_only)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    if library.for_tensor(got) is not None:
        assert not torch.equal(got, expected)  # a different path (float32 inside, one rounding)


def _prompts_pass(batched: bool, dtype: torch.dtype = torch.float32,
                  cfg: ModelConfig = CFG) -> tuple[PagedAttention, torch.Tensor, PagedKVCache]:
    """Two decodes, three whole prompts of 5 tokens side by side, one of 3, and a chunk continuing a prompt."""
    gen = torch.Generator().manual_seed(1)
    cache = PagedKVCache(cfg, num_blocks=64, block_size=BLOCK, dtype=dtype, device=torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    seqs = [([5, 2], 6, 1), ([10, 11], 0, 5), ([13, 3], 0, 5), ([20, 22], 0, 5), ([30], 0, 3), ([40, 41], 4, 3),
            ([50, 51], 5, 1)]
    spans = [PagedSpan(start, new, cache.slots(t, start, start + new), cache.slots(t, 0, start + new))
             for t, start, new in seqs]
    tokens = sum(new for *_, new in seqs)
    q = torch.randn(tokens, cfg.num_heads, cfg.head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(tokens, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(dtype) for _ in range(2))
    backend = PagedAttention(cache, spans, batch_decodes=batched)
    return backend, backend.attend(0, q, k, v, cfg.attn_scale, None), cache


def test_whole_prompts_of_one_length_attend_in_one_call_as_one_by_one():
    batched, got, cache = _prompts_pass(True)
    assert batched.decodes is not None  # the two decodes attend together, around the prompts
    assert [[sl.start for sl, _ in part] for part in batched.parts] == [[1, 6, 11], [16], [19]]
    _, expected, reference_cache = _prompts_pass(False)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(cache.k, reference_cache.k) and torch.equal(cache.v, reference_cache.v)


def test_whole_prompts_in_bfloat16_with_the_decode_kernel_around_them():
    _, got, cache = _prompts_pass(True, torch.bfloat16)
    _, expected, reference_cache = _prompts_pass(False, torch.bfloat16)
    prompts = slice(1, 22)  # the same SDPA arithmetic on the prompts; the decodes may take the kernel
    torch.testing.assert_close(got[prompts], expected[prompts], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(cache.k, reference_cache.k) and torch.equal(cache.v, reference_cache.v)


@pytest.mark.skipif(flash_kernel(torch.zeros(1, 64, dtype=torch.bfloat16)) is None, reason="needs AMX")
def test_prompts_by_the_prefill_kernel_equal_float32():
    """With 64-dim heads in bfloat16 on AMX, the whole prompts side by side and the continued chunk attend
    by seriatim's prefill kernel (the decodes by the decode kernel): the float32 result to bfloat16's
    precision."""
    cfg = dataclasses.replace(CFG, hidden_size=256, head_dim=64)
    _, got, _ = _prompts_pass(True, torch.bfloat16, cfg)
    _, expected, _ = _prompts_pass(False, torch.float32, cfg)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


SLIDING = dataclasses.replace(CFG, num_layers=2, sliding_window=6, sliding_layers=(True, False))


def test_sliding_layers_use_bounded_rings_not_the_pool():
    cache = PagedKVCache(SLIDING, num_blocks=64, block_size=BLOCK, dtype=torch.float32,
                         device=torch.device("cpu"), max_sequences=3)
    assert cache.k.shape[0] == 1  # only the global layer is pooled
    assert cache.ring_k.shape == (3, 1, SLIDING.num_kv_heads, 6 + ROLLBACK, SLIDING.head_dim)
    assert PagedKVCache.bytes_per_token(SLIDING, torch.float32) == PagedKVCache.bytes_per_token(CFG, torch.float32)


def test_ring_attention_equals_attention_over_every_position():
    """One sequence fed in chunks (past the window, a chunk longer than the ring, single decodes, and a
    rollback of rejected tokens) through a ring: each output equals masked attention over all positions."""
    gen = torch.Generator().manual_seed(1)
    cache = PagedKVCache(SLIDING, num_blocks=64, block_size=BLOCK, dtype=torch.float32, device=torch.device("cpu"))
    total = 60
    q = torch.randn(total, CFG.num_heads, CFG.head_dim, generator=gen)
    k, v = (torch.randn(total, CFG.num_kv_heads, CFG.head_dim, generator=gen) for _ in range(2))
    window = SLIDING.sliding_window
    steps = [(0, 3), (3, 5), (8, 1), (9, 1), (10, 30), (40, 4), (44, 1), (45, 1), (46, 1)]
    steps += [(44, 3), (47, 13)]  # three rejected positions fed again, then the rest
    for start, n in steps:
        span = PagedSpan(start, n, slice(0, 0), slice(0, 0), cache.ring_of(0))
        got = PagedAttention(cache, [span]).attend(0, q[start : start + n], k[start : start + n],
                                                   v[start : start + n], SLIDING.attn_scale, window)
        expected = attend(q[start : start + n], k[: start + n].transpose(0, 1), v[: start + n].transpose(0, 1),
                          start, SLIDING.attn_scale, window, {})
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(library.ops() is None, reason="needs seriatim's kernels (ISA tier avx2 or above)")
def test_a_short_chunk_after_cached_tokens_computes_what_decoding_them_did(tiny_llama, tier, monkeypatch):
    """Fed again as one pass (as a speculative verification is), the last 4 tokens of a sequence give the
    next token's logits bit for bit as decoding them one at a time did: their attention is the decode
    kernel's, and at the avx512 tier every product sums a row alike whatever the rows beside it."""
    from seriatim import LLM, SamplingParams
    from seriatim.model import paged_kv

    tier("avx512")
    chunks = []
    of = paged_kv.DecodeBatch.of.__func__
    monkeypatch.setattr(paged_kv.DecodeBatch, "of",
                        classmethod(lambda cls, spans, device: chunks.append([s.length for _, s in spans])
                                    or of(cls, spans, device)))
    llm = LLM(str(tiny_llama[0] / "Q4_1.gguf"), prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    alone = llm.generate([5, 9, 11, 40], params)[0]
    seq = refeed(llm, [5, 9, 11, 40], params, decoded=6, chunk=4)
    assert chunks[-1] == [4]  # the refed tokens attended as four queries of the decode kernel
    assert seq.output_ids == alone.token_ids[:7]
    assert (seq.logprobs[6].logprob, seq.logprobs[6].top) == (alone.logprobs[6].logprob, alone.logprobs[6].top)
    llm.engine.abort(seq.request_id)
