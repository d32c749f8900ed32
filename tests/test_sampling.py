"""Sampler tests: exact distributions against an independent numpy reference, determinism,
batch invariance, validation and raw logprobs."""

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from seriatim.sampling import SamplingParams, SamplingState, process_logits, sample

V = 50
N_DRAWS = 20_000
PROMPT = [0, 3, 7, 11, 12, 30]
OUTPUT = [3, 5, 5, 5, 18, 22, 22, 41]


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1234).normal(0.0, 1.0, V).astype(np.float32))


def reference_probs(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """The processed distribution, written independently in float64 with plain loops."""
    x = logits.double().numpy().copy()
    for tok, bias in (p.logit_bias or {}).items():
        x[tok] += bias
    for tok in set(prompt) | set(output):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok, count in Counter(output).items():
        x[tok] -= p.frequency_penalty * count + p.presence_penalty
    if p.temperature == 0:
        return np.eye(len(x))[int(np.argmax(x))]
    probs = np.exp((x - x.max()) / p.temperature)
    probs /= probs.sum()
    ranked = sorted(range(len(x)), key=lambda t: -probs[t])
    kept = ranked[:p.top_k] if p.top_k else ranked
    mass = sum(probs[t] for t in kept)
    if p.top_p < 1:
        nucleus, cum = [], 0.0
        for t in kept:
            nucleus.append(t)
            cum += probs[t] / mass
            if cum >= p.top_p:
                break
        # Keep fixtures away from the edge, where float32 and float64 may disagree.
        assert abs(cum - p.top_p) > 1e-5 and abs(cum - probs[t] / mass - p.top_p) > 1e-5
        kept = nucleus
    if p.min_p > 0:
        p_max = probs[ranked[0]]
        assert all(abs(probs[t] / p_max - p.min_p) > 1e-5 for t in kept)
        kept = [t for t in kept if probs[t] >= p.min_p * p_max]
    out = np.zeros(len(x))
    out[kept] = probs[kept]
    return out / out.sum()


def make_states(params: SamplingParams, n: int, prompt: list[int] = (), output: list[int] = ()) -> list[SamplingState]:
    states = []
    for seed in range(n):
        state = SamplingState(replace(params, seed=seed), list(prompt), V, "cpu")
        for tok in output:
            state.append(tok)
        states.append(state)
    return states


# Kept-set sizes are noted where tokens are cut: a stage must bite for its test to mean anything.
CASES = {
    "temperature_0.7": SamplingParams(temperature=0.7),
    "temperature_1.3": SamplingParams(temperature=1.3),
    "top_k": SamplingParams(top_k=15),
    "top_p": SamplingParams(top_p=0.8),  # 20 kept
    "min_p": SamplingParams(min_p=0.1),  # 14 kept
    # Each cut keeps a prefix of the ranking, so the tightest one decides. Here that is top-p over
    # the renormalised top-k set: 17 kept, where top-p over all tokens would keep 22 and min-p 20.
    "combined": SamplingParams(temperature=0.8, top_k=25, top_p=0.9, min_p=0.04),
    "penalties": SamplingParams(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.5),
    "logit_bias": SamplingParams(logit_bias={4: 3.0, 9: -100.0, 18: -2.5, 40: 1.5}),
    # min-p decides: 13 kept, where top-k then top-p would keep 16.
    "everything": SamplingParams(temperature=0.9, top_k=25, top_p=0.95, min_p=0.012, repetition_penalty=1.2,
                                 presence_penalty=0.4, frequency_penalty=-0.3,
                                 logit_bias={5: 2.0, 7: -1.0, 22: 1.0, 44: 1.5}),
}


@pytest.mark.parametrize("name", CASES)
def test_distribution_matches_reference(logits, name):
    params = CASES[name]
    expected = reference_probs(logits, params, PROMPT, OUTPUT) * N_DRAWS
    states = make_states(params, N_DRAWS, PROMPT, OUTPUT)
    tokens = sample(logits.expand(N_DRAWS, V), states).token_ids
    observed = np.bincount(tokens, minlength=V)
    assert observed[expected == 0].sum() == 0, "a cut token was drawn"
    # Pool rare bins so chi-square's approximation holds.
    rare = (expected > 0) & (expected < 5)
    obs = np.append(observed[expected >= 5], observed[rare].sum())
    exp = np.append(expected[expected >= 5], expected[rare].sum())
    if exp[-1] < 5:
        obs[-2] += obs[-1]
        exp[-2] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    assert len(exp) > 1
    assert chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.parametrize("name", CASES)
def test_process_logits_matches_reference(logits, name):
    params = replace(CASES[name], seed=0)
    state = make_states(params, 1, PROMPT, OUTPUT)[0]
    before = state.generator.get_state()
    got = process_logits(logits, state).exp().numpy()
    np.testing.assert_allclose(got, reference_probs(logits, params, PROMPT, OUTPUT), atol=1e-6)
    assert torch.equal(state.generator.get_state(), before)


def test_greedy_is_argmax():
    rows = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    states = make_states(SamplingParams(temperature=0), 8)
    assert sample(rows, states).token_ids == rows.argmax(-1).tolist()
    assert sample(rows.bfloat16(), states).token_ids == rows.bfloat16().float().argmax(-1).tolist()


@pytest.mark.parametrize("companion", [SamplingParams(temperature=0), SamplingParams(temperature=1.0)])
def test_greedy_ties_go_to_lowest_id(companion):
    row = torch.zeros(V)
    row[[7, 3, 31]] = 2.0
    states = [SamplingState(SamplingParams(temperature=0), [], V, "cpu"), SamplingState(companion, [], V, "cpu")]
    assert sample(torch.stack([row, row]), states).token_ids[0] == 3


def test_greedy_with_penalties(logits):
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=1.0, logit_bias={1: 0.5})
    want = int(np.argmax(reference_probs(logits, params, PROMPT, OUTPUT)))
    assert want != int(logits.argmax())  # the penalties must matter for this test to mean anything
    assert sample(logits[None], make_states(params, 1, PROMPT, OUTPUT)).token_ids == [want]


def test_greedy_does_not_draw(logits):
    states = make_states(SamplingParams(temperature=0), 2)
    states += make_states(SamplingParams(temperature=0, presence_penalty=1.0), 1)
    before = [s.generator.get_state() for s in states]
    sample(logits.expand(2, V), states[:2])  # fast path
    sample(logits.expand(3, V), states)  # processed path
    assert all(torch.equal(s.generator.get_state(), b) for s, b in zip(states, before))


def generate(states: list[SamplingState], steps: int, keys: list[int] | None = None) -> list[list[int]]:
    """Sample `steps` tokens per state; row i's logits at each step depend only on keys[i] and the step."""
    keys = keys or list(range(len(states)))
    seqs: list[list[int]] = [[] for _ in states]
    for step in range(steps):
        rows = torch.stack([torch.randn(V, generator=torch.Generator().manual_seed(1000 * k + step)) for k in keys])
        for state, seq, tok in zip(states, seqs, sample(rows, states).token_ids):
            state.append(tok)
            seq.append(tok)
    return seqs


def test_same_seed_same_tokens():
    params = SamplingParams(seed=5, top_p=0.9, frequency_penalty=0.5)
    runs = [generate([SamplingState(params, [1, 2], V, "cpu")], 30)[0] for _ in range(2)]
    assert runs[0] == runs[1]


def test_different_seeds_differ():
    runs = [generate([SamplingState(SamplingParams(seed=s), [], V, "cpu")], 30)[0] for s in (1, 2)]
    assert runs[0] != runs[1]


def test_unseeded_requests_get_their_own_streams():
    runs = [generate([SamplingState(SamplingParams(), [], V, "cpu")], 30)[0] for _ in range(2)]
    assert runs[0] != runs[1]


def test_batch_invariance():
    target = SamplingParams(seed=11, temperature=0.9, top_p=0.9, repetition_penalty=1.3)
    others = [SamplingParams(temperature=0), SamplingParams(seed=3, top_k=4), SamplingParams(seed=4, min_p=0.2),
              SamplingParams(logit_bias={2: 5.0}, presence_penalty=1.0),
              SamplingParams(temperature=0, frequency_penalty=2.0)]
    alone = generate([SamplingState(target, [1, 2, 3], V, "cpu")], 25, keys=[0])[0]
    for pos in (0, 3, 5):
        batch = [SamplingState(p, [4, 5], V, "cpu") for p in others]
        batch.insert(pos, SamplingState(target, [1, 2, 3], V, "cpu"))
        keys = [1, 2, 3, 4, 5]
        keys.insert(pos, 0)
        assert generate(batch, 25, keys)[pos] == alone


def test_batch_invariance_at_any_position(logits):
    target = SamplingParams(seed=8, temperature=1.1, top_k=20, logprobs=2)
    others = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    alone = sample(logits[None], [SamplingState(target, [], V, "cpu")])
    for pos in range(5):
        rows = torch.cat([others[:pos], logits[None], others[pos:]])
        states = [SamplingState(SamplingParams(seed=i, top_p=0.5, temperature=0.3 + i), [9], V, "cpu")
                  for i in range(4)]
        states.insert(pos, SamplingState(target, [], V, "cpu"))
        out = sample(rows, states)
        assert out.token_ids[pos] == alone.token_ids[0]
        assert out.logprobs[pos] == alone.logprobs[0]


def test_draw_count_does_not_depend_on_params(logits):
    a = SamplingState(SamplingParams(seed=1, temperature=0.5, top_k=3), [], V, "cpu")
    b = SamplingState(SamplingParams(seed=1, temperature=1.5, top_p=0.3, min_p=0.2, repetition_penalty=1.5,
                                     logit_bias={0: 10.0}), [0, 1], V, "cpu")
    sample(logits[None], [a])
    sample(logits[None], [b])
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_sample_leaves_logits_untouched(logits):
    rows = logits.expand(2, V).clone()
    params = SamplingParams(seed=0, temperature=0.5, top_p=0.5, repetition_penalty=2.0, logit_bias={3: 9.0})
    sample(rows, make_states(params, 2, PROMPT, OUTPUT))
    assert torch.equal(rows, logits.expand(2, V))


@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_logprobs_are_raw_and_sorted(logits, n):
    params = SamplingParams(seed=0, temperature=0.5, top_k=5, logit_bias={int(logits.argmin()): 50.0}, logprobs=n)
    out = sample(logits.expand(4, V), make_states(params, 4, PROMPT, OUTPUT))
    raw = torch.log_softmax(logits.double(), -1).numpy()
    ranked = np.argsort(-raw)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(raw[tok], abs=1e-5)
        assert [t for t, _ in lp.top] == ranked[:n].tolist()
        np.testing.assert_allclose([v for _, v in lp.top], raw[ranked[:n]], atol=1e-5)


def test_logprobs_only_when_asked(logits):
    states = [SamplingState(SamplingParams(seed=0, logprobs=n), [], V, "cpu") for n in (None, 2)]
    out = sample(logits.expand(2, V), states)
    assert out.logprobs[0] is None and len(out.logprobs[1].top) == 2


INVALID = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.01),
    ("max_tokens", 0), ("max_tokens", 8.0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0),
    ("logit_bias", {1: 100.5}), ("logit_bias", {1: -101}), ("logit_bias", {"a": 1.0}), ("logit_bias", {1.0: 1.0}),
    ("logit_bias", [1, 2]),
    ("stop", ""), ("stop", ["a", ""]), ("stop", [1]), ("stop", 5),
    ("seed", -1), ("seed", 2**64), ("seed", 1.5),
    ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_boundary_values_are_valid():
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   logprobs=20, logit_bias={0: -100, 1: 100}, max_tokens=1, seed=2**64 - 1)
    SamplingParams(min_p=0.0, logprobs=0, top_k=0, seed=0)


def test_logit_bias_checked_against_vocab():
    SamplingParams(logit_bias={V - 1: 1.0}).validate_for_vocab(V)
    for bad in (V, -1):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias={bad: 1.0}).validate_for_vocab(V)
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingState(SamplingParams(logit_bias={bad: 1.0}), [], V, "cpu")


def test_logit_bias_is_copied():
    bias = {1: 2.0}
    params = SamplingParams(logit_bias=bias)
    bias[1] = 50.0
    assert params.logit_bias == {1: 2.0}


@pytest.mark.parametrize("stop,want", [("a", ("a",)), (["a", "bc"], ("a", "bc")), (("x",), ("x",)),
                                       ([], None), (None, None)])
def test_stop_normalised_to_tuple(stop, want):
    assert SamplingParams(stop=stop).stop == want


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy


def test_logits_shape_checked(logits):
    with pytest.raises(ValueError):
        sample(logits.expand(2, V), make_states(SamplingParams(), 1))
    with pytest.raises(ValueError):
        sample(logits[None, :-1], make_states(SamplingParams(), 1))


@pytest.mark.parametrize("k", [1, 3, 4, 5, 8, 20])
def test_top_k_candidates_rank_exactly_as_the_full_stable_sort(k):
    """The top-k path sorts only the candidates at or above each row's k-th value: with ties across
    the k-th place (and -inf entries), its first k equal the full stable sort's, ids included."""
    from seriatim.sampling import _ranked

    gen = torch.Generator().manual_seed(k)
    logits = torch.randint(0, 6, (4, 50), generator=gen).float()  # many equal values
    logits[1, 10:] = -torch.inf
    logits[2] = 1.0  # one value everywhere
    top_k = torch.tensor([[k], [k], [k], [max(1, k // 2)]])
    values, ids = _ranked(logits, top_k)
    full_values, full_ids = logits.sort(dim=-1, descending=True, stable=True)
    assert values.shape[-1] >= k
    for row, kr in enumerate(top_k[:, 0].tolist()):
        assert torch.equal(ids[row, :kr], full_ids[row, :kr])
        assert torch.equal(values[row, :kr], full_values[row, :kr])


@pytest.mark.parametrize("extreme", [dict(temperature=1e-39), dict(temperature=1e-30, top_p=0.5, top_k=5),
                                     dict(temperature=0.7, repetition_penalty=1e-39)])
def test_extreme_parameters_stay_finite_and_tend_to_greedy(logits, extreme):
    """A temperature far below 1 (past float32's range when dividing) gives the argmax, as its limit;
    a near-zero repetition penalty gives no NaN (the seen tokens with positive logits win)."""
    params = SamplingParams(seed=3, **extreme)
    states = make_states(params, 8, PROMPT, OUTPUT)
    tokens = sample(logits.repeat(8, 1), states).token_ids
    probs = process_logits(logits, states[0]).exp()
    assert not probs.isnan().any() and torch.isclose(probs.sum(), torch.tensor(1.0))
    if params.repetition_penalty == 1:
        assert tokens == [int(logits.argmax())] * 8
    else:
        boosted = [t for t in set(PROMPT) | set(OUTPUT) if logits[t] > 0]
        assert set(tokens) <= set(boosted)


def test_parameters_beyond_float32_and_int64_are_their_limits(logits):
    """A temperature or repetition penalty too large for float32 (inf there), a top_k too large for int64, or
    a top_p too small for float32 (0 there), is its limit: a uniform distribution over the tokens not cut (a
    grammar's -inf stays -inf, never NaN), a seen logit of 0 stays 0, no top-k cut, the top token alone."""
    vocab = logits.shape[-1]
    masked = logits.clone()
    masked[:10] = -math.inf  # as a grammar's mask leaves them
    hot = process_logits(masked, make_states(SamplingParams(temperature=1e308), 1)[0])
    assert torch.equal(hot[:10], torch.full((10,), -math.inf))
    assert torch.allclose(hot[10:], torch.full((vocab - 10,), -math.log(vocab - 10)))
    wide = process_logits(logits, make_states(SamplingParams(top_k=2**100), 1)[0])
    assert torch.equal(wide, process_logits(logits, make_states(SamplingParams(), 1)[0]))
    narrow = process_logits(logits, make_states(SamplingParams(top_p=5e-324), 1)[0])  # 0.0 as a float32
    assert narrow.isfinite().sum() == 1 and narrow[logits.argmax()] == 0
    zero = logits.clone()
    zero[0] = 0.0
    harsh = process_logits(zero, make_states(SamplingParams(repetition_penalty=1e308), 1, prompt=[0, 1, 2])[0])
    assert not harsh.isnan().any() and harsh[3:].isfinite().all()
