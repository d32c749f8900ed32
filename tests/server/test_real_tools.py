"""A tool-calling round trip with the official client against the real Qwen2.5-Coder-0.5B (fast mode): tools ->
tool_calls -> a tool message -> the final answer, streamed and not."""

from __future__ import annotations

import json

import openai
import pytest

from seriatim.server.state import ServerConfig
from seriatim.weights.registry import resolve_model
from support.live_server import LiveServer

pytestmark = pytest.mark.real_model
MODEL = "qwen2.5-coder-0.5b"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def client():
    try:
        resolve_model(MODEL)
    except ValueError as e:
        pytest.skip(str(e))
    live = LiveServer(ServerConfig(model=MODEL)).start()
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
    live.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_calling_round_trip(client, stream):
    first = _complete(client, ASK, stream)
    assert first["finish_reason"] == "tool_calls", first
    [call] = first["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert "paris" in json.loads(call["function"]["arguments"])["city"].lower()
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature_c": 31})}]
    final = _complete(client, messages, stream)
    assert final["finish_reason"] == "stop" and not final["tool_calls"]
    assert "31" in final["content"], final


def _complete(client, messages, stream: bool) -> dict:
    """The reply as {content, tool_calls, finish_reason}, assembled from the stream's deltas if streamed."""
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=80)
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [c.model_dump(include={"id", "type", "function"}) for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            empty = {"id": d.id, "type": "function", "function": {"name": "", "arguments": ""}}
            call = calls.setdefault(d.index, empty)
            call["function"]["name"] += d.function.name or ""
            call["function"]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return {"content": content, "tool_calls": list(calls.values()), "finish_reason": finish}
