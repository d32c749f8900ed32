"""seriatim's float32 logits equal transformers' on the same weights, prefill and every decode step.

Llama, Qwen2 and Gemma 3 (sliding window 8, so the chunks below run past it and through the ring
buffers of the sliding layers), from HF directories and GGUF files of every supported weight type.
"""

from __future__ import annotations

import pytest
import torch

from seriatim import LLM, SamplingParams
from seriatim.model.sequence_cache import SequenceCache
from support.parity import assert_logits_match, random_ids, reference
from support.tiny_models import GGUF_TYPES, NEW_FAMILY_TYPES, build_tiny


@pytest.fixture(scope="module")
def tiny_gemma3_variant(tmp_path_factory):
    """What the GGUF readers cannot express: a scalar other than head_dim, soft-capped logits, an untied head,
    per-type rotary bases and an explicit layer pattern (HF directory only)."""
    return build_tiny(
        tmp_path_factory.mktemp("tiny_gemma3_variant"), "gemma3", [], hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        final_logit_softcapping=3.0, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 300.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 7000.0}},
    )


@pytest.mark.parametrize("source", ["hf"] + GGUF_TYPES)
def test_logits_match_transformers(tiny_llama, source):
    # Prefill of 16, a cached chunk of 8 (masked attention over a prefix), then 16 single-token decodes.
    assert_logits_match(tiny_llama[0], source, [16, 8] + [1] * 16)


def test_greedy_matches_transformers_generate(tiny_llama):
    root, _ = tiny_llama
    llm = LLM(str(root / "Q8_0.gguf"), dtype="float32")
    ref = reference(root, "Q8_0")
    for seed in range(3):
        ids = torch.randint(3, llm.config.vocab_size, (5 + 4 * seed,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = ref.generate(ids[None], max_new_tokens=24, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(ids):].tolist()
        out = llm.generate(ids.tolist(), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        assert out.token_ids == expected
        assert out.finish_reason == "length"


def test_batched_greedy_equals_alone(tiny_llm):
    llm = tiny_llm
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, llm.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 17, 9, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        assert llm.generate(prompt, params)[0].token_ids == out.token_ids


@pytest.mark.parametrize("source", ["hf", "F32", "Q5_0", "mixed"])
def test_qwen2_logits_match_transformers(tiny_qwen2, source):
    assert_logits_match(tiny_qwen2, source)


@pytest.mark.parametrize("source", ["hf", *NEW_FAMILY_TYPES])
def test_gemma3_logits_match_transformers(tiny_gemma3, source):
    assert_logits_match(tiny_gemma3, source)


def test_gemma3_variant_logits_match_transformers(tiny_gemma3_variant):
    assert_logits_match(tiny_gemma3_variant, "hf")


def test_sliding_layers_keep_only_the_window(tiny_gemma3):
    llm = LLM(str(tiny_gemma3 / "F32.gguf"), dtype="float32")
    cache = SequenceCache(llm.config, 100, torch.float32, llm.device)
    assert [k.shape[1] for k in cache.k] == [8, 8, 8, 8, 8, 100]  # five sliding layers, then a global one


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
@pytest.mark.parametrize("max_step_tokens, max_running", [(512, 64), (4, 2)])
def test_engine_greedy_matches_transformers_past_the_window(family, max_step_tokens, max_running, request):
    """Through the engine's paged cache (Gemma's sliding layers: its rings) and batching: up to 30 + 24
    positions, several times the window; with a small step budget and two running at a time, prompt
    chunks wrap the rings and rings pass from one request to the next."""
    root = request.getfixturevalue(f"tiny_{family}")
    llm = LLM(str(root / "mixed.gguf"), dtype="float32", max_step_tokens=max_step_tokens, max_running=max_running)
    ref = reference(root, "mixed")
    prompts = [random_ids(llm, n, seed) for n, seed in ((5, 2), (11, 3), (30, 4))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            # An explicit mask: without one, transformers masks every prompt token equal to pad_token_id.
            expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == expected
