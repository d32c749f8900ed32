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
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Speculation:
    """Prompt lookup: up to `k` drafts per pass, from the longest recurring suffix of `max_n` down to `min_n`
    tokens. A request speculates when it has no penalties, constraint or logprobs (those come later).

    min_n = 2 by default: a lone recurring token predicts poorly (on SmolLM2 and Qwen2.5-Coder-0.5B about
    0.3 of first drafts kept, against 0.55-0.9 after two), and a pass that feeds k rejected drafts costs
    up to 1.7x a plain one on a 2-core CPU (`seriatim bench --speculative`)."""

    k: int = 5
    max_n: int = 4
    min_n: int = 2
    # Rows (tokens) a step may feed before drafts stop paying: on a 2-core CPU a pass over 8 rows costs ~2x a
    # pass over one (`seriatim bench --rows`), over 16 ~3.3x, while drafts add ~0.5-1.5 tokens a pass. So the
    # drafts of a step share what its plain decodes leave of 8 rows, and a batch of 8 or more does not draft.
    max_step_rows: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 15:  # k + 1 tokens must stay a short chunk (model/paged_kv.py: SHORT_CHUNK)
            raise ValueError(f"speculative k must be in [1, 15], got {self.k}")
        if self.max_step_rows < 2:
            raise ValueError(f"max_step_rows must be >= 2, got {self.max_step_rows}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n} and {self.max_n}")

    @classmethod
    def of(cls, spec: object) -> Speculation | None:
        """LLM's `speculative`: None, "ngram", or {"method": "ngram", "k": ..., "max_n": ..., "min_n": ...}."""
        if spec is None or isinstance(spec, Speculation):
            return spec
        if spec == "ngram":
            return cls()
        if isinstance(spec, dict) and spec.get("method") == "ngram":
            return cls(**{key: value for key, value in spec.items() if key != "method"})
        raise ValueError(f"speculative must be None, 'ngram' or {{'method': 'ngram', 'k': ...}}, got {spec!r}")

    def drafts_per_sequence(self, running: int) -> int:
        """How many drafts each of `running` decoding sequences may get in one step."""
        return max(0, min(self.k, (self.max_step_rows - running) // max(running, 1)))

    def propose(self, tokens: Sequence[int], room: int) -> list[int]:
        """Drafts after `tokens`, at most `room` of them."""
        return propose_ngram(tokens, room, self.max_n, self.min_n) if room > 0 else []


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
        return Verdict(i, [*draft[:i], _draw(_residual(p[i], q[i] if q is not None else _point(p[i], d)), generator)])
    return Verdict(k, [*draft, _draw(p[k], generator)])


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejection draws from (unnormalised): the target's mass the draft under-proposed."""
    return (p - q).clamp(min=0)


def _point(row: torch.Tensor, token: int) -> torch.Tensor:
    mass = torch.zeros_like(row)
    mass[token] = 1.0
    return mass


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(weights.double(), 1, generator=generator))
