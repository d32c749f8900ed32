"""seriatim's float32 logits equal transformers' on the same weights, prefill and every decode step."""

from __future__ import annotations

import pytest
import torch

from seriatim import LLM, SamplingParams
from seriatim.kv_cache import BatchAttention, SequenceCache, Span

from tiny_models import GGUF_TYPES

REL_TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference(root, source: str):
    """transformers' model on the same file (its GGUF loader dequantizes to float32)."""
    from transformers import AutoModelForCausalLM

    if source == "hf":
        return AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(root, gguf_file=f"{source}.gguf", dtype=torch.float32).eval()


def run_chunks(llm: LLM, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Feed `ids` through seriatim in chunks (first = prefill, then cached steps); logits at every position."""
    cache = SequenceCache(llm.config, len(ids), torch.float32, llm.device)
    out, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            backend = BatchAttention([Span(cache, start, n)])
            hidden = llm.model(torch.tensor(ids[start : start + n]), torch.arange(start, start + n), backend)
            backend.commit()
            out.append(llm.model.logits(hidden))
            start += n
    return torch.cat(out)


@pytest.mark.parametrize("source", ["hf"] + GGUF_TYPES)
def test_logits_match_transformers(tiny_llama, source):
    root, _ = tiny_llama
    llm = LLM(str(root / "hf") if source == "hf" else str(root / f"{source}.gguf"), dtype="float32")
    ref = reference(root, source)
    ids = torch.randint(0, llm.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    # Prefill of 16, a cached chunk of 8 (masked attention over a prefix), then 16 single-token decodes.
    got = run_chunks(llm, ids, [16, 8] + [1] * 16)
    for pos in range(len(ids)):
        assert rel_err(got[pos], expected[pos]) <= REL_TOL, f"position {pos}"


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
