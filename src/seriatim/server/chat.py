"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import ParameterError
from .completions import check_model
from .constraints import compile_constraint, constraint_fields, constraint_param
from .errors import invalid
from .formatting import TokenTexts, chat_logprobs
from .generation import Choice, Job, check_n, check_prompt, max_new_tokens, param_error, sampling_params
from .schemas import ChatCompletionRequest, ChatMessage
from .streaming import event_stream, run_to_completion, sse
from .tools import finish_reason, plan_tools, reply, stream_deltas, template_messages


def chat_prompt_ids(llm, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
    """The messages (and tools) rendered by the model's chat template (LLM.chat_prompt), as token ids; 400 if
    it cannot."""
    if not llm.tokenizer.takes_tools and any(m.tool_calls for m in messages):
        # Such a template would drop the calls, or fail on the message without content that makes them.
        raise invalid("this model's chat template cannot render tool_calls (it never reads `tools`)", "messages")
    try:
        return llm.chat_prompt(template_messages(messages), tools)
    except ValueError as e:
        raise param_error(e, "messages") from None


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state, metrics) -> Response:
    llm, engine = state.require()
    config = state.config
    check_model(body.model, state)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:  # even with tool_choice "none": the OpenAPI document gives such a model's tools maxItems 0
        llm.check_tools(body.tools)
    except ParameterError as e:
        raise param_error(e) from None
    plan = plan_tools(body)
    ids = chat_prompt_ids(llm, body.messages, plan.offered)
    n = check_n(body.n, 1, config)
    ctx = llm.config.context_length
    ids = check_prompt(ids, llm.config.vocab_size, ctx, "messages")
    requested = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    max_tokens = max_new_tokens(requested, None, len(ids), ctx, config)
    choices = [Choice(j, ids, sampling_params(body, max_tokens, logprobs, j, plan.grammar)) for j in range(n)]
    fields = constraint_fields(body, plan.grammar)
    await compile_constraint(engine, choices[0].params, fields)

    texts = TokenTexts(llm.tokenizer)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), config.model_name
    job = Job(engine, metrics, choices, config.request_timeout, constraint_param(choices[0].params, fields))
    await job.start()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_stream(job, texts, logprobs is not None, plan, len(ids), rid, created, model,
                                    include_usage), job.close)

    await run_to_completion(request, job)
    out = []
    for c in choices:
        message, finish = reply(c.text, c.finish_reason, plan)
        lps = {"content": chat_logprobs(texts, c.logprobs), "refusal": None} if logprobs is not None else None
        out.append({"index": c.index, "message": message, "logprobs": lps, "finish_reason": finish})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": out, "usage": job.usage(len(ids)), "system_fingerprint": None})


async def _stream(job, texts, with_logprobs, plan, prompt_tokens, rid, created, model, include_usage):
    def chunk(index, delta, logprobs=None, finish_reason=None):
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    parsers = {c.index: plan.parser() for c in job.choices}
    for c in job.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    async for c, delta in job.events():
        logprobs = None
        if with_logprobs and delta.token_ids:
            logprobs = {"content": chat_logprobs(texts, [lp for lp in delta.logprobs or [] if lp is not None]),
                        "refusal": None}
        parts = list(stream_deltas(parsers[c.index], delta.text, delta.finish_reason is not None))
        if logprobs and not parts:
            parts = [{"content": ""}]
        for k, part in enumerate(parts):
            yield chunk(c.index, part, logprobs if k == 0 else None)
        if delta.finish_reason is not None:
            yield chunk(c.index, {}, None, finish_reason(parsers[c.index], delta.finish_reason))
    if include_usage:
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": job.usage(prompt_tokens)})
