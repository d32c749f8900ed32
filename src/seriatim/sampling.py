"""Token sampling: request parameters, per-sequence state, and the batched sampler.

Processing order, applied to each row's logits (computed in float32):

1. ``logit_bias``: added to the listed token ids.
2. Repetition penalty (CTRL), over tokens present in the prompt *or* the output:
   positive logits are divided by the penalty, negative ones multiplied by it.
3. Presence and frequency penalties (OpenAI), over output tokens only:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
4. ``temperature == 0``: greedy, the argmax (ties go to the lowest token id). Stop here.
5. Divide by ``temperature`` (after subtracting the row's maximum, which leaves the distribution
   as it is and keeps a tiny temperature from overflowing: as it tends to 0, sampling tends to greedy).
6. Top-k: keep the ``top_k`` highest logits (0 disables).
7. Top-p (nucleus): keep the smallest set of most probable tokens whose
   cumulative probability reaches ``top_p``; the most probable token is always kept.
8. Min-p: keep tokens whose probability is at least ``min_p`` times the largest.
9. Draw from the softmax of what is left with the row's own generator.

A constrained row (a JSON schema, regex, grammar or choice; see grammar/) has every token its grammar
forbids set to -inf after step 3, so neither a bias nor a penalty nor a later step can bring one back.

The draw is an exponential race (Gumbel-max): ``argmax(logits + Gumbel noise)``,
with exactly one uniform number per vocabulary entry per step whatever the
parameters, so a seeded request is reproducible. Every row depends only on its own
logits, parameters and generator, so a request yields the same tokens whatever
else shares its batch.

Returned logprobs are the RAW model log-probabilities, ``log_softmax`` of the
unprocessed logits, not of the processed distribution.
"""

from __future__ import annotations

import copy
import math
import numbers
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import ParameterError
from .grammar.constraint import KINDS, Constraint
from .grammar.state import GrammarState, mask_logits
from .kernels import library

MAX_LOGPROBS = 20


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (vLLM-like names and defaults)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per token; 0 = the chosen token only
    trace: bool = False  # with logprobs: each token's StepTrace (processed probabilities, cuts, entropy)
    speculate: bool = True  # where the engine speculates (LLM's `speculative`); False decodes this one plainly
    # At most one constraint on the output (vLLM's names): a JSON schema (a dict or its JSON text), any JSON
    # object, a regular expression, a grammar (llguidance's Lark, or llama.cpp's GBNF) or a list of choices.
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    constraint: Constraint | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise ParameterError(name, f"{name} must be a finite number, got {v!r}")
        for name, optional in (("top_k", False), ("max_tokens", False), ("seed", True), ("logprobs", True)):
            v = getattr(self, name)
            if not (_is_int(v) or (optional and v is None)):
                raise ParameterError(name, f"{name} must be an int{' or None' if optional else ''}, got {v!r}")
        self._check(self.temperature >= 0, "temperature", "must be >= 0")
        self._check(self.top_k >= 0, "top_k", "must be >= 0 (0 disables)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        self._check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        self._check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        self._check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        self._check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        if self.seed is not None:
            # torch.Generator.manual_seed takes a 64-bit unsigned seed.
            self._check(0 <= self.seed < 2**64, "seed", "must be in [0, 2**64)")
        if self.logprobs is not None:
            self._check(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "trace", "speculate"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(name, f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.trace and self.logprobs is None:
            raise ParameterError("trace", "trace needs logprobs: it explains the top alternatives logprobs lists")
        self._normalise_logit_bias()
        self._normalise_stop()
        self._normalise_constraint()

    def _check(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ParameterError(name, f"{name} {rule}, got {getattr(self, name)!r}")

    def _normalise_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ParameterError("logit_bias",
                                 f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
        for k, v in self.logit_bias.items():
            if not _is_int(k):
                raise ParameterError("logit_bias", f"logit_bias keys must be int token ids, got {k!r}")
            if not _is_real(v) or not -100 <= v <= 100:
                raise ParameterError("logit_bias", f"logit_bias values must be in [-100, 100], got {v!r} for token {k}")
        # A private copy, so later edits to the caller's dict cannot change a frozen request.
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})

    def _normalise_stop(self) -> None:
        stop = self.stop
        if stop is None:
            return
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise ParameterError("stop", f"stop must be a str or a list of str, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ParameterError("stop", f"stop strings must be non-empty str, got {s!r}")
        object.__setattr__(self, "stop", tuple(stop) or None)

    def _normalise_constraint(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ParameterError("json_object", f"json_object must be a bool, got {self.json_object!r}")
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if not given:
            return
        if len(given) > 1:
            raise ParameterError(given[1], f"one constraint per request, got {' and '.join(given)}")
        if self.ignore_eos:
            raise ParameterError("ignore_eos", "ignore_eos cannot be combined with a constraint, whose grammar "
                                 "decides where the output ends")
        object.__setattr__(self, "constraint", Constraint.of(given[0], getattr(self, given[0])))

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Raise ParameterError if a logit_bias key is not a token id of this vocabulary."""
        for k in self.logit_bias or {}:
            if not 0 <= k < vocab_size:
                raise ParameterError("logit_bias",
                                     f"logit_bias token id {k} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether any repetition, presence or frequency penalty is active."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


class SamplingState:
    """One sequence's sampling state: its generator and the token history penalties need.

    ``sample`` does not record the chosen token; call ``append`` once it is accepted.
    ``counts`` and ``prompt_mask`` are None when no penalty needs them, to keep steps cheap; ``grammar``
    is the compiled constraint's state (grammar/compiler.py), None for an unconstrained request.
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 device: torch.device | str, grammar: GrammarState | None = None) -> None:
        params.validate_for_vocab(vocab_size)
        if (params.constraint is None) != (grammar is None):
            raise ValueError("a constrained request needs its grammar state, and only it has one")
        self.params = params
        self.grammar = grammar
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        # An unseeded request still gets its own stream, independent of global RNG state.
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(64))
        self.counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        if params.penalised:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            self.prompt_mask[torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=self.device)
            self.bias_values = torch.tensor(list(params.logit_bias.values()), device=self.device)

    def append(self, token_id: int) -> None:
        """Record a chosen output token (GrammarError, recording nothing, if its grammar gives up on it)."""
        if self.grammar is not None:
            self.grammar.accept(token_id)
        if self.counts is not None:
            self.counts[token_id] += 1

    def ahead(self, tokens: Sequence[int]) -> SamplingState:
        """This state as it will be once `tokens` are appended (a speculation's drafts), for processing
        only: its penalties count them (its grammar is shared, not advanced). Itself when no penalty does."""
        if self.counts is None or not tokens:
            return self
        later = copy.copy(self)
        later.counts = self.counts.clone()
        later.counts.index_put_((torch.tensor(list(tokens), device=self.device),),
                                torch.ones(len(tokens), device=self.device), accumulate=True)
        return later

    def branch(self) -> SamplingState:
        """This state with a grammar of its own at the same place (a draft model's drafts advance it and leave
        it), sharing the rest: the generator draws on. Itself when it has no grammar."""
        if self.grammar is None:
            return self
        branch = copy.copy(self)
        branch.grammar = self.grammar.copy()
        return branch

    def forced(self) -> list[int]:
        """Tokens the grammar forces next, to append without sampling (jump-forward). None are forced for a
        request that wants logprobs: each of its tokens is sampled, so each has the model's logprob."""
        if self.grammar is None or self.params.logprobs is not None:
            return []
        return self.grammar.forced()


@dataclass
class TokenLogprobs:
    """Raw model log-probability of a chosen token, and the top alternatives (descending)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    trace: StepTrace | None = None


@dataclass
class StepTrace:
    """Why a token was drawn (SamplingParams.trace): the entropy (nats) of the model's distribution and of the
    processed one the draw came from, and for the chosen token and each raw top alternative its processed
    log-probability (-inf where a cut removed it) and which cut did: "grammar", "greedy", "top_k", "top_p"
    or "min_p" (None: kept)."""

    entropy: float
    processed_entropy: float
    tokens: dict[int, tuple[float, str | None]]  # token id -> (processed logprob, removed by)


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _column(states: list[SamplingState], name: str, device: torch.device) -> torch.Tensor:
    """One parameter of every row, as a [B, 1] float32 tensor."""
    return torch.tensor([[float(getattr(s.params, name))] for s in states], device=device)


def _apply_bias(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    rows = [i for i, s in enumerate(states) if s.bias_ids is not None]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:  # only biased rows; each touches just its listed ids
        logits[i].index_add_(0, states[i].bias_ids, states[i].bias_values)
    return logits


def _apply_grammar(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    rows = [i for i, s in enumerate(states) if s.grammar is not None]
    if not rows:
        return logits
    return mask_logits(logits, rows, [states[i].grammar for i in rows])


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    rows = [i for i, s in enumerate(states) if s.params.penalised]
    if not rows:
        return logits
    sub = [states[i] for i in rows]
    dev = logits.device
    x = logits[rows]
    counts = torch.stack([s.counts for s in sub])
    in_output = counts > 0
    seen = in_output | torch.stack([s.prompt_mask for s in sub])
    # Clamped: a penalty near 0 would send seen logits to inf, and inf - inf to NaN further on; one beyond
    # float32's range would be inf, and a logit of 0 times it NaN.
    big = torch.finfo(x.dtype).max
    rep = _column(sub, "repetition_penalty", dev).clamp(max=big)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x).clamp(-big, big)
    x = x - _column(sub, "frequency_penalty", dev) * counts - _column(sub, "presence_penalty", dev) * in_output
    logits = logits.clone()
    logits[rows] = x
    return logits


def _ranked(logits: torch.Tensor, top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits in descending order, equal logits by ascending id, and their ids: [B, C] each.

    C covers at least every row's top k. With a top-k on every row, only the candidates at or above
    each row's k-th value are sorted (all of them, ties included, so the order is the full stable
    sort's): ~0.3 ms instead of ~3 ms for a 49k vocabulary."""
    vocab = logits.shape[-1]
    if int(top_k.max()) < vocab:
        kth = logits.topk(int(top_k.max()), dim=-1).values.gather(-1, top_k - 1)  # [B, 1]
        count = int((logits >= kth).sum(dim=-1).max())
        if count < vocab:
            ids = logits.topk(count, dim=-1).indices.sort(dim=-1).values  # by id, then stably by value
            values, order = logits.gather(-1, ids).sort(dim=-1, descending=True, stable=True)
            return values, ids.gather(-1, order)
    return logits.sort(dim=-1, descending=True, stable=True)


def _cuts(logits: torch.Tensor, states: list[SamplingState]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Temperature-scaled logits in descending order, their ids, and what top-k, top-k + top-p and
    top-k + top-p + min-p drop from them ([B, C] each)."""
    dev, vocab = logits.device, logits.shape[-1]
    top_k = torch.tensor([[min(s.params.top_k, vocab) or vocab] for s in states], device=dev)  # int64
    # At least float32's smallest normal: a smaller top_p (> 0) would round to 0 and cut every token.
    top_p = _column(states, "top_p", dev).clamp(min=torch.finfo(torch.float32).tiny)
    min_p = _column(states, "min_p", dev)
    # Among equal logits the lower id ranks first, so cuts are deterministic.
    sorted_logits, order = _ranked(logits, top_k)
    by_k = torch.arange(sorted_logits.shape[-1], device=dev) >= top_k
    sorted_logits = sorted_logits.masked_fill(by_k, -math.inf)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 must keep everything, even where float32 cumsum rounds up to 1 early.
    by_p = by_k | ((mass_before >= top_p) & (top_p < 1))
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); renormalising does not change it.
    # The top token always survives: top_k >= 1, no mass precedes it, and it is the max.
    by_min_p = by_p | (sorted_logits < sorted_logits[:, :1] + torch.log(min_p))
    return sorted_logits, order, [by_k, by_p, by_min_p]


def _truncate(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Top-k, then top-p, then min-p, on temperature-scaled logits; cut tokens become -inf."""
    sorted_logits, order, drops = _cuts(logits, states)
    sorted_logits = sorted_logits.masked_fill(drops[-1], -math.inf)
    return torch.full_like(logits, -math.inf).scatter_(-1, order, sorted_logits)


def _truncates(params: SamplingParams, vocab: int) -> bool:
    return not params.greedy and (0 < params.top_k < vocab or params.top_p < 1 or params.min_p > 0)


def _process(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Processed [B, V] float32 logits; -inf marks tokens that cannot be drawn.

    A greedy row keeps only its argmax, so drawing from it is deterministic.
    """
    x = _apply_grammar(_apply_penalties(_apply_bias(logits, states), states), states)
    if any(s.params.greedy for s in states):
        greedy = torch.tensor([[s.params.greedy] for s in states], device=x.device)
        is_max = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.argmax(-1, keepdim=True), True)
        x = x.masked_fill(greedy & ~is_max, -math.inf)
    # Greedy rows divide by 1: their single finite logit survives every cut below.
    # At most float32's largest: a larger one would round to inf, and -inf / inf is NaN.
    temperature = torch.tensor([[s.params.temperature or 1.0] for s in states], device=x.device).clamp(
        max=torch.finfo(torch.float32).max)
    # Shifted by the row's maximum first: the same distribution, and a tiny temperature sends the other
    # tokens to -inf (greedy, its limit) instead of overflowing the top ones to inf.
    x = (x - x.amax(-1, keepdim=True)) / temperature
    if any(_truncates(s.params, x.shape[-1]) for s in states):
        x = _truncate(x, states)
    return x


def process_rows(logits: torch.Tensor, state: SamplingState, drafts: Sequence[int] = ()) -> torch.Tensor:
    """Log-probabilities [N, V] of what `sample` would draw from for each row of one request's logits [N, V]
    (a speculative verification's positions): row i as if drafts[:i] had been appended (penalties count
    them; a grammar, which must allow them, masks row i from where they take it)."""
    if state.grammar is None:
        return _process(logits.float(), [state.ahead(drafts[:i]) for i in range(len(logits))]).log_softmax(dim=-1)
    rows = []
    for i in range(len(logits)):
        rows.append(_process(logits[i : i + 1].float(), [state.ahead(drafts[:i])]))
        if i < len(logits) - 1:
            state.grammar.accept(drafts[i])
    state.grammar.rollback(len(logits) - 1)
    return torch.cat(rows).log_softmax(dim=-1)


def process_logits(logits_row: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Log-probabilities [V] of the distribution ``sample`` draws from; -inf for cut tokens.

    Does not advance the generator. A greedy row gives 0 at its argmax, -inf elsewhere.
    """
    return _process(logits_row.float()[None], [state])[0].log_softmax(dim=-1)


def _gumbel(states: list[SamplingState], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Gumbel noise; row i comes from states[i]'s generator, zero for greedy rows.

    Exactly vocab_size float64 uniforms per sampled row per step, whatever the parameters.
    """
    noise = torch.zeros(shape, device=device)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if not rows:
        return noise
    u = torch.empty(len(rows), shape[1], dtype=torch.float64, device=device)
    for j, i in enumerate(rows):
        u[j].uniform_(generator=states[i].generator)
    # u == 0 would give -inf noise and could wipe out a row's only surviving token.
    u.clamp_(min=torch.finfo(torch.float64).tiny)
    noise[rows] = (-torch.log(-torch.log(u))).float()
    return noise


def token_logprobs(logits: torch.Tensor, states: list[SamplingState],
                   token_ids: list[int]) -> list[TokenLogprobs | None]:
    """Raw (unprocessed) log-probabilities of `token_ids` [B] and the top alternatives, for the rows of `logits`
    [B, V] whose states asked for them."""
    out: list[TokenLogprobs | None] = [None] * len(states)
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return out
    raw = logits[rows].log_softmax(dim=-1)
    chosen_ids = torch.tensor([[token_ids[i]] for i in rows], device=logits.device)
    chosen = raw.gather(-1, chosen_ids)[:, 0].tolist()
    n_top = min(max(states[i].params.logprobs for i in rows), raw.shape[-1])
    top_lp, top_ids = (t.tolist() for t in raw.topk(n_top, dim=-1))
    for j, i in enumerate(rows):
        n = states[i].params.logprobs
        out[i] = TokenLogprobs(token_ids[i], chosen[j], list(zip(top_ids[j][:n], top_lp[j][:n])))
    return out


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of [B, V] float32 (first index of the largest; NaN counts as largest): on the CPU by
    seriatim's kernel where built (torch's argmax is single-threaded), the same indices."""
    if x.device.type == "cpu" and (ops := library.ops()) is not None:
        return ops.argmax_rows(x)
    return x.argmax(dim=-1)


def sample(logits: torch.Tensor, states: list[SamplingState]) -> SampleOutput:
    """Pick one token per row of ``logits`` [B, V]; does not ``append`` it to the states."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [{len(states)}, V], got {tuple(logits.shape)}")
    if any(s.vocab_size != logits.shape[1] for s in states):
        raise ValueError(f"logits have {logits.shape[1]} columns but a state expects another vocab size")
    x = logits.float()
    if all(s.params.greedy and not s.params.penalised and s.bias_ids is None and s.grammar is None for s in states):
        tokens = _argmax(x)  # fast path: nothing to process, nothing to draw
    else:
        tokens = _argmax(_process(x, states) + _gumbel(states, tuple(x.shape), x.device))
    token_ids = tokens.tolist()
    logprobs = token_logprobs(x, states, token_ids)
    for i, s in enumerate(states):
        if s.params.trace:
            ids = [token_ids[i], *(t for t, _ in logprobs[i].top)]
            logprobs[i].trace = trace_step(x[i], s, ids)
    return SampleOutput(token_ids, logprobs)


_CUTS = ("top_k", "top_p", "min_p")


def trace_step(logits_row: torch.Tensor, state: SamplingState, token_ids: list[int]) -> StepTrace:
    """The processing of one row's logits [V] explained for `token_ids`: see StepTrace. Before `append`."""
    raw = logits_row.float()[None]
    reasons: dict[int, str] = {}
    adjusted = _apply_penalties(_apply_bias(raw, [state]), [state])
    masked = _apply_grammar(adjusted, [state])
    for t in token_ids:
        if masked[0, t] == -math.inf and adjusted[0, t] != -math.inf:
            reasons[t] = "grammar"
    if state.params.greedy:
        top = int(masked[0].argmax())
        reasons.update({t: "greedy" for t in token_ids if t != top and t not in reasons})
    elif _truncates(state.params, raw.shape[-1]):
        scaled = (masked - masked.amax(-1, keepdim=True)) / state.params.temperature
        _, order, drops = _cuts(scaled, [state])
        position = {int(t): i for i, t in enumerate(order[0].tolist())}
        for t in token_ids:
            at = position.get(t)
            cut = next((name for name, drop in zip(_CUTS, drops) if at is None or drop[0, at]), None)
            if cut is not None and t not in reasons:
                reasons[t] = cut
    processed = _process(raw, [state])[0].log_softmax(-1)
    return StepTrace(_entropy(raw[0].log_softmax(-1)), _entropy(processed),
                     {t: (float(processed[t]), reasons.get(t)) for t in token_ids})


def _entropy(logprobs: torch.Tensor) -> float:
    p = logprobs.exp()
    return float(-(p * logprobs.nan_to_num(neginf=0.0)).sum())
