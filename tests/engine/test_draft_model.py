"""Speculation by a draft model (engine/draft.py): a tiny Qwen2 drafts for a tiny Llama (same tokenizer, other
weights and architecture). Greedy output identical to plain decoding, token for token, in the float32
reference and the fast mode, with EOS, stop strings, max_tokens, preemption and batches mixing speculating and
plain requests; every draft kept when the model drafts for itself; the draft's cache freed as requests end;
pairs that cannot work refused at load."""

from __future__ import annotations

import pytest

from seriatim import LLM, SamplingParams
from seriatim.engine.draft import DraftModel
from support.speculation import REPEAT, prompts
from support.tiny_models import make_hf_llama


def drafting(draft_path, **kw) -> dict:
    # Not adaptive, and a row budget for a whole batch: every pass drafts, so every test verifies drafts.
    return {"method": "draft", "model": str(draft_path), "k": 4, "max_step_rows": 64, "adaptive": False, **kw}


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen2):
    return tiny_llama[0], tiny_qwen2


@pytest.fixture(scope="module")
def pair(models):
    target, draft = models
    return LLM(str(target / "hf"), dtype="float32"), LLM(str(target / "hf"), dtype="float32",
                                                          speculative=drafting(draft / "hf"))


@pytest.mark.parametrize("kw", [
    dict(max_tokens=40, ignore_eos=True),
    dict(max_tokens=7, ignore_eos=True),  # max_tokens falls inside a drafted run
    dict(max_tokens=60),  # EOS may be drafted
    dict(max_tokens=40, stop=["three", "\n"], ignore_eos=True),
])
def test_greedy_output_is_plain_decodings(pair, kw):
    plain, spec = pair
    params = SamplingParams(temperature=0, **kw)
    ps = prompts(plain, 12)
    before = spec.engine.stats.drafted
    got = spec.generate(ps, params)
    expected = plain.generate(ps, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.text for o in got] == [o.text for o in expected]
    assert spec.engine.stats.drafted > before


def test_the_fast_mode_keeps_greedy_output(models):
    target, draft = models
    plain = LLM(str(target / "Q8_0.gguf"))
    spec = LLM(str(target / "Q8_0.gguf"), speculative=drafting(draft / "Q8_0.gguf"))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = prompts(plain, 6)
    assert [o.token_ids for o in spec.generate(ps, params)] == [o.token_ids for o in plain.generate(ps, params)]
    assert spec.engine.stats.drafted > 0


def test_the_model_drafting_for_itself_has_every_draft_kept(models):
    """Its drafts are its own argmax: each pass keeps k drafts and adds one, so 40 tokens take the prefill
    and 40 / (k + 1) verifications."""
    path = str(models[0] / "hf")
    spec = LLM(path, dtype="float32", speculative=drafting(path))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = spec.generate(prompts(spec, 2)[1], params)[0]
    assert out.token_ids == LLM(path, dtype="float32").generate(prompts(spec, 2)[1], params)[0].token_ids
    stats = spec.engine.stats
    assert stats.accepted == stats.drafted > 0
    assert stats.steps <= 1 + 40 // 5


def test_speculating_and_plain_requests_share_a_batch(pair):
    plain, spec = pair
    ids = plain.tokenizer.encode(REPEAT)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, speculate=False)]
    got = spec.generate([ids] * 3, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain.generate([ids] * 3, params)]


def test_preempted_requests_keep_their_output(models):
    """A pool of 8 blocks for 6 requests of up to 4 blocks each: requests are preempted and recomputed while
    their drafts are verified, and the draft's own cache follows them."""
    target, draft = models
    path = str(target / "hf")
    small = dict(dtype="float32", kv_cache_memory=8 * 16 * 2 * 2 * 2 * 16 * 4)  # 8 blocks of 16 positions
    plain, spec = LLM(path, **small), LLM(path, **small, speculative=drafting(draft / "hf"))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = [p[:12] for p in prompts(plain, 6)]
    assert [o.token_ids for o in spec.generate(ps, params)] == [o.token_ids for o in plain.generate(ps, params)]
    assert spec.engine.scheduler.preemptions > 0


def test_sampled_drafting_is_seeded_and_streams_the_same(pair):
    spec = pair[1]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=25, ignore_eos=True)
    ids = spec.tokenizer.encode(REPEAT)
    first, again = (spec.generate(ids, params)[0] for _ in range(2))
    assert first.token_ids == again.token_ids and len(first.token_ids) == 25
    assert [t for d in spec.stream(ids, params) for t in d.token_ids] == first.token_ids


@pytest.mark.parametrize("kw", [
    dict(regex=r"((one|two|three|four|five) )+six", max_tokens=40),  # may end: EOS drafted as the grammar ends
    dict(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
         max_tokens=24),
])
def test_constrained_requests_draft_within_their_grammar(pair, kw):
    """The draft decodes under a copy of the request's grammar, advanced along its drafts: greedy output is
    plain decoding's (the request's own grammar left where its tokens put it), sampled output keeps to the
    grammar."""
    plain, spec = pair
    ids = plain.tokenizer.encode(REPEAT)
    greedy = SamplingParams(temperature=0, **kw)
    before = spec.engine.stats.drafted
    assert spec.generate(ids, greedy)[0].token_ids == plain.generate(ids, greedy)[0].token_ids
    assert spec.engine.stats.drafted > before
    sampled = SamplingParams(temperature=0.9, seed=3, **kw)
    outputs = spec.generate([ids] * 4, sampled)
    for out in outputs:
        replay = spec.engine.grammars.state(sampled.constraint)
        for token in out.token_ids:  # raises at a token the grammar does not allow
            replay.accept(token)


def test_a_grammar_that_leaves_the_draft_nothing_gets_no_drafts(models):
    """With `draft_vocab`, the draft proposes only the first ids: a grammar that allows none of them leaves it
    nothing to draw, and the request decodes plainly."""
    path = str(models[0] / "Q8_0.gguf")
    spec = LLM(path, speculative=drafting(path, draft_vocab=20))  # specials and ASCII 33-49: no letters
    drafter, asked = spec.engine.drafter, []

    def propose(wanted):
        asked.extend(n for _, n in wanted)
        type(drafter).propose(drafter, wanted)

    drafter.propose = propose
    # Not accepting before its end, so not even EOS: 16 tokens cannot reach it.
    params = SamplingParams(temperature=0, max_tokens=16, regex="[a-z]{200}")
    ids = spec.tokenizer.encode(REPEAT)
    assert spec.generate(ids, params)[0].token_ids == LLM(path).generate(ids, params)[0].token_ids
    assert sum(asked) > 0 and spec.engine.stats.drafted == 0


GIVES_UP_AFTER_C = " | ".join(f'"a{i}"' for i in range(2500))  # an Earley row past llguidance's 2,000 items


def test_a_grammar_that_gives_up_on_a_draft_ends_only_what_plain_decoding_ends(pair, monkeypatch):
    """llguidance gives up on "c" after "b". Drafts are taken on a copy of the grammar, so a draft there ends
    the drafting, not the request: one that takes "c" itself ends with plain decoding's error and tokens (the
    other request in its batch goes on), and one the target steers to "d" finishes as plain decoding does,
    even with a draft that always proposes "c"."""
    plain, spec = pair
    grammar = f'start: "b" ("c" x+ | "d")\nx: {GIVES_UP_AFTER_C}'
    c, d = spec.tokenizer.encode("c")[0], spec.tokenizer.encode("d")[0]
    params = [SamplingParams(temperature=0, max_tokens=8, grammar=grammar, logit_bias={c: 100.0}),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    failed, other = spec.generate(["one", "two"], params)
    expected = plain.generate(["one", "two"], params)
    assert failed.finish_reason == "error" and "items; max is 2000" in failed.error
    assert (failed.token_ids, failed.error) == (expected[0].token_ids, expected[0].error)
    assert other.token_ids == expected[1].token_ids and other.finish_reason == "length"

    pick = DraftModel._pick
    monkeypatch.setattr(DraftModel, "_pick", staticmethod(lambda sampling, logits, drafted: (c, None)))
    steered = SamplingParams(temperature=0, max_tokens=8, grammar=grammar, logit_bias={d: 100.0})
    before = spec.engine.stats.drafted
    out = spec.generate("one", steered)[0]
    assert out.finish_reason == "stop" and out.token_ids == plain.generate("one", steered)[0].token_ids
    assert spec.engine.stats.drafted == before  # every first draft was "c": none survived
    monkeypatch.setattr(DraftModel, "_pick", pick)
    assert not spec.engine.has_unfinished() and not spec.engine.drafter.states


def test_the_drafts_cache_is_freed_as_requests_end(pair):
    spec = pair[1]
    drafter = spec.engine.drafter
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    spec.generate(prompts(spec, 4), params)
    stream = spec.stream(prompts(spec, 1)[0], params)
    next(stream), next(stream), next(stream)
    assert drafter.states and drafter.blocks.num_used > 0
    stream.close()  # aborts the request
    assert not drafter.states and drafter.blocks.num_used == 0


def test_pairs_that_cannot_work_are_refused(tmp_path, models, tiny_gemma3):
    target = str(models[0] / "hf")
    make_hf_llama(tmp_path / "wide", vocab_size=400)
    with pytest.raises(ValueError, match="vocabulary of 400 tokens"):
        LLM(target, dtype="float32", speculative={"method": "draft", "model": str(tmp_path / "wide")})
    with pytest.raises(ValueError, match="sliding-window"):
        LLM(target, dtype="float32", speculative={"method": "draft", "model": str(tiny_gemma3 / "hf")})
    with pytest.raises(ValueError, match='needs a "model"'):
        LLM(target, dtype="float32", speculative="draft")
    with pytest.raises(ValueError, match="only it takes one"):
        LLM(target, dtype="float32", speculative={"method": "ngram", "model": target})


def test_a_draft_limited_to_the_first_ids_proposes_only_those(models):
    """`draft_vocab`: the draft's head is a slice of its rows (fewer bytes a pass, so each draft costs less);
    its drafts come from the first ids, and the output stays plain decoding's."""
    path = str(models[0] / "Q8_0.gguf")
    full = LLM(path, speculative=drafting(path))
    spec = LLM(path, speculative=drafting(path, draft_vocab=128))
    drafter = spec.engine.drafter
    assert drafter.head.out_features == 128 and drafter.relative_cost < full.engine.drafter.relative_cost
    drafts = []

    def propose(wanted):
        type(drafter).propose(drafter, wanted)
        drafts.extend(t for seq, _ in wanted for t in seq.draft)

    drafter.propose = propose
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = prompts(spec, 4)
    assert [o.token_ids for o in spec.generate(ps, params)] == [o.token_ids for o in full.generate(ps, params)]
    assert drafts and max(drafts) < 128
    sampled = SamplingParams(temperature=0.9, seed=2, max_tokens=20, ignore_eos=True)
    assert spec.generate(ps[0], sampled)[0].token_ids == spec.generate(ps[0], sampled)[0].token_ids


def test_greedy_requests_weigh_drafts_by_their_measured_cost_and_sampled_ones_by_weight_bytes(models):
    from seriatim.engine.speculation import PRIOR_COST

    path = str(models[0] / "Q8_0.gguf")
    spec = LLM(path, speculative=drafting(path))
    drafter = spec.engine.drafter
    assert drafter.cost(spec.engine.pass_cost, 1) == drafter.relative_cost  # nothing measured yet
    spec.generate(prompts(spec, 1), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert drafter.pass_cost.seconds and spec.engine.pass_cost.seconds
    measured = drafter.cost(spec.engine.pass_cost, 1)
    assert measured == drafter.pass_cost.estimate(1) / spec.engine.pass_cost.estimate(1) != drafter.relative_cost
    assert drafter.cost(PRIOR_COST, 1) == drafter.relative_cost
