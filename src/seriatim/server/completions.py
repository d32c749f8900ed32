"""POST /v1/completions."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engine.async_engine import EngineShutDown
from .constraints import compile_constraint, constraint_fields, constraint_param
from .errors import APIError
from .formatting import TextOffsets, TokenTexts, completion_logprobs
from .generation import Choice, Job, check_n, check_prompt, max_new_tokens, sampling_params
from .schemas import CompletionRequest
from .streaming import event_stream, run_to_completion, sse
from .trace import trace_body

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def parse_prompts(prompt, tokenizer) -> list[tuple[str | None, list[int]]]:
    """(text as given or None, token ids) for each prompt of the request, in one of its forms (schemas.Prompt)."""
    if isinstance(prompt, str):
        return [(prompt, tokenizer.encode(prompt))]
    if isinstance(prompt[0], int):
        return [(None, prompt)]
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, p) for p in prompt]


async def create_completion(body: CompletionRequest, request: Request, state, metrics) -> Response:
    llm, engine = state.require()
    check_model(body.model, state)
    prompts = [(text, check_prompt(ids, llm.config.vocab_size, llm.config.context_length))
               for text, ids in parse_prompts(body.prompt, llm.tokenizer)]
    n = check_n(body.n, len(prompts), state.config)
    choices = _choices(body, prompts, n, llm, state.config)
    fields = constraint_fields(body)
    await compile_constraint(engine, choices[0].params, fields)
    texts = TokenTexts(llm.tokenizer)
    prompt_texts = [text if text is not None else llm.tokenizer.decode(ids) for text, ids in prompts]
    prompt_lps = await _prompt_logprobs(body, prompts, texts, llm, engine)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.config.model_name
    job = Job(engine, metrics, choices, state.config.request_timeout, constraint_param(choices[0].params, fields))
    await job.start()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_stream(job, body, texts, prompts, prompt_texts, prompt_lps, n, rid, created, model,
                                    include_usage), job.close)
    await run_to_completion(request, job)
    out = [_choice_body(c, body, texts, prompt_texts[c.index // n], prompt_lps[c.index // n]) for c in choices]
    usage = job.usage(sum(len(ids) for _, ids in prompts))
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": out, "usage": usage, "system_fingerprint": None})


def _choices(body: CompletionRequest, prompts: list[tuple[str | None, list[int]]], n: int, llm, config) -> list[Choice]:
    """n choices per prompt, each with its own sampling parameters (seed + j); max_tokens 0 makes choices
    that are finished before they start (with echo: the prompt alone)."""
    ctx = llm.config.context_length
    choices = []
    for i, (_, ids) in enumerate(prompts):
        max_tokens = max_new_tokens(body.max_tokens, DEFAULT_MAX_TOKENS, len(ids), ctx, config)
        for j in range(n):
            params = sampling_params(body, max(max_tokens, 1), _engine_logprobs(body), j, trace=bool(body.trace))
            c = Choice(i * n + j, ids, params)
            if max_tokens == 0:  # nothing to generate
                c.finish_reason = "length"
            choices.append(c)
    return choices


def _engine_logprobs(body: CompletionRequest) -> int | None:
    """Alternatives per token the engine lists: the trace explains the engine's logprobs, so a trace without
    logprobs asked for has the chosen tokens' alone (and the response no `logprobs`)."""
    return 0 if body.logprobs is None and body.trace else body.logprobs


async def _prompt_logprobs(body: CompletionRequest, prompts: list[tuple[str | None, list[int]]], texts: TokenTexts,
                           llm, engine) -> list[dict | None]:
    """With echo and logprobs, each prompt's logprobs in completions form (computed in the engine thread)."""
    if not body.echo or body.logprobs is None:
        return [None] * len(prompts)
    out = []
    for _, ids in prompts:
        try:
            entries = await engine.run_in_engine_thread(lambda ids=ids: llm.prompt_logprobs(ids, body.logprobs))
        except EngineShutDown:
            raise APIError(503, "the server is shutting down") from None
        # The echoed text is the prompt decoded with its special tokens (or as given, when given as text).
        out.append(completion_logprobs(texts, entries, ids, TextOffsets(llm.tokenizer, 0, skip_special_tokens=False)))
    return out


def _choice_body(c: Choice, body: CompletionRequest, texts: TokenTexts, prompt_text: str,
                 prompt_lps: dict | None) -> dict:
    """One finished choice in OpenAI's shape (with echo: the prompt's text and logprobs first)."""
    start = len(prompt_text) if body.echo else 0
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(texts, c.logprobs, c.token_ids, _generated_offsets(texts.tokenizer, start))
        if body.echo:
            logprobs = _concat(prompt_lps, logprobs)
    text = (prompt_text if body.echo else "") + c.text
    out = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
    if body.trace:
        out["trace"] = trace_body(texts, c.logprobs)
    return out


async def _stream(job, body, texts, prompts, prompt_texts, prompt_lps, n, rid, created, model, include_usage):
    def chunk(index, text, logprobs=None, finish_reason=None, trace=None):
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if trace is not None:
            choice["trace"] = trace
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    offsets = {c.index: _generated_offsets(texts.tokenizer, len(prompt_texts[c.index // n]) if body.echo else 0)
               for c in job.choices}
    for c in job.choices:
        p = c.index // n
        if body.echo:
            yield chunk(c.index, prompt_texts[p], prompt_lps[p])
        if c.finish_reason is not None:  # echo with max_tokens 0
            yield chunk(c.index, "", None, c.finish_reason)
    async for c, delta in job.events():
        logprobs = None
        if body.logprobs is not None and delta.token_ids:
            logprobs = completion_logprobs(texts, delta.logprobs or [], delta.token_ids, offsets[c.index])
        trace = trace_body(texts, delta.logprobs or [], delta.forward_pass) if body.trace else None
        if delta.text or logprobs or delta.finish_reason:
            yield chunk(c.index, delta.text, logprobs, delta.finish_reason, trace)
    if include_usage:
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": job.usage(sum(len(ids) for _, ids in prompts))})


def _generated_offsets(tokenizer, start: int) -> TextOffsets:
    """Offsets of generated tokens in a choice's text, which leaves special tokens out (engine.py)."""
    return TextOffsets(tokenizer, start, skip_special_tokens=True)


def _concat(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in b}


def check_model(name: str | None, state) -> None:
    if name is not None and name not in (state.config.model_name, state.config.model):
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.config.model_name!r}",
                       param="model", code="model_not_found")
