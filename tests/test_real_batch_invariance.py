"""Batch invariance on real models (SmolLM2-135M, Qwen2.5-Coder-0.5B), fast mode: the seeded request of the issue
that found the dependence, identical across runs with a warm prefix cache, through `stream`, and among 15
other requests with a small step budget."""

from __future__ import annotations

import pytest

from seriatim import LLM, SamplingParams
from seriatim.kernels import library
from seriatim.weights.registry import resolve_model

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(library.ops() is None, reason="batch invariance needs seriatim's kernels "
                                 "(ISA tier avx2 or above)")]

PROMPT = "中文:自回归模型一次生成一个"
PARAMS = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=60, seed=3, logprobs=1)
ANIMALS = ["cat", "dog", "king", "robot", "tree", "river", "wizard", "poet", "sailor", "child", "bird", "fox", "owl",
           "bear", "ant"]
OTHERS = [f"Story {i}: once upon a time there lived a {w}. " * (1 + i % 3) for i, w in enumerate(ANIMALS)]


def result(output) -> tuple:
    return output.token_ids, [(lp.logprob, lp.top) for lp in output.logprobs]


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_a_seeded_request_reproduces_bit_for_bit(name):
    try:
        path = str(resolve_model(name))
    except ValueError as e:
        pytest.skip(str(e))
    llm = LLM(path)
    first = result(llm.generate([PROMPT], PARAMS)[0])  # cold cache
    assert result(llm.generate([PROMPT], PARAMS)[0]) == first  # the prompt's blocks now come from the cache
    streamed = [delta for delta in llm.stream(PROMPT, PARAMS)]
    tokens = [t for delta in streamed for t in delta.token_ids]
    logprobs = [(lp.logprob, lp.top) for delta in streamed for lp in delta.logprobs or []]
    assert (tokens, logprobs) == first
    crowded = LLM(path, max_step_tokens=64)
    params = [SamplingParams(temperature=1.0, max_tokens=4 + i, seed=i) for i in range(len(OTHERS))]
    outs = crowded.generate(OTHERS[:7] + [PROMPT] + OTHERS[7:], params[:7] + [PARAMS] + params[7:])
    assert result(outs[7]) == first
