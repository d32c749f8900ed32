"""Speculative decoding's parts that do not depend on the engine: proposing draft tokens by prompt lookup, and
the one verify-and-accept rule every proposer shares.

A target pass over [last token, d_1 .. d_k] gives the target's processed distribution after each prefix:
p_1 .. p_{k+1}. The rule keeps a prefix of the drafts and adds one token of the target's own, so the output
is exactly what plain decoding gives (greedy) or is distributed exactly as it (sampling):

- greedy: accept d_i while it is the argmax of p_i; then the argmax of the first p_i it is not (or of
  p_{k+1}, the bonus, when all are accepted);
- sampling, drafts drawn from a distribution q_i: accept d_i with probability min(1, p_i(d_i) / q_i(d_i));
  on the first rejection draw from norm(max(0, p_i - q_i)); when all are accepted, draw the bonus from
  p_{k+1} (Leviathan et al., 2023; Chen et al., 2023);
- sampling, point-mass drafts (n-gram lookup, lookahead: q_i is all on d_i): the same rule, which becomes
  accept d_i with probability p_i(d_i), else draw from p_i with d_i removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

METHODS = ("ngram", "lookahead", "draft")


@dataclass(frozen=True)
class Speculation:
    """Up to `k` drafts per pass. Prompt lookup drafts the continuation of the longest recurring suffix of
    `max_n` down to `min_n` tokens; lookahead adds the model's own predictions from earlier passes; a draft
    model (`model`: a registry name or path of a smaller model with the same vocabulary) decodes them
    itself (draft.py). A request speculates unless it has a trace or asks not to (`speculate=False`).

    min_n = 2 by default: a lone recurring token predicts poorly (on SmolLM2 and Qwen2.5-Coder-0.5B about
    0.3 of first drafts kept, against 0.55-0.9 after two), and a pass that feeds k rejected drafts costs
    up to 1.7x a plain one on a 2-core CPU (`seriatim bench --speculative`)."""

    method: str = "ngram"  # or "lookahead" (`Trajectory`), or "draft" (a draft model's tokens)
    k: int = 5
    max_n: int = 4
    min_n: int = 2
    # Rows (tokens) a step may feed before drafts stop paying: on a 2-core CPU a pass over 8 rows costs ~2x a
    # pass over one (`seriatim bench --rows`), over 16 ~3.3x, while drafts add ~0.5-1.5 tokens a pass. So the
    # drafts of a step share what its plain decodes leave of 8 rows, and a batch of 8 or more does not draft.
    max_step_rows: int = 8
    # Drafts per request follow its measured acceptance and this machine's measured cost of wider passes
    # (`Acceptance.drafts`); False always proposes as many as the row budget allows.
    adaptive: bool = True
    model: str | None = None  # the draft model, for method "draft"
    draft_vocab: int | None = None  # the draft model proposes only the first token ids (draft.py); None: all

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 15:  # k + 1 tokens must stay a short chunk (model/paged_kv.py: SHORT_CHUNK)
            raise ValueError(f"speculative k must be in [1, 15], got {self.k}")
        if self.max_step_rows < 2:
            raise ValueError(f"max_step_rows must be >= 2, got {self.max_step_rows}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n} and {self.max_n}")
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ValueError(f"draft_vocab must be >= 1, got {self.draft_vocab}")
        if (self.method == "draft") != (self.model is not None):
            raise ValueError('speculative method "draft" needs a "model" (a registry name or path), and only it '
                             f"takes one; got method {self.method!r} with model {self.model!r}")

    @classmethod
    def of(cls, spec: object) -> Speculation | None:
        """LLM's `speculative`: None, "ngram", "lookahead", or {"method": ..., "k": ..., ...} (a draft model:
        {"method": "draft", "model": ...})."""
        if spec is None or isinstance(spec, Speculation):
            return spec
        if isinstance(spec, str) and spec in METHODS:
            return cls(method=spec)
        if isinstance(spec, dict) and spec.get("method") in METHODS:
            return cls(**spec)
        raise ValueError(f"speculative must be None, 'ngram', 'lookahead' or {{'method': 'ngram', 'k': ...}} "
                         f"(a draft model: {{'method': 'draft', 'model': ...}}), got {spec!r}")

    def drafts_per_sequence(self, running: int) -> int:
        """How many drafts each of `running` decoding sequences may get in one step."""
        return max(0, min(self.k, (self.max_step_rows - running) // max(running, 1)))

    def propose(self, tokens: Sequence[int], room: int, state: RequestDrafts, cost: PassCost, rows: int) -> list[int]:
        """Drafts after `tokens` for a request whose drafting so far is `state`, in a pass of `rows` other rows:
        at most `room`, and with `adaptive` only as many as are expected to pay. Prompt lookup first (a
        recurring suffix of the text predicts best); where it finds none, lookahead drafts the model's own
        earlier predictions."""
        wanted = self.wanted(state, state.lookup, room, cost, rows)
        drafts = propose_ngram(tokens, wanted, self.max_n, self.min_n) if wanted > 0 else []
        if not drafts and self.method == "lookahead":
            wanted = self.wanted(state, state.guesses, room, cost, rows)
            drafts = state.trajectory.propose(tokens[-1], wanted) if wanted > 0 else []
        return drafts

    def wanted(self, state: RequestDrafts, source: Acceptance, room: int, cost: PassCost, rows: int,
               per_draft: float = 0.0) -> int:
        """How many drafts `source` (one of `state`'s) is to propose, up to `room`; `per_draft`: what making
        one costs, against a one-row pass (a draft model's pass; 0 for lookups)."""
        state.pending = source
        return source.drafts(room, cost, rows, per_draft) if self.adaptive else room


@dataclass
class PassCost:
    """What a pass over r rows costs relative to one over a single row, as this machine measures it: an
    average of each row count's recent pass times (decode and verification steps only), and until a count
    has been seen, the prior 1 + `slope` (r - 1) (a 2-core CPU: a 6-row pass ~1.7x a 1-row one)."""

    slope: float = 0.14
    seconds: dict[int, float] = field(default_factory=dict)  # rows -> moving average of a pass's seconds
    weight: float = 0.1  # of each new pass in the average

    def record(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else old + self.weight * (seconds - old)

    def ratio(self, rows: int, extra: int) -> float:
        """A pass over rows + extra rows against one over `rows`."""
        measured = self.seconds.get(rows), self.seconds.get(rows + extra)
        if None not in measured:
            return measured[1] / measured[0]
        return self._line(rows + extra) / self._line(rows)

    def estimate(self, rows: int) -> float | None:
        """Seconds of a pass over `rows` rows: measured, or else the nearest row count measured scaled along the
        prior's line; None before any pass is measured."""
        if rows in self.seconds or not self.seconds:
            return self.seconds.get(rows)
        near = min(self.seconds, key=lambda r: (abs(r - rows), r))
        return self.seconds[near] * self._line(rows) / self._line(near)

    def _line(self, rows: int) -> float:
        return 1 + self.slope * (rows - 1)


PRIOR_COST = PassCost()  # never records: the same answer on every machine and in every run


@dataclass
class Acceptance:
    """A request's recent drafts: the chance that a draft is kept, given the ones before it were (kept
    drafts over drafts decided: a verification that keeps a of d decided a + 1 of them, or d when it kept
    all), averaged over recent verifications from a neutral prior. `drafts` picks how many drafts pay."""

    kept: float = 1.0  # prior: one of two
    decided: float = 2.0
    idle: int = 0  # passes since the request last drafted
    decay: float = 0.8  # of the past, per verification
    probe_after: int = 16  # passes without drafts before one is tried again

    def record(self, drafted: int, accepted: int) -> None:
        self.kept = self.decay * self.kept + accepted
        self.decided = self.decay * self.decided + accepted + (accepted < drafted)
        self.idle = 0

    @property
    def rate(self) -> float:
        return self.kept / self.decided

    def drafts(self, most: int, cost: PassCost, rows: int, per_draft: float = 0.0) -> int:
        """The number of drafts, up to `most`, that maximises expected tokens per unit of time in a pass of
        `rows` other rows: (1 + a + a^2 + ... + a^d) / (cost ratio + d `per_draft`). 0 when none pays; after
        `probe_after` passes without drafts, one, so that a request whose text turns repetitive is noticed."""
        a, best, best_gain = self.rate, 0, 1.0
        expected = 1.0
        for d in range(1, most + 1):
            expected += a**d
            gain = expected / (cost.ratio(rows, d) + d * per_draft)
            if gain > best_gain:
                best, best_gain = d, gain
        if best == 0:
            self.idle += 1
            if self.idle >= self.probe_after and most > 0:
                self.idle = 0
                return 1
        return best


@dataclass
class Trajectory:
    """Lookahead's memory of one request (after Fu et al., 2024, on one draft chain per pass): what its
    verification passes predicted. A pass over [x_0 .. x_k] gives the argmax o_i after each x_i; the
    verdict keeps a drafts and adds o_a. Then:

    - Jacobi: o_{a+1} .. o_k are the model's guesses for the positions after o_a, computed from a context
      that was partly wrong; fed back as the next drafts, each pass refines them (the fixed point of this
      iteration is the greedy output, which the verification makes exact at every step);
    - the pool: each (x_i, o_i) is a bigram the model predicted; chained from the last token, they draft
      what the model said follows it before (the n-grams of the trajectory)."""

    guesses: list[int] = field(default_factory=list)
    pool: dict[int, int] = field(default_factory=dict)  # token -> the token the model last predicted after it

    def record(self, inputs: Sequence[int], outputs: Sequence[int], accepted: int) -> None:
        self.guesses = list(outputs[accepted + 1 :])
        self.pool.update(zip(inputs, outputs))

    def propose(self, last: int, k: int) -> list[int]:
        """k drafts after `last`: the pending Jacobi guesses, continued along the pool, and where neither
        reaches, the last of them repeated (Jacobi iteration starts from any guess; this one is right for a
        repeating token)."""
        drafts, self.guesses = self.guesses[:k], []
        token = drafts[-1] if drafts else last
        while len(drafts) < k:
            token = self.pool.get(token, token)
            drafts.append(token)
        return drafts


@dataclass
class RequestDrafts:
    """A request's drafting so far: how each source's drafts fared (prompt lookup's, lookahead's own
    guesses and a draft model's, apart: guesses that miss must not turn off lookups that hit), and
    (lookahead) what its passes predicted."""

    lookup: Acceptance = field(default_factory=Acceptance)
    guesses: Acceptance = field(default_factory=Acceptance)
    model: Acceptance = field(default_factory=Acceptance)
    trajectory: Trajectory = field(default_factory=Trajectory)
    pending: Acceptance | None = None  # the source of the drafts awaiting verification

    def record(self, drafted: int, accepted: int) -> None:
        """The verdict on the pending drafts, for their source."""
        self.pending.record(drafted, accepted)


@dataclass(frozen=True)
class Verdict:
    accepted: int  # how many drafts were kept
    tokens: list[int]  # the kept drafts, then the target's own token: accepted + 1 tokens


def propose_ngram(tokens: Sequence[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Prompt lookup: for n from max_n down to min_n, find the latest earlier occurrence of the last n tokens
    and propose the k tokens that followed it, copied as LZ77 copies (a continuation that runs into the end
    goes on with the tokens just proposed, so a repeating stretch keeps repeating); [] when no suffix recurs."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = list(tokens[size - n :])
        for start in range(size - n - 1, -1, -1):  # the latest match first: the freshest context
            if list(tokens[start : start + n]) == suffix:
                copied = list(tokens)
                for i in range(start + n, start + n + k):
                    copied.append(copied[i])
                return copied[size:]
    return []


def verify_greedy(draft: Sequence[int], target: Sequence[int]) -> Verdict:
    """`target`: the argmax after each prefix, len(draft) + 1 of them."""
    if len(target) != len(draft) + 1:
        raise ValueError(f"{len(draft)} drafts need {len(draft) + 1} target tokens, got {len(target)}")
    accepted = next((i for i, (d, t) in enumerate(zip(draft, target)) if d != t), len(draft))
    return Verdict(accepted, [*draft[:accepted], target[accepted]])


def verify_sampled(draft: Sequence[int], p: torch.Tensor, q: torch.Tensor | None,
                   generator: torch.Generator) -> Verdict:
    """`p` [k + 1, V]: the target's processed probabilities after each prefix; `q` [k, V]: the draft
    distributions the drafts were drawn from, or None for point-mass drafts. Uniforms and the residual draw
    come from `generator` (the request's), so a seeded request is reproducible."""
    k = len(draft)
    if p.shape[0] != k + 1 or (q is not None and q.shape[0] != k):
        raise ValueError(f"{k} drafts need p of {k + 1} rows and q of {k}, got {p.shape[0]} and "
                         f"{None if q is None else q.shape[0]}")
    for i, d in enumerate(draft):
        q_d = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand((), dtype=torch.float64, generator=generator))
        if u * q_d < float(p[i, d]):  # u < p / q, without dividing by a q of 0
            continue
        return Verdict(i, [*draft[:i], draw(_residual(p[i], q[i] if q is not None else _point(p[i], d)), generator)])
    return Verdict(k, [*draft, draw(p[k], generator)])


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejection draws from (unnormalised): the target's mass the draft under-proposed."""
    return (p - q).clamp(min=0)


def _point(row: torch.Tensor, token: int) -> torch.Tensor:
    mass = torch.zeros_like(row)
    mass[token] = 1.0
    return mass


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn in proportion to `weights` [V]."""
    return int(torch.multinomial(weights.double(), 1, generator=generator))
