"""Tool calls in the form Qwen2.5, Hermes and SmolLM3 models write them (and their chat templates render):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`ToolCallParser` splits a model's text, streamed or whole, into content and calls; `calls_grammar` is the
grammar that makes a model write only such calls, their arguments valid against each function's schema."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..grammar.constraint import JSON_LAYOUT

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def parse_call(block: str, names: frozenset[str]) -> ToolCall | None:
    """The call in one block's JSON, or None when it is not one: not JSON, no name, a function not offered,
    or arguments that are not an object (given as an object, or as a string holding one)."""
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], arguments) if isinstance(arguments, dict) else None


class ToolCallParser:
    """Model text in, (content, completed calls) out, as the text streams. A block that does not parse as a
    call of one of `names` stays in the content, as the model wrote it. Whitespace between content and a
    call is dropped, so a reply that is only calls has no content.

    Small models often write the call's JSON without the tags: a reply that is one such JSON object and
    nothing else is a call too. A reply that starts with "{" is therefore held back until it ends."""

    def __init__(self, names: Sequence[str]):
        self.names = frozenset(names)
        self.calls: list[ToolCall] = []
        self._pending = ""  # text not yet released: a partial block, a partial OPEN, or trailing whitespace
        self._after_call = False  # drop the whitespace that follows a call
        self._released = False  # whether any content has been released (a bare call must be the whole reply)

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        if not self._released and not self.calls and self._pending.lstrip().startswith("{"):
            return "", []  # perhaps a bare call: wait for the whole reply
        content, calls = self._split()
        self._released = self._released or bool(content)
        return content, calls

    def _split(self) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        while True:
            if self._after_call:
                self._pending = self._pending.lstrip()
                self._after_call = not self._pending
            start = self._pending.find(OPEN)
            if start < 0:
                keep = _held(self._pending)
                content += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep :]
                return content, calls
            gap = len(self._pending[:start].rstrip())  # whitespace before a block goes with it
            content, self._pending = content + self._pending[:gap], self._pending[gap:]
            end = self._pending.find(CLOSE)
            if end < 0:
                return content, calls
            block, self._pending = self._pending[: end + len(CLOSE)], self._pending[end + len(CLOSE) :]
            call = parse_call(block[block.find(OPEN) + len(OPEN) : -len(CLOSE)], self.names)
            if call is None:
                content += block
            else:
                calls.append(call)
                self.calls.append(call)
                self._after_call = True

    def flush(self) -> tuple[str, list[ToolCall]]:
        """What is left when the generation ends: a bare call, or the calls and text held back, with an
        unfinished block as text and trailing whitespace only if no call was made."""
        if not self._released and not self.calls and (call := parse_call(self._pending, self.names)):
            self._pending = ""
            self.calls.append(call)
            return "", [call]
        content, calls = self._split()
        rest, self._pending = content + self._pending, ""
        return (rest.rstrip() if self.calls else rest), calls


def _held(text: str) -> int:
    """Length of the end of `text` to hold back: trailing whitespace and any partial OPEN after it."""
    partial = next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if text.endswith(OPEN[:k])), 0)
    body = text[: len(text) - partial]
    return partial + len(body) - len(body.rstrip())


def calls_grammar(tools: Sequence[Mapping], parallel: bool) -> str:
    """An llguidance Lark grammar for a reply of tool calls only: one (or with `parallel`, one or more) calls
    of the given functions, each with arguments valid against the function's `parameters` schema."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = dict(function.get("parameters") or {"type": "object"})
        schema["x-guidance"] = JSON_LAYOUT
        head = f'{OPEN}\n{{"name": {json.dumps(function["name"])}, "arguments": '
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps(chr(125) + chr(10) + CLOSE)}")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
        names.append(f"call_{i}")
    call = "call: " + " | ".join(names)
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, call, *rules])
