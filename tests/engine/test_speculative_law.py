"""Sampling with speculation keeps the law of plain sampling, in the engine, for every method: the joint law
of a request's first three tokens (top-k 3, so 27 outcomes whose exact probabilities the float32 reference
enumerates) against a chi-square test, with drafts verified at the second and third tokens; and again under a
grammar whose mask depends on the tokens before. A wrong residual rule must fail the same test: it has power."""

from __future__ import annotations

import copy
import math
import shutil
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from seriatim import LLM, SamplingParams
from seriatim.engine import speculation
from seriatim.grammar.constraint import Constraint
from seriatim.grammar.state import token_bitmask, unpack

TOP_K, SAMPLES = 3, 1500
PROMPT = [17, 90, 41, 17, 90, 41, 17, 90]
# Raises the prompt's tokens among the top 3, so that prompt lookup finds the sampled tokens in the prompt
# and drafts what followed them there, and some of those drafts are kept.
BIAS = {17: 5.0, 90: 5.0, 41: 5.0}


def methods(draft) -> dict[str, dict]:
    every_pass = {"k": 2, "max_step_rows": 1024, "adaptive": False}  # drafts at every pass of a full batch
    return {"ngram": {"method": "ngram", "min_n": 1, **every_pass},
            "lookahead": {"method": "lookahead", **every_pass},
            "draft": {"method": "draft", "model": str(draft), **every_pass}}


# At most two "/" in a row ('/' is token 17), then a long end no three tokens reach: the grammar's mask
# depends on the tokens before (drafts included), and no end of text among the first three tokens.
REGEX = "(/?/?[^/])*!#!#!#!#!#!#!#!#"


def exact_law(hf_model, grammar=None) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under top-k sampling at temperature 1, from the transformers model's float32 logits; with
    `grammar` (a fresh GrammarState), among the tokens it allows after each prefix."""
    law = {(): 1.0}
    for _ in range(3):
        longer = {}
        for prefix, p in law.items():
            with torch.no_grad():
                logits = hf_model(torch.tensor([PROMPT + list(prefix)])).logits[0, -1].double()
            for token, bias in BIAS.items():
                logits[token] += bias
            if grammar is not None:
                for token in prefix:
                    grammar.accept(token)
                logits[~unpack(token_bitmask([grammar]), len(logits))[0]] = -math.inf
                grammar.rollback(len(prefix))
            top = logits.topk(TOP_K)
            for token, q in zip(top.indices.tolist(), top.values.softmax(-1).tolist()):
                longer[(*prefix, token)] = p * q
        law = longer
    return law


def chi_square_pvalue(llm: LLM, law: dict[tuple[int, ...], float], regex: str | None = None) -> float:
    ends = dict(max_tokens=3, regex=regex) if regex else dict(max_tokens=4, ignore_eos=True)
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, logit_bias=BIAS, seed=s, **ends) for s in range(SAMPLES)]
    seen = Counter(tuple(o.token_ids[:3]) for o in llm.generate([PROMPT] * SAMPLES, params))
    assert set(seen) <= set(law)
    # Outcomes expected fewer than 5 times share one bin: the chi-square approximation needs counts.
    common = [x for x in law if SAMPLES * law[x] >= 5]
    rare = [x for x in law if x not in common]
    observed = [seen[x] for x in common] + [sum(seen[x] for x in rare)]
    return chisquare(observed, [SAMPLES * law[x] for x in common] + [SAMPLES * sum(law[x] for x in rare)]).pvalue


@pytest.fixture(scope="module")
def law(tiny_llama):
    return exact_law(tiny_llama[1])


@pytest.fixture(scope="module")
def constrained_law(tiny_llama):
    grammar = LLM(str(tiny_llama[0] / "hf"), dtype="float32").engine.grammars.state(Constraint.of("regex", REGEX))
    return exact_law(tiny_llama[1], grammar)


@pytest.fixture(scope="module")
def near_draft(tiny_llama, tmp_path_factory):
    """The tiny Llama with noise added to its weights: a draft whose distributions are near the model's, so
    that its drafts are kept at some positions and rejected at others."""
    path = tmp_path_factory.mktemp("near_draft")
    model = copy.deepcopy(tiny_llama[1])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.5)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama[0] / "hf" / name, path / name)
    return path


@pytest.mark.parametrize("method", ["ngram", "lookahead", "draft"])
def test_sampled_tokens_keep_the_law_of_plain_sampling(tiny_llama, near_draft, law, method):
    llm = LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative=methods(near_draft)[method])
    assert chi_square_pvalue(llm, law) > 1e-3
    assert llm.engine.stats.drafted > SAMPLES  # drafts were verified


@pytest.mark.parametrize("method", ["ngram", "lookahead", "draft"])
def test_a_wrong_residual_fails_the_same_test(tiny_llama, near_draft, law, method, monkeypatch):
    """Drawing a rejected position's token from the target's distribution itself, not from what the draft
    under-proposed, over-weights the drafted tokens."""
    monkeypatch.setattr(speculation, "_residual", lambda p, q: p)
    llm = LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative=methods(near_draft)[method])
    assert chi_square_pvalue(llm, law) < 1e-6


@pytest.mark.parametrize("method", ["ngram", "lookahead", "draft"])
def test_constrained_sampled_tokens_keep_the_law_of_plain_sampling(tiny_llama, near_draft, constrained_law, method):
    """Under a grammar whose mask follows the drafts: a draft model draws each draft under the grammar as the
    drafts before it leave it; lookups are cut to what it allows."""
    llm = LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative=methods(near_draft)[method])
    assert chi_square_pvalue(llm, constrained_law, REGEX) > 1e-3
    assert llm.engine.stats.drafted > SAMPLES // 2


def test_a_wrong_residual_fails_the_constrained_test(tiny_llama, near_draft, constrained_law, monkeypatch):
    monkeypatch.setattr(speculation, "_residual", lambda p, q: p)
    llm = LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative=methods(near_draft)["draft"])
    assert chi_square_pvalue(llm, constrained_law, REGEX) < 1e-6


def test_the_plain_engine_passes_it_too(tiny_llama, law, constrained_law):
    """The reference for the test itself: plain sampling, no speculation."""
    plain = LLM(str(tiny_llama[0] / "hf"), dtype="float32")
    assert chi_square_pvalue(plain, law) > 1e-3
    assert chi_square_pvalue(plain, constrained_law, REGEX) > 1e-3
