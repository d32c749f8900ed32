"""Speculative decoding's core: prompt lookup, and the verify-and-accept rule. Greedy keeps plain decoding's
tokens; sampling keeps its law, checked by a chi-square test of the joint law of three tokens of a small
Markov chain (exact probabilities enumerated), which a wrong residual rule fails."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from seriatim.engine import speculation
from seriatim.engine.speculation import (
    Acceptance,
    PassCost,
    RequestDrafts,
    Speculation,
    Trajectory,
    propose_ngram,
    verify_greedy,
    verify_sampled,
)

V = 4
P = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.2, 0.7]],
                 dtype=torch.float64)  # the target: P[c] is the next token's law after token c
Q = torch.tensor([[0.3, 0.3, 0.3, 0.1], [0.4, 0.4, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]],
                 dtype=torch.float64)  # a draft model that is often wrong


@pytest.mark.parametrize("tokens, k, expected", [
    ([1, 2, 3, 9, 1, 2, 3], 3, [9, 1, 2]),  # the longest suffix (1 2 3) recurs: what followed it
    ([5, 1, 2, 7, 8, 4, 1, 2], 2, [7, 8]),
    ([1, 2, 1, 3, 1, 2], 4, [1, 3, 1, 2]),  # the latest occurrence of (1 2) is the first one here
    ([3, 1, 4, 1, 5, 1], 2, [5, 1]),  # n = 1: the latest earlier 1 was followed by 5
    ([42, 7, 42, 42], 4, [42, 42, 42, 42]),  # a copy that runs into the end goes on repeating
    ([1, 2, 1, 2, 1], 4, [2, 1, 2, 1]),
    ([1, 2, 3, 4], 3, []),  # nothing recurs
    ([7], 3, []),
])
def test_prompt_lookup(tokens, k, expected):
    assert propose_ngram(tokens, k) == expected


def test_greedy_keeps_the_matching_drafts_then_the_targets_token():
    assert verify_greedy([5, 6, 7], [5, 6, 9, 1]) == speculation.Verdict(2, [5, 6, 9])
    assert verify_greedy([5, 6, 7], [5, 6, 7, 1]) == speculation.Verdict(3, [5, 6, 7, 1])  # and the bonus
    assert verify_greedy([5], [4, 1]) == speculation.Verdict(0, [4])
    assert verify_greedy([], [4]) == speculation.Verdict(0, [4])
    with pytest.raises(ValueError, match="need 3 target tokens"):
        verify_greedy([1, 2], [1, 2])


def _first_three(draft_model: bool, generator: torch.Generator, k: int = 2) -> tuple[int, ...]:
    """Three tokens after token 0, generated speculatively: each round drafts k tokens (from Q, or the
    deterministic guess c + 1 for point-mass drafts), and keeps what verify_sampled keeps."""
    out = [0]
    while len(out) < 4:
        draft, c = [], out[-1]
        for _ in range(k):
            c = int(torch.multinomial(Q[c], 1, generator=generator)) if draft_model else (c + 1) % V
            draft.append(c)
        p = P[[out[-1], *draft]]
        q = Q[[out[-1], *draft[:-1]]] if draft_model else None
        out += verify_sampled(draft, p, q, generator).tokens
    return tuple(out[1:4])


def _chi_square_pvalue(draft_model: bool, samples: int = 6000) -> float:
    g = torch.Generator().manual_seed(1234)
    counts = dict.fromkeys(itertools.product(range(V), repeat=3), 0)
    for _ in range(samples):
        counts[_first_three(draft_model, g)] += 1
    exact = {x: float(P[0, x[0]] * P[x[0], x[1]] * P[x[1], x[2]]) for x in counts}
    return chisquare([counts[x] for x in counts], [samples * exact[x] for x in counts]).pvalue


@pytest.mark.parametrize("draft_model", [True, False], ids=["draft distribution", "point-mass drafts"])
def test_sampled_tokens_follow_the_targets_law(draft_model):
    assert _chi_square_pvalue(draft_model) > 1e-3


@pytest.mark.parametrize("draft_model", [True, False], ids=["draft distribution", "point-mass drafts"])
def test_a_wrong_residual_fails_the_same_test(draft_model, monkeypatch):
    """Drawing a rejected position from the target's whole distribution (the rejected draft included) is the
    classic mistake: it biases towards the drafts. The test above must see it."""
    monkeypatch.setattr(speculation, "_residual", lambda p, q: p)
    assert _chi_square_pvalue(draft_model) < 1e-6


def test_first_position_acceptance_is_the_overlap_of_p_and_q():
    p, q = P[1], Q[1]
    g = torch.Generator().manual_seed(7)
    n, accepted = 20000, 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        accepted += verify_sampled([d], torch.stack([p, p]), q[None], g).accepted
    expected = float(torch.minimum(p, q).sum())
    sigma = (expected * (1 - expected) / n) ** 0.5
    assert abs(accepted / n - expected) < 4 * sigma


def test_seeded_verification_is_reproducible():
    def run(seed: int) -> list[tuple[int, ...]]:
        g = torch.Generator().manual_seed(seed)
        return [_first_three(True, g) for _ in range(30)]

    assert run(3) == run(3) != run(4)


def test_drafts_follow_acceptance_and_the_cost_of_wider_passes():
    cost = PassCost()
    kept, missed = Acceptance(), Acceptance()
    for _ in range(10):
        kept.record(5, 5)
        missed.record(3, 0)
    assert kept.drafts(5, cost, rows=1) == 5
    assert missed.drafts(5, cost, rows=1) == 0
    assert Acceptance().drafts(5, cost, rows=1) == 2  # the prior: one draft in two kept
    # A machine where wider passes cost nothing extra drafts whatever has any chance; one where each extra
    # row costs a whole pass drafts nothing.
    free, dear = PassCost(slope=0.0), PassCost(slope=1.0)
    assert Acceptance().drafts(5, free, rows=1) == 5 and kept.drafts(5, dear, rows=1) == 0
    # Measured pass times replace the prior.
    for rows, seconds in ((1, 1.0), (2, 1.0), (3, 1.0)):
        cost.record(rows, seconds)
    assert cost.ratio(1, 2) == 1.0 and cost.ratio(1, 4) == pytest.approx(1 + 0.14 * 4)



def test_a_pass_time_is_estimated_from_the_nearest_row_count_measured():
    cost = PassCost(slope=0.5)
    assert cost.estimate(1) is None  # nothing measured
    cost.record(3, 0.02)
    assert cost.estimate(3) == 0.02
    assert cost.estimate(1) == pytest.approx(0.02 / 2) and cost.estimate(5) == pytest.approx(0.02 * 3 / 2)
    cost.record(1, 0.012)
    assert cost.estimate(1) == 0.012 and cost.estimate(2) == pytest.approx(0.012 * 1.5)  # nearest: 1 before 3

def test_a_request_that_stopped_drafting_probes_again():
    missed = Acceptance(probe_after=4)
    for _ in range(10):
        missed.record(3, 0)
    assert [missed.drafts(5, PassCost(), rows=1) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]


def test_a_trajectory_drafts_its_jacobi_guesses_then_its_predicted_bigrams():
    t = Trajectory()
    # A pass over [7, 1, 2, 3] predicted [1, 2, 9, 4]: drafts 1 and 2 kept, 9 is the new token, and 4 the
    # model's guess for the position after it.
    t.record([7, 1, 2, 3], [1, 2, 9, 4], accepted=2)
    assert t.guesses == [4] and t.pool == {7: 1, 1: 2, 2: 9, 3: 4}
    assert t.propose(9, 3) == [4, 4, 4]  # no prediction after 4 yet: repeated
    assert t.guesses == []  # guesses are used once
    assert t.propose(7, 3) == [1, 2, 9]  # along the pool
    assert t.propose(5, 2) == [5, 5]


def test_lookahead_guesses_that_miss_do_not_turn_off_lookups_that_hit():
    """Each draft source answers for its own drafts: guesses rejected pass after pass stop the guesses,
    not the prompt lookups, and a verdict goes to the source of the drafts it judged."""
    spec, state, cost = Speculation(method="lookahead"), RequestDrafts(), PassCost()
    repeating = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]  # prompt lookup continues it: 4, 1, 2, ...
    assert spec.propose([9, 8, 7], 5, state, cost, rows=1) == [7, 7] and state.pending is state.guesses
    for _ in range(10):
        state.record(3, 0)  # the guesses miss
    assert state.guesses.drafts(5, cost, rows=1) == 0
    assert spec.propose([9, 8, 7], 5, state, cost, rows=1) == []  # no lookup, and guesses turned off
    assert spec.propose(repeating, 5, state, cost, rows=1) == [4, 1] and state.pending is state.lookup
    state.record(2, 2)
    assert state.lookup.rate > state.guesses.rate
