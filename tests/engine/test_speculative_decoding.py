"""Prompt-lookup speculation in the engine: greedy output identical to plain decoding, token for token, in the
float32 reference and the fast mode, with EOS, stop strings, max_tokens and batches mixing speculating and
plain requests; fewer passes than tokens where the text repeats."""

from __future__ import annotations

import pytest

from seriatim import LLM, SamplingParams
from seriatim.grammar.constraint import Constraint
from support.speculation import REPEAT, prompts


@pytest.fixture(scope="module")
def pair(tiny_llama):
    path = str(tiny_llama[0] / "hf")
    # A row budget that lets all of a 12-prompt batch draft, so that batches test speculation too.
    # Not adaptive: every pass drafts what it can, so that each test sees the verification it sets up.
    lookup = {"method": "ngram", "k": 4, "max_step_rows": 64, "adaptive": False}
    return LLM(path, dtype="float32"), LLM(path, dtype="float32", speculative=lookup)


@pytest.mark.parametrize("kw", [
    dict(max_tokens=40, ignore_eos=True),
    dict(max_tokens=7, ignore_eos=True),  # max_tokens falls inside an accepted run
    dict(max_tokens=60),  # EOS may come inside an accepted run
    dict(max_tokens=40, stop=["three", "\n"], ignore_eos=True),
])
def test_greedy_output_is_plain_decodings(pair, kw):
    plain, spec = pair
    params = SamplingParams(temperature=0, **kw)
    ps = prompts(plain, 12)
    expected = [o.token_ids for o in plain.generate(ps, params)]
    before = spec.engine.stats.accepted
    got = spec.generate(ps, params)
    assert [o.token_ids for o in got] == expected
    assert [o.text for o in got] == [o.text for o in plain.generate(ps, params)]
    if kw["max_tokens"] > 7:
        assert spec.engine.stats.accepted > before


def test_fewer_passes_than_tokens_where_text_repeats(pair):
    """A strong logit bias makes the random model repeat one token: every lookup then hits, and each pass
    takes k drafts and a bonus token."""
    plain, spec = pair
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logit_bias={42: 100.0})
    ids = [42, 7, 42]
    steps, drafted, accepted = spec.engine.stats.steps, spec.engine.stats.drafted, spec.engine.stats.accepted
    out = spec.generate(ids, params)[0]
    assert out.token_ids == plain.generate(ids, params)[0].token_ids == [42] * 48
    # The prefill and a plain pass or two until a two-token suffix recurs; then 4 drafts and 1 more per pass.
    assert spec.engine.stats.steps - steps <= 3 + 48 // 5
    assert spec.engine.stats.accepted - accepted == spec.engine.stats.drafted - drafted


def test_requests_that_cannot_speculate_run_plainly_beside_those_that_do(pair):
    plain, spec = pair
    ids = plain.tokenizer.encode(REPEAT)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3)]
    got = spec.generate([ids] * 3, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain.generate([ids] * 3, params)]
    assert len(got[1].logprobs) == 30


@pytest.mark.parametrize("adaptive", [False, True])
def test_sampled_speculation_is_seeded_and_ends_where_asked(pair, tiny_llama, adaptive):
    """Adaptive drafting must not let pass timings change a sampled request's drafts (its draws follow them)."""
    spec = LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative="ngram") if adaptive else pair[1]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=25, ignore_eos=True)
    ids = spec.tokenizer.encode(REPEAT)
    first, again = (spec.generate(ids, params)[0] for _ in range(2))
    assert first.token_ids == again.token_ids and len(first.token_ids) == 25
    deltas = list(spec.stream(ids, params))
    assert [t for d in deltas for t in d.token_ids] == first.token_ids


def test_the_fast_mode_keeps_greedy_output(tiny_llama):
    path = str(tiny_llama[0] / "Q8_0.gguf")
    plain, spec = LLM(path), LLM(path, speculative="ngram")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = prompts(plain, 6)
    assert [o.token_ids for o in spec.generate(ps, params)] == [o.token_ids for o in plain.generate(ps, params)]


def test_a_batch_that_fills_the_row_budget_decodes_plainly(tiny_llama):
    spec = LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative="ngram")  # 8 rows a step
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logit_bias={42: 100.0})
    spec.generate([[42, 7, 42, 42]] * 8, params)
    assert spec.engine.stats.drafted == 0
    spec.generate([[42, 7, 42, 42]] * 2, params)  # 2 decodes leave 6 rows: 3 drafts each
    assert spec.engine.stats.drafted > 0 and spec.engine.speculation.drafts_per_sequence(2) == 3


def test_adaptive_drafting_backs_off_where_drafts_miss_and_keeps_the_output(tiny_llama):
    """Random prompts whose lookups rarely hold: an adaptive request soon drafts little (it probes now and
    then), a fixed one keeps drafting; the greedy tokens are the same either way."""
    path = str(tiny_llama[0] / "hf")
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    fixed = LLM(path, dtype="float32", speculative={"method": "ngram", "min_n": 1, "adaptive": False})
    adaptive = LLM(path, dtype="float32", speculative={"method": "ngram", "min_n": 1})
    # Pass costs as the prior has them, not as timed: on a busy machine measured ones swing enough to
    # make drafts look cheap, and the test is about acceptance.
    adaptive.engine.pass_cost.record = lambda rows, seconds: None
    ps = prompts(fixed, 6)[1:]
    expected = [fixed.generate(p, params)[0].token_ids for p in ps]  # one at a time: room for 5 drafts
    assert [adaptive.generate(p, params)[0].token_ids for p in ps] == expected
    f, a = fixed.engine.stats, adaptive.engine.stats
    assert f.accepted / f.drafted < 0.5  # the lookups mostly miss here
    assert a.drafted < f.drafted / 2 and a.accepted / a.drafted > f.accepted / f.drafted


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_lookahead_greedy_output_is_plain_decodings(tiny_llama, dtype):
    """Lookahead's drafts (Jacobi guesses from earlier passes, the pool of predicted bigrams, then prompt
    lookup): plain decoding's tokens, several prompts at once, with drafts kept along the way."""
    path = str(tiny_llama[0] / ("hf" if dtype == "float32" else "Q4_1.gguf"))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(path, dtype=dtype)
    look = LLM(path, dtype=dtype, speculative={"method": "lookahead", "max_step_rows": 64, "adaptive": False})
    ps = prompts(plain, 6)
    assert [o.token_ids for o in look.generate(ps, params)] == [o.token_ids for o in plain.generate(ps, params)]
    assert look.engine.stats.verifications > 30  # a random model's guesses mostly miss: drafts every pass


def test_lookahead_drafts_what_the_model_predicted_where_lookup_finds_nothing(tiny_llama):
    """A bias makes the model repeat one token after a prompt with no repeats: prompt lookup (4-token
    suffixes) must wait for the output to repeat itself, lookahead drafts the model's own prediction (42
    after 42) from its first verification on, in fewer passes for the same tokens."""
    path = str(tiny_llama[0] / "hf")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logit_bias={42: 100.0})
    steps = {}
    for method in ("ngram", "lookahead"):
        llm = LLM(path, dtype="float32", speculative={"method": method, "min_n": 4, "adaptive": False})
        assert llm.generate([5, 9, 11, 40], params)[0].token_ids == [42] * 24
        steps[method] = llm.engine.stats.steps
    assert steps["lookahead"] < steps["ngram"]


def test_lookahead_sampling_is_seeded(tiny_llama):
    look = LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative="lookahead")
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=30, ignore_eos=True)
    ids = look.tokenizer.encode(REPEAT)
    assert look.generate(ids, params)[0].token_ids == look.generate(ids, params)[0].token_ids


@pytest.mark.parametrize("bad", ["medusa", {"method": "ngram", "k": 0}, {"method": "ngram", "k": 16},
                                 {"method": "ngram", "min_n": 3, "max_n": 2}])
def test_bad_speculative_settings_are_refused(tiny_llama, bad):
    with pytest.raises(ValueError, match="speculative|min_n"):
        LLM(str(tiny_llama[0] / "hf"), dtype="float32", speculative=bad)


@pytest.mark.parametrize("method", ["ngram", "lookahead"])
def test_logprobs_of_verified_tokens_are_plain_decodings(tiny_llama, method):
    """A request that asks for logprobs speculates too: each kept draft's logprobs come from its verification
    row, bit for bit those a plain decode computes (the fast mode's batch-invariant kernels), in the result
    and in the stream."""
    path = str(tiny_llama[0] / "Q8_0.gguf")
    plain = LLM(path)
    spec = LLM(path, speculative={"method": method, "max_step_rows": 64, "adaptive": False})
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3)
    ps = prompts(plain, 4)
    expected, got = plain.generate(ps, params), spec.generate(ps, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.logprobs for o in got] == [o.logprobs for o in expected]
    assert spec.engine.stats.accepted > 0
    streamed = [lp for d in spec.stream(ps[0], params) for lp in d.logprobs]
    assert streamed == expected[0].logprobs


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_penalties_count_the_drafts_before_each_verified_position(tiny_llama, method):
    """A bias makes the model repeat token 42, a frequency penalty makes it stop after a few: drafts of more
    42s must be rejected exactly where plain decoding's penalty turns it away, so each verified position's
    penalty counts the drafts before it (the target's and the draft model's)."""
    path = str(tiny_llama[0] / "hf")
    spec = {"method": method, "adaptive": False} | ({"model": path} if method == "draft" else {"min_n": 1})
    plain, llm = LLM(path, dtype="float32"), LLM(path, dtype="float32", speculative=spec)
    for penalty in (dict(frequency_penalty=2.0), dict(repetition_penalty=1.8), dict(presence_penalty=1.0)):
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logit_bias={42: 20.0}, **penalty)
        expected = plain.generate([42, 7, 42], params)[0].token_ids
        assert llm.generate([42, 7, 42], params)[0].token_ids == expected
    stats = llm.engine.stats
    if method == "draft":  # the model drafting for itself, its penalties counting its drafts: all are kept
        assert stats.accepted == stats.drafted > 0
    else:
        assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("method", ["ngram", "lookahead"])
def test_constrained_requests_speculate_within_their_grammar(tiny_llama, method):
    """Drafts are cut to what the grammar allows, and each verified position is masked from where the drafts
    before it take the grammar: greedy output is plain decoding's, sampled output keeps to the grammar."""
    path = str(tiny_llama[0] / "hf")
    plain = LLM(path, dtype="float32")
    spec = LLM(path, dtype="float32", speculative={"method": method, "min_n": 1, "adaptive": False})
    regex = r"((one|two|three|four|five) )+six"
    ids = plain.tokenizer.encode(REPEAT)
    greedy = SamplingParams(temperature=0, max_tokens=40, regex=regex)
    assert spec.generate(ids, greedy)[0].token_ids == plain.generate(ids, greedy)[0].token_ids
    assert spec.engine.stats.accepted > 0
    sampled = SamplingParams(temperature=0.9, seed=4, max_tokens=60, regex=regex)
    first, again = (spec.generate(ids, sampled)[0] for _ in range(2))
    assert first.token_ids == again.token_ids
    replay = spec.engine.grammars.state(Constraint.of("regex", regex))
    for token in first.token_ids:  # raises at a token the grammar does not allow
        replay.accept(token)
