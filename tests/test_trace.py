"""SamplingParams.trace: each token's processed probabilities, the cut that removed each alternative, and the
entropies; and every delta's forward pass (index, time, tokens fed)."""

from __future__ import annotations

import math

import pytest
import torch

from seriatim import SamplingParams
from seriatim.errors import ParameterError
from seriatim.sampling import SamplingState, process_logits, trace_step

VOCAB = 64


def traced(params: SamplingParams, logits: torch.Tensor, ids: list[int], grammar=None):
    return trace_step(logits, SamplingState(params, [1], VOCAB, "cpu", grammar), ids)


@pytest.mark.parametrize("kw, cut, kept", [
    (dict(top_k=3), "top_k", 3),
    (dict(top_p=0.5), "top_p", None),
    (dict(min_p=0.2), "min_p", None),
    (dict(temperature=0.0), "greedy", 1),
    (dict(top_k=5, top_p=0.3), "top_p", None),
])
def test_each_alternative_is_kept_or_removed_by_its_cut(kw, cut, kept):
    logits = torch.linspace(4, -4, VOCAB)  # token i is the i-th most likely
    params = SamplingParams(**{"temperature": 1.0, **kw})
    ids = list(range(VOCAB))
    trace = traced(params, logits, ids)
    exact = process_logits(logits, SamplingState(params, [1], VOCAB, "cpu"))
    removed = [t for t in ids if trace.tokens[t][1] is not None]
    assert all(trace.tokens[t][1] == cut for t in removed if t < 5) and removed
    for t in ids:
        logprob, by = trace.tokens[t]
        assert math.isclose(logprob, float(exact[t]), abs_tol=1e-5) or logprob == float(exact[t]) == -math.inf
        assert (by is None) == (logprob > -math.inf)
    if kept is not None:
        assert len(ids) - len(removed) == kept
    p = logits.softmax(-1)
    assert math.isclose(trace.entropy, float(-(p * p.log()).sum()), rel_tol=1e-5)
    assert trace.processed_entropy < trace.entropy


def test_top_k_wins_over_later_cuts_and_the_grammar_over_all(tiny_llm):
    logits = torch.linspace(4, -4, tiny_llm.config.vocab_size)
    params = SamplingParams(temperature=1.0, top_k=1, min_p=0.99, choice=["ab", "ba"])  # both cut the second
    grammar = tiny_llm.engine.grammars.state(params.constraint)
    state = SamplingState(params, [1], tiny_llm.config.vocab_size, "cpu", grammar)
    allowed = [t for t in range(tiny_llm.config.vocab_size) if grammar.matcher.deep_copy().consume_token(t)]
    trace = trace_step(logits, state, list(range(10)) + allowed)
    assert all(trace.tokens[t][1] == "grammar" for t in range(10) if t not in allowed)
    survivors = [t for t in allowed if trace.tokens[t][1] is None]
    assert len(survivors) == 1 and {trace.tokens[t][1] for t in allowed} == {None, "top_k"}


def test_generated_tokens_carry_traces_and_their_pass(tiny_llm):
    params = SamplingParams(temperature=0.8, top_k=5, seed=1, max_tokens=6, ignore_eos=True, logprobs=4, trace=True)
    prompt = tiny_llm.tokenizer.encode("trace me")
    deltas = list(tiny_llm.stream(prompt, params))
    lps = [lp for d in deltas for lp in d.logprobs]
    assert len(lps) == 6
    for lp in lps:
        assert set(lp.trace.tokens) == {lp.token_id, *(t for t, _ in lp.top)}
        assert lp.trace.tokens[lp.token_id][1] is None  # the drawn token survived every cut
    passes = [d.forward_pass for d in deltas]
    assert passes[0].tokens == len(prompt) and all(p.tokens == 1 for p in passes[1:])
    assert [p.index for p in passes] == list(range(passes[0].index, passes[0].index + 6))
    assert all(p.seconds > 0 for p in passes)


def test_trace_needs_logprobs():
    with pytest.raises(ParameterError, match="trace needs logprobs"):
        SamplingParams(trace=True)
