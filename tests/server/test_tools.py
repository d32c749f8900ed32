"""Tool calling on /v1/chat/completions with the official client, on the tiny model given a tool-capable chat
template: required and named calls are held to the functions' schemas, streamed as OpenAI streams them; tool
results go back through the template; and every misuse is a 400 naming its field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from seriatim.server.state import ServerConfig
from support.live_server import LiveServer
from support.tiny_models import TOOLS_CHAT_TEMPLATE, with_chat_template

MODEL = "tools"
ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (ADD, WEATHER)}
ASK = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tools_server(tiny_llama, tmp_path_factory):
    path = with_chat_template(tiny_llama[0] / "hf", tmp_path_factory.mktemp("tools") / MODEL, TOOLS_CHAT_TEMPLATE)
    live = LiveServer(ServerConfig(model=str(path), dtype="float32", device="cpu")).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(tools_server):
    with openai.OpenAI(base_url=tools_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def check_calls(calls, names) -> None:
    assert calls and [c.function.name for c in calls] == names[: len(calls)]
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_a_named_function_is_called_with_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "add"}}
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                                         temperature=1.0, seed=2, max_tokens=200, n=3)
    for c in out.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls, ["add"])


def test_required_calls_stream_as_openai_streams_them(client):
    kw = dict(model=MODEL, messages=ASK, tools=[ADD, WEATHER], tool_choice="required", temperature=1.0, seed=5,
              max_tokens=400, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    check_calls(whole.message.tool_calls, [whole.message.tool_calls[0].function.name])
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == [0]
    assert (deltas[0].function.name, deltas[0].function.arguments) == (whole.message.tool_calls[0].function.name,
                                                                        whole.message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_tool_results_go_back_through_the_template(client, tools_server):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    prompt = httpx.post(tools_server.url + "/tokenize", json={"messages": messages}, timeout=30).json()
    text = httpx.post(tools_server.url + "/detokenize", json={"tokens": prompt["tokens"]}, timeout=30).json()["prompt"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    assert "<tool_response>\n5\n</tool_response>" in text
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[ADD], max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_and_none(client):
    for choice in ("auto", "none"):
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[ADD], tool_choice=choice,
                                             max_tokens=10, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length") and out.choices[0].message.content is not None


@pytest.mark.parametrize("body, param, words", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [ADD, ADD]}, "tools", "distinct"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "pattern"),
    ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "one constraint"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]}, "messages", "not JSON"),
])
def test_tool_misuse_is_a_400_naming_the_field(tools_server, body, param, words):
    r = httpx.post(tools_server.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("choice", [None, "none"])
def test_a_template_without_tools_refuses_them(server, choice):
    """Even with tool_choice "none", as the OpenAPI document says (tools: maxItems 0)."""
    body = {"model": "hf", "messages": ASK, "tools": [ADD], **({"tool_choice": choice} if choice else {})}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert "cannot offer tools" in r.json()["error"]["message"]


def test_a_malformed_call_comes_back_as_text():
    from seriatim.server.tools import ToolPlan, reply

    plan = ToolPlan([ADD], ("add",), None)
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>'
    assert reply(bad, "stop", plan) == ({"role": "assistant", "content": bad}, "stop")
    good = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    message, finish = reply(good, "length", plan)
    assert finish == "length" and message["content"] is None and len(message["tool_calls"]) == 1
