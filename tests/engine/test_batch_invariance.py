"""Batch invariance in the fast mode: a request's tokens and log-probabilities, bit for bit, whatever shares its
steps, however its prompt is chunked, whichever of its blocks the prefix cache held, and whether its tokens
came one pass each or several per pass."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seriatim import LLM, SamplingParams
from seriatim.kernels import library
from support.parity import refeed

needs_kernels = pytest.mark.skipif(library.ops() is None, reason="batch invariance needs seriatim's kernels "
                                   "(ISA tier avx2 or above); without them the fast mode is float32 tensor ops")

LLAMA_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
QWEN2_TYPES = ["Q4_K", "Q5_0", "Q6_K", "mixed"]
GEMMA3_TYPES = ["Q8_0", "Q4_K"]  # sliding-window layers (window 8): no prefix caching, rings per sequence
PROMPT = [5, 9, 11, 40, 41, 42, 43, 44, 45, 46, 7, 100, 3, 17, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71]
PARAMS = [  # greedy, and seeded sampling with the full processor chain
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.9, top_p=0.95, top_k=50, min_p=0.02, repetition_penalty=1.1, max_tokens=24,
                   ignore_eos=True, seed=3, logprobs=2),
]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def result(output) -> tuple:
    return output.token_ids, [(lp.logprob, lp.top) for lp in output.logprobs]


def others(count: int, seed: int) -> list[list[int]]:
    """Other requests' prompts: lengths 1 to 40, so steps mix prefills, chunks and decodes."""
    return [[(seed * 31 + i * 7 + j * 13) % 300 + 3 for j in range(1 + (seed + i * 11) % 40)] for i in range(count)]


@functools.cache
def alone(path: str, which: int) -> tuple:
    """The request alone in a fresh engine: one prefill pass, then one pass per token."""
    return result(LLM(path, prefix_caching=False).generate([PROMPT], PARAMS[which])[0])


def model_path(request, family: str, source: str) -> str:
    root = request.getfixturevalue(f"tiny_{family}")
    root = root[0] if family == "llama" else root
    return str(root / f"{source}.gguf")


@needs_kernels
@pytest.mark.parametrize("family, source", [("llama", t) for t in LLAMA_TYPES] + [("qwen2", t) for t in QWEN2_TYPES]
                         + [("gemma3", t) for t in GEMMA3_TYPES])
@SETTINGS
@given(crowd=st.sampled_from([0, 1, 15, 63]), budget=st.sampled_from([16, 64, 512]), warm=st.integers(0, 2),
       which=st.integers(0, 1), seed=st.integers(0, 1000))
def test_a_request_is_computed_alike_in_any_company(request, family, source, crowd, budget, warm, which, seed):
    """`warm`: 0 a cold cache, 1 the prompt's first block cached by an earlier request, 2 the whole prompt
    cached (a repeated request). The request sits among `crowd` others, submitted together."""
    path = model_path(request, family, source)
    llm = LLM(path, max_step_tokens=budget, max_running=64)
    if warm:
        llm.generate([PROMPT[:16] + [250] if warm == 1 else PROMPT], SamplingParams(max_tokens=1))
    prompts = others(crowd, seed)
    at = seed % (crowd + 1)
    params = [SamplingParams(temperature=1.0, max_tokens=1 + i % 9, seed=i) for i in range(crowd)]
    outs = llm.generate(prompts[:at] + [PROMPT] + prompts[at:], params[:at] + [PARAMS[which]] + params[at:])
    assert result(outs[at]) == alone(path, which)


@needs_kernels
@pytest.mark.parametrize("source", ["Q4_1", "Q8_0", "BF16"])
@SETTINGS
@given(decoded=st.integers(1, 20), chunk=st.integers(2, 16), which=st.integers(0, 1))
def test_several_tokens_of_a_sequence_in_one_pass_equal_one_per_pass(tiny_llama, source, decoded, chunk, which):
    """A sequence's last `chunk` tokens fed again in one pass (the shape a speculative verification takes)
    give the next token the log-probabilities its plain decode gave."""
    path = str(tiny_llama[0] / f"{source}.gguf")
    chunk = min(chunk, len(PROMPT) + decoded - 1)
    llm = LLM(path, prefix_caching=False)
    seq = refeed(llm, PROMPT, PARAMS[0], decoded=decoded, chunk=chunk)
    tokens, logprobs = alone(path, 0)
    assert seq.output_ids == tokens[: decoded + 1]
    assert (seq.logprobs[decoded].logprob, seq.logprobs[decoded].top) == logprobs[decoded]
    llm.engine.abort(seq.request_id)


@needs_kernels
@pytest.mark.parametrize("source", ["Q4_1", "Q8_0"])
def test_speculative_greedy_decoding_is_token_for_token_plain_decoding(tiny_llama, source):
    """Prompt lookup drafts (accepted and rejected) verified several per pass in the fast mode, twelve
    requests at once: the greedy tokens each gives alone, one pass per token."""
    path = str(tiny_llama[0] / f"{source}.gguf")
    llm = LLM(path, speculative={"method": "ngram", "k": 4, "max_step_rows": 64})
    words = llm.tokenizer.encode("one two three four five " * 4)
    phrases = [others(1, seed)[0][: 3 + seed % 4] * (1 + seed % 3) for seed in range(11)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(path, prefix_caching=False)
    expected = [plain.generate([p], params)[0].token_ids for p in [words, *phrases]]
    got = [o.token_ids for o in llm.generate([words, *phrases], params)]
    assert got == expected
    assert 0 < llm.engine.stats.accepted < llm.engine.stats.drafted


@pytest.mark.skipif(not library.bf16_matmul(), reason="below the avx512 tier every row count takes the vector "
                                                      "kernels, invariant or not")
def test_without_invariance_long_chunks_take_other_products(tiny_llama):
    """The opt-out is real: batch_invariant=False lets a long prefill expand the weights for a dense matmul."""
    llm = LLM(str(tiny_llama[0] / "Q4_1.gguf"), batch_invariant=False)
    qkv = llm.model.layers[0].attn.qkv
    assert not qkv.batch_invariant and qkv.product(512) != qkv.product(1)
    assert LLM(str(tiny_llama[0] / "Q4_1.gguf")).model.layers[0].attn.qkv.batch_invariant
