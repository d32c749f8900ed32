"""From a request body to engine requests and back: sampling parameters, limits, and one
`Job` that runs all of a request's choices (prompts x n) on one queue."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..engine.async_engine import AsyncEngine, EngineError, EngineShutDown, QueueFull
from ..engine.engine import ValidPrompt, validate_prompt
from ..errors import ParameterError
from ..outputs import Delta
from ..sampling import SamplingParams, TokenLogprobs
from .constraints import constraint_error, constraint_fields
from .errors import APIError, invalid
from .metrics import Metrics
from .schemas import _Sampling
from .state import ServerConfig


def param_error(e: ValueError, prompt_param: str = "prompt") -> APIError:
    """A 400 for a ValueError of seriatim's: naming the parameter where it is a ParameterError (a prompt's
    under `prompt_param`, "messages" for chat)."""
    if not isinstance(e, ParameterError):
        return invalid(str(e))
    return invalid(str(e), prompt_param if e.param == "prompt" else e.param, e.code)


def check_prompt(ids: list[int], vocab_size: int, context: int, param: str = "prompt") -> ValidPrompt:
    """The engine's prompt checks (engine.validate_prompt) as 400s naming `param`; the ids, checked."""
    try:
        return validate_prompt(ids, vocab_size, context)
    except ParameterError as e:
        raise param_error(e, param) from None


def max_new_tokens(requested: int | None, default: int | None, prompt_len: int, context: int,
                   config: ServerConfig) -> int:
    """Tokens to generate: the request's (or the default), capped by what is left of the context
    and by the server's --max-tokens-cap."""
    value = default if requested is None else requested
    limit = context - prompt_len
    if config.max_tokens_cap is not None:
        limit = min(limit, config.max_tokens_cap)
    return limit if value is None else min(value, limit)


def check_n(n: int | None, prompts: int, config: ServerConfig) -> int:
    """n, within the server's limits (which /openapi.json states: openapi.py). With several prompts n is 1
    (schemas.CompletionRequest), so each bound is one on n, or on the number of prompts."""
    n = 1 if n is None else n
    param = "prompt" if prompts > 1 else "n"
    if not 1 <= n <= config.max_n:
        raise invalid(f"n must be in [1, {config.max_n}], got {n}", "n")
    if prompts * n > config.max_choices:
        raise invalid(f"{prompts} prompts x n={n} is more than {config.max_choices} choices in one request", param)
    if prompts * n > config.max_queue:  # every choice is one engine request: such a request could never start
        raise invalid(f"{prompts} prompts x n={n} choices is more than the server's queue of {config.max_queue} "
                      "requests (--max-queue) can ever hold", param)
    return n


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, seed_offset: int,
                    tool_grammar: str | None = None, trace: bool = False) -> SamplingParams:
    logit_bias = None
    if req.logit_bias is not None:
        logit_bias = {}
        for k, v in req.logit_bias.items():
            if not re.fullmatch("0|[1-9][0-9]*", k):  # int() would also take " 5", "5_0", "٥", "-0"
                raise invalid(f"logit_bias keys must be token ids (integers), got {k!r}", "logit_bias")
            logit_bias[int(k)] = v
    stop = req.stop
    if isinstance(stop, list):
        stop = tuple(stop) or None
    top_k = req.top_k if req.top_k is not None else 0
    constraints = constraint_fields(req, tool_grammar)
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=logit_bias,
            seed=None if req.seed is None else (req.seed + seed_offset) % 2**64,
            stop=stop,
            max_tokens=max_tokens,
            ignore_eos=bool(req.ignore_eos),
            logprobs=logprobs,
            trace=trace,
            speculate=req.speculative is not False,
            **{kind: value for kind, (_, value) in constraints.items()},
        )
    except ParameterError as e:
        raise (constraint_error(e, constraints) if e.param in constraints else param_error(e)) from None
    except ValueError as e:
        raise param_error(e) from None


@dataclass
class Choice:
    index: int
    prompt_ids: ValidPrompt
    params: SamplingParams
    rid: int | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    last_token_at: float | None = None


class Job:
    """All choices of one HTTP request, submitted together, read from one queue.

    `start()` submits them, `events()` yields their deltas, and `close()` (called by whoever streams or
    waits for the response: client gone, timeout, error) aborts whatever has not finished.
    """

    def __init__(self, engine: AsyncEngine, metrics: Metrics, choices: list[Choice], timeout: float | None,
                 constraint: str | None = None):
        self.engine, self.metrics, self.choices = engine, metrics, choices
        self.constraint = constraint  # the request field its constraint came from, if any
        self.arrival = time.perf_counter()
        self.deadline = None if timeout is None else self.arrival + timeout
        self.timeout = timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self._by_rid: dict[int, Choice] = {}
        self._first_token_seen = False

    def close(self) -> None:
        for c in self.choices:
            if c.rid is not None and c.finish_reason is None:
                self.engine.abort(c.rid)
                c.finish_reason = "abort"

    async def start(self) -> None:
        """Submit every choice; a bad one (400), a full queue (429) or a stopping engine (503) fails them
        all, and any already submitted are aborted (as is everything if the request is cancelled here)."""
        try:
            await self._submit()
        except BaseException:
            self.close()
            raise

    async def _submit(self) -> None:
        try:
            for c in self.choices:
                if c.finish_reason is not None:  # nothing to generate (echo with max_tokens 0)
                    continue
                c.rid, _ = await self.engine.submit(c.prompt_ids, c.params, self.queue)
                self._by_rid[c.rid] = c
                self.metrics.prompt_tokens.inc(len(c.prompt_ids))
        except ValueError as e:
            raise param_error(e) from None
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except EngineShutDown:
            raise APIError(503, "the server is shutting down") from None

    async def events(self) -> AsyncIterator[tuple[Choice, Delta]]:
        """Deltas of all choices as they come, each after its choice is updated; ends when all finish."""
        pending = sum(c.finish_reason is None for c in self.choices)
        while pending:
            item = await self._next()
            if isinstance(item, EngineShutDown):
                raise APIError(503, "the server is shutting down") from None
            if isinstance(item, EngineError):
                raise APIError(500, str(item), type="server_error") from None
            if isinstance(item, BaseException):
                raise item
            choice = self._by_rid.get(item.request_id)
            if choice is None or choice.finish_reason is not None:
                continue
            if item.finish_reason == "abort":
                choice.finish_reason = "abort"
                raise APIError(503, "the request was aborted: the server is shutting down")
            if item.finish_reason == "error":  # its constraint, which compiled, proved too complex to follow
                choice.finish_reason = "error"
                raise invalid(f"{self.constraint} could not be followed: {item.error}", self.constraint,
                              "invalid_constraint")
            self._account(choice, item)
            if item.finish_reason is not None:
                choice.finish_reason = item.finish_reason
                pending -= 1
            yield choice, item

    async def _next(self):
        if self.deadline is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(self.deadline - time.perf_counter(), 0.0))
        except TimeoutError:
            raise APIError(408, f"the request took longer than the server's limit of {self.timeout:g} s",
                           code="timeout") from None

    def _account(self, c: Choice, d: Delta) -> None:
        now = time.perf_counter()
        c.text += d.text
        c.token_ids += d.token_ids
        if d.logprobs:
            c.logprobs += [lp for lp in d.logprobs if lp is not None]
        n = len(d.token_ids)
        if n:
            self.metrics.generation_tokens.inc(n)
            if not self._first_token_seen:
                self._first_token_seen = True
                self.metrics.ttft.observe(now - self.arrival)
            if c.last_token_at is not None:
                gap = (now - c.last_token_at) / n
                for _ in range(n):
                    self.metrics.itl.observe(gap)
            c.last_token_at = now
        if d.finish_reason is not None and all(x.finish_reason is not None or x is c for x in self.choices):
            self.metrics.e2e.observe(now - self.arrival)

    def usage(self, prompt_tokens: int) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}
