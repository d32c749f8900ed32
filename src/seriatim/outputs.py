"""What a generation returns: whole results and streamed deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .sampling import TokenLogprobs

# "error": the request could not go on (a grammar llguidance gave up on); the output says why.
FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of one request's milestones."""

    arrival: float
    scheduled: float | None = None  # admitted to the running batch
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    max_inter_token: float = 0.0  # longest wait between two consecutive tokens

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def inter_token_latency(self) -> float | None:
        """Mean time between consecutive tokens (None before the second)."""
        if self.first_token is None or self.last_token is None or self.output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.output_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Rate of the tokens after the first (those produced by decode steps)."""
        if self.finished is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.output_tokens - 1) / max(self.finished - self.first_token, 1e-9)


@dataclass(frozen=True)
class Pass:
    """The forward pass that produced a delta's first token: the engine's step number, its wall time, and the
    tokens of this request it fed (the prompt, or a chunk of it, for the first token; then one, or several
    after tokens a grammar forced)."""

    index: int
    seconds: float
    tokens: int


@dataclass
class Delta:
    """Newly generated tokens of one request and the text they released."""

    request_id: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics | None = None  # set on the last delta of a request
    forward_pass: Pass | None = None
    error: str | None = None  # with finish_reason "error": why


@dataclass
class CompletionOutput:
    """A finished generation."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs] | None = None
    metrics: RequestMetrics | None = field(default=None, repr=False)
    error: str | None = None  # with finish_reason "error": why
