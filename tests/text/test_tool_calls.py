"""Tool calls in model text: the parser on well-formed, malformed and partial output, streamed or whole; and the
grammar that holds a reply to calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from seriatim import SamplingParams
from seriatim.text.tool_calls import ToolCallParser, calls_grammar

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"],
    "additionalProperties": False}}}


def call(name: str, args) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


def parse(text: str, step: int, names=("get_weather", "add")) -> tuple[str, list]:
    parser, content, calls = ToolCallParser(names), "", []
    for i in range(0, len(text), step):
        more, new = parser.push(text[i : i + step])
        content, calls = content + more, calls + new
    rest, last = parser.flush()
    return content + rest, [(c.name, c.arguments) for c in calls + last]


CASES = [
    ("plain text, no calls", "It is sunny.\n\nBye.", "It is sunny.\n\nBye.", []),
    ("one call", call("add", {"a": 1, "b": 2}), "", [("add", {"a": 1, "b": 2})]),
    ("text then two calls", "Let me check.\n" + call("get_weather", {"city": "Oslo", "unit": "C"}) + "\n"
     + call("add", {"a": 1, "b": 2}) + "\n", "Let me check.",
     [("get_weather", {"city": "Oslo", "unit": "C"}), ("add", {"a": 1, "b": 2})]),
    ("arguments as a JSON string", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>',
     "", [("add", {"a": 1, "b": 2})]),
    ("not JSON", "<tool_call>\n{name: add}\n</tool_call>", "<tool_call>\n{name: add}\n</tool_call>", []),
    ("unknown function", call("rm_rf", {}), call("rm_rf", {}), []),
    ("arguments not an object", call("add", [1, 2]), call("add", [1, 2]), []),
    ("unfinished block", "Hm " + call("add", {"a": 1})[:-5], "Hm " + call("add", {"a": 1})[:-5], []),
    ("a partial tag that is text", "a <tool_ca b", "a <tool_ca b", []),
    ("a bare call, the whole reply", ' {"name": "add", "arguments": {"a": 1, "b": 2}}\n', "",
     [("add", {"a": 1, "b": 2})]),
    ("JSON that is no call", '{"a": 1}', '{"a": 1}', []),
    ("a bare call with more text", '{"name": "add", "arguments": {}} ok', '{"name": "add", "arguments": {}} ok', []),
    ("JSON, then a tagged call", '{"x": 0}' + call("add", {"a": 1, "b": 2}), '{"x": 0}', [("add", {"a": 1, "b": 2})]),
]


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[c[0] for c in CASES])
def test_the_parser_finds_calls_however_the_text_streams(name, text, content, calls, step):
    assert parse(text, step) == (content, calls)


def test_calls_grammar_holds_a_reply_to_valid_calls(tiny_llm):
    """Sampled at temperature 1 from a random model: always one or more calls with schema-valid arguments."""
    grammar = calls_grammar([WEATHER, ADD], parallel=True)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300, grammar=grammar) for s in range(6)]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for out in tiny_llm.generate(["call"] * len(params), params):
        assert out.finish_reason == "stop", out.text
        content, calls = parse(out.text, 10_000)
        assert content == "" and calls, out.text
        for name, args in calls:
            jsonschema.validate(args, schemas[name])
    single = calls_grammar([ADD], parallel=False)
    out = tiny_llm.generate("call", SamplingParams(temperature=1.0, seed=1, max_tokens=300, grammar=single))[0]
    assert [name for name, _ in parse(out.text, 10_000)[1]] == ["add"]
