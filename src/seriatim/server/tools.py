"""Tool calling on /v1/chat/completions: which functions the chat template offers, the grammar a required or
named call is held to, and the calls found in a reply (text/tool_calls.py), in OpenAI's shapes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from ..text.tool_calls import ToolCall, ToolCallParser, calls_grammar
from .errors import invalid
from .schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    offered: list[dict] | None  # the tools rendered into the prompt
    names: tuple[str, ...]  # the functions whose calls are parsed out of replies; empty: replies are text
    grammar: str | None  # what a required or named call is held to

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.names) if self.names else None


def plan_tools(body: ChatCompletionRequest) -> ToolPlan:
    """The request's tools and tool_choice, checked (400s naming the field). With "none" the tools are not
    offered; with "auto" (the default) the model may call them; with "required" or a named function its
    reply is held to calls (one, or with parallel_tool_calls one or more) with schema-valid arguments."""
    tools, choice = body.tools or [], body.tool_choice  # "required" or a named one comes with tools (schemas.py)
    if not tools or choice == "none":
        return ToolPlan(None, (), None)
    offered = [t.model_dump(exclude_none=True) for t in tools]
    names = tuple(t.function.name for t in tools)
    if len(set(names)) < len(names):
        raise invalid("tools must have distinct function names", "tools")
    if choice in (None, "auto"):
        return ToolPlan(offered, names, None)
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in offered if t["function"]["name"] == choice.function.name]
        if not chosen:
            raise invalid(f"tool_choice names {choice.function.name!r}, which is not among the tools", "tool_choice")
        return ToolPlan(offered, names, calls_grammar(chosen, parallel=False))
    return ToolPlan(offered, names, calls_grammar(offered, parallel=body.parallel_tool_calls is not False))


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates take them: an assistant's call arguments as objects, not JSON text."""
    out = []
    for i, m in enumerate(messages):
        message = m.model_dump(include={"role", "content", "tool_calls", "tool_call_id"}, exclude_none=True)
        message.setdefault("content", None)
        for call in message.get("tool_calls", []):
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except json.JSONDecodeError:
                raise invalid(f"message {i}: tool call {call['id']!r} has arguments that are not JSON",
                              "messages") from None
        out.append(message)
    return out


def call_body(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def reply(text: str, finish_reason: str | None, plan: ToolPlan) -> tuple[dict, str | None]:
    """A finished choice's message and finish reason: its calls taken out of the text ("tool_calls")."""
    parser = plan.parser()
    if parser is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = _merge(parser.push(text), parser.flush())
    message = {"role": "assistant", "content": content if content or not calls else None}
    if not calls:
        return message, finish_reason
    message["tool_calls"] = [call_body(c) for c in calls]
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


def stream_deltas(parser: ToolCallParser | None, text: str, finished: bool) -> Iterator[dict]:
    """The chat deltas one piece of streamed text makes: content as it is released, each call once its
    block closes (whole, with its index among the choice's calls)."""
    if parser is None:
        if text:
            yield {"content": text}
        return
    before = len(parser.calls)
    content, calls = parser.push(text)
    if finished:
        content, calls = _merge((content, calls), parser.flush())
    if content:
        yield {"content": content}
    for k, call in enumerate(calls, start=before):
        yield {"tool_calls": [{"index": k, **call_body(call)}]}


def _merge(a: tuple[str, list[ToolCall]], b: tuple[str, list[ToolCall]]) -> tuple[str, list[ToolCall]]:
    return a[0] + b[0], a[1] + b[1]


def finish_reason(parser: ToolCallParser | None, reason: str) -> str:
    return "tool_calls" if parser is not None and parser.calls and reason == "stop" else reason
