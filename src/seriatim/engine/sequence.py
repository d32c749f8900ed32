"""One request's generation state: its tokens, cache, text and why it stopped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..outputs import CompletionOutput, Delta, FinishReason, RequestMetrics
from ..sampling import SamplingParams, SamplingState, TokenLogprobs
from ..text.detokenizer import IncrementalDetokenizer
from .block_manager import BlockTable
from .speculation import RequestDrafts
from .stopping import StopStringFilter


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_length: int  # prompt + output tokens at which generation stops ("length")
    block_table: BlockTable = field(default_factory=BlockTable)
    num_cached: int = 0  # leading tokens whose keys and values are in the KV cache
    stops: StopStringFilter = field(init=False)
    output_ids: list[int] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)  # proposed tokens after output_ids, fed to be verified
    draft_probs: torch.Tensor | None = None  # [len(draft), V] a draft model's distributions they were drawn from
    drafting: RequestDrafts = field(default_factory=RequestDrafts)  # how its drafts have fared
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None  # with finish_reason "error": why
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self) -> None:
        self.stops = StopStringFilter(self.params.stop)
        self.metrics.prompt_tokens = len(self.prompt_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def fed_length(self) -> int:
        """Tokens the cache is to hold after this sequence's next pass: its own, then any drafts."""
        return self.length + len(self.draft)

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def pending_tokens(self) -> list[int]:
        """Tokens not yet in the KV cache: the prompt at first, then the last sampled token; then the drafts."""
        done = self.num_cached
        if done < len(self.prompt_ids):
            return self.prompt_ids[done:] + self.output_ids + self.draft
        return self.output_ids[done - len(self.prompt_ids) :] + self.draft

    def append(self, token: int, logprobs: TokenLogprobs | None) -> Delta:
        """Take one sampled token; return the text it releases and whether the request is done. GrammarError,
        taking nothing, if the request's grammar gives up on it."""
        self.sampling.append(token)
        now = time.perf_counter()
        if self.metrics.first_token is None:
            self.metrics.first_token = now
        else:
            self.metrics.max_inter_token = max(self.metrics.max_inter_token, now - self.metrics.last_token)
        self.metrics.last_token = now
        self.output_ids.append(token)
        self.metrics.output_tokens = len(self.output_ids)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)

        if token in self.eos_ids and not self.params.ignore_eos:
            text = self._finish("stop", self.stops.push(self.detokenizer.flush()))
        else:
            text = self.stops.push(self.detokenizer.push(token))
            if self.stops.stopped:
                self._finish("stop", "")
            elif len(self.output_ids) >= self.params.max_tokens or self.length >= self.max_length:
                rest = self.stops.push(self.detokenizer.flush())  # held-back bytes may complete a stop string
                text += self._finish("stop" if self.stops.stopped else "length", rest)
        self.text += text
        return Delta(
            self.request_id, text, [token], [logprobs] if self.logprobs is not None else None,
            self.finish_reason, self.metrics if self.finished else None,
        )

    def extend(self, tokens: list[int], delta: Delta, logprobs: list[TokenLogprobs | None] | None = None) -> Delta:
        """Append more tokens after the one `delta` carries (a grammar's forced tokens, a speculation's
        accepted ones, with their `logprobs` if computed), until one ends the request; one delta for them all."""
        for token, lp in zip(tokens, logprobs or [None] * len(tokens)):
            if self.finished:
                break
            more = self.append(token, lp)
            delta.text += more.text
            delta.token_ids += more.token_ids
            if delta.logprobs is not None and lp is not None:
                delta.logprobs.append(lp)
            delta.finish_reason, delta.metrics = more.finish_reason, more.metrics
        return delta

    def abort(self) -> None:
        self._finish("abort", "")

    def fail(self, error: str, delta: Delta) -> Delta:
        """End the request because it cannot go on, adding to `delta` (this step's) why, and any text held back."""
        text = self._finish("error", "")
        self.text += text
        self.error = delta.error = error
        delta.text += text
        delta.finish_reason, delta.metrics = "error", self.metrics
        return delta

    def _finish(self, reason: FinishReason, text: str) -> str:
        """Mark finished; return `text` plus anything the stop filter still held (unless a stop matched)."""
        self.finish_reason = reason
        self.metrics.finished = time.perf_counter()
        return text if self.stops.stopped else text + self.stops.flush()

    def result(self) -> CompletionOutput:
        return CompletionOutput(
            text=self.text,
            token_ids=list(self.output_ids),
            prompt_token_ids=list(self.prompt_ids),
            finish_reason=self.finish_reason,
            logprobs=self.logprobs,
            metrics=self.metrics,
            error=self.error,
        )
