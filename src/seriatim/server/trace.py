"""seriatim's extension of `/v1/completions` for the playground: with `"trace": true` (and `logprobs: N` for
N alternatives), each choice (each streamed chunk, and the whole response) carries a `trace` object next to
OpenAI's fields:

    {"pass": {"index": 12, "ms": 7.1, "tokens": 1},          # streamed chunks: the forward pass of its tokens
     "tokens": [{"id": 791, "text": " the", "logprob": -0.9, "processed_logprob": -0.4,
                 "entropy": 2.31, "processed_entropy": 1.02,
                 "alternatives": [{"id": 264, "text": " a", "logprob": -1.6, "processed_logprob": -1.1,
                                   "removed_by": null}, ...]}]}

`logprob` is the model's (raw), `processed_logprob` that of the distribution the token was drawn from,
after penalties, the grammar, temperature and the cuts (null where one removed it; `removed_by` names it:
grammar, greedy, top_k, top_p, min_p). Entropies are in nats."""

from __future__ import annotations

import math

from ..outputs import Pass
from ..sampling import TokenLogprobs
from .formatting import TokenTexts


def trace_body(texts: TokenTexts, logprobs: list[TokenLogprobs], forward_pass: Pass | None = None) -> dict:
    body = {"tokens": [_token(texts, lp) for lp in logprobs if lp.trace is not None]}
    if forward_pass is not None:
        body["pass"] = {"index": forward_pass.index, "ms": round(1e3 * forward_pass.seconds, 3),
                        "tokens": forward_pass.tokens}
    return body


def _token(texts: TokenTexts, lp: TokenLogprobs) -> dict:
    return {"id": lp.token_id, "text": texts.piece(lp.token_id), "logprob": lp.logprob,
            "processed_logprob": _finite(lp.trace.tokens[lp.token_id][0]),
            "entropy": lp.trace.entropy, "processed_entropy": lp.trace.processed_entropy,
            "alternatives": [{"id": t, "text": texts.piece(t), "logprob": _finite(logprob),
                              "processed_logprob": _finite(lp.trace.tokens[t][0]), "removed_by": lp.trace.tokens[t][1]}
                             for t, logprob in lp.top]}


def _finite(logprob: float) -> float | None:
    return logprob if math.isfinite(logprob) else None  # JSON has no -Infinity
