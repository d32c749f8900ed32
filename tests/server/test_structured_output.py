"""Structured output over HTTP: response_format, vLLM's structured_outputs and guided_* extras, streamed and
not, with the official client; and every way a constraint can be wrong is a 400 naming its field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

MODEL = "hf"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"], "additionalProperties": False}
CHAT = [{"role": "user", "content": "Name a city."}]


def fits_schema(text: str) -> bool:
    jsonschema.validate(json.loads(text), SCHEMA)
    return True


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_chat_json_schema_with_the_official_client(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    out = client.chat.completions.create(model=MODEL, messages=CHAT, response_format=fmt, temperature=1.0, seed=1,
                                         max_tokens=100, n=3)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, response_format=fmt, temperature=1.0,
                                                 seed=1, max_tokens=100, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == out.choices[0].message.content


def test_forced_tokens_are_counted_in_metrics(client, server):
    before = server.metric("seriatim_forced_tokens_total")
    client.completions.create(model=MODEL, prompt="x", max_tokens=100, temperature=1.0, seed=3,
                              extra_body={"guided_json": SCHEMA})
    assert server.metric("seriatim_forced_tokens_total") >= before + len('{"city": "')


def test_chat_json_object(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "json_object"},
                                         temperature=0, max_tokens=300)
    if out.choices[0].finish_reason == "stop":  # a random model may write one long string
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:
        assert out.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"guided_regex": "[0-9]{3}-[0-9]{4}"}, lambda t: len(t) == 8 and t[3] == "-"),
    ({"guided_json": SCHEMA}, fits_schema),
    ({"guided_grammar": 'start: "yes" | "no"'}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, fits_schema),
])
def test_completions_extras(client, extra, check):
    out = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=100, temperature=1.0, seed=4,
                                    extra_body=extra)
    assert out.choices[0].finish_reason == "stop" and check(out.choices[0].text), out.choices[0].text


@pytest.mark.parametrize("body, field, words", [
    ({"guided_regex": "(("}, "guided_regex", "regex"),
    ({"guided_json": {"type": "nonsense"}}, "guided_json", "nonsense"),
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", "uniqueItems"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "one constraint per request"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one constraint"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one constraint"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
])
def test_bad_constraints_are_400s_naming_the_field(server, body, field, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and words in err["message"], err
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_compile_past_the_time_limit_is_a_400(server, monkeypatch):
    from seriatim.server import constraints

    monkeypatch.setattr(constraints, "COMPILE_TIMEOUT", 0.0)
    schema = {"type": "object", "properties": {"never_seen_before": {"type": "integer"}}}
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "guided_json": schema},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "constraint_timeout", r.text
    assert r.json()["error"]["param"] == "guided_json"


def test_text_response_format_is_plain_generation(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "text"},
                                         max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
