"""The OpenAPI document tells the truth: `schemathesis run --checks all` against the live server, every
phase (the stateful one too), finds nothing. That holds only while /openapi.json declares every error the
server answers, with its body, and every rule it applies to a request: a valid request is served, an invalid
one refused. The CLI runs in a subprocess (schemathesis' pytest integration fails on this pytest version), in
its deterministic mode, so every run sends the same requests.

Two of the server's rules are beyond JSON Schema: a grammar must compile, and a prompt must leave room in the
model's context. The model here has a context no generated prompt fills; grammars are the document's own
`format: "grammar"`, which schemathesis is taught to write (support/schemathesis_hooks.py) as it knows
`format: "regex"`.

Then the messages of the errors validation finds: one sentence naming the field, in the API's words."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from seriatim.server import ServerConfig, create_app
from support.live_server import LiveServer
from support.tiny_models import make_hf_llama

MODEL = "hf"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = tmp_path_factory.mktemp("long_context") / MODEL
    make_hf_llama(path, max_position_embeddings=1 << 14)
    # Small limits keep generated requests cheap: at most 8 tokens per choice and 8 choices.
    live = LiveServer(ServerConfig(model=str(path), dtype="float32", device="cpu", max_tokens_cap=8, max_n=4,
                                   max_choices=8)).start()
    yield live
    live.stop()


def test_schemathesis_finds_nothing(live, tmp_path):
    command = [sys.executable, "-m", "schemathesis.cli", "run", live.url + "/openapi.json", "--checks", "all",
               "--max-examples", "10", "--workers", "1", "--generation-deterministic", "--no-color"]
    hooks = {"SCHEMATHESIS_HOOKS": "support.schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **hooks})
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert re.search(r"Tested: 8\b", run.stdout) and re.search(r"✅ Stateful", run.stdout), run.stdout
    assert live.state.llm.engine.has_unfinished() is False


def test_a_server_with_a_key_declares_it_on_the_routes_that_need_it(tiny_llama):
    doc = create_app(ServerConfig(model=str(tiny_llama[0] / "hf"), api_key="sekret")).openapi()
    assert doc["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    guarded = {path for path, ops in doc["paths"].items() for op in ops.values() if "401" in op["responses"]}
    assert guarded == {path for path, ops in doc["paths"].items() for op in ops.values() if op.get("security")}
    assert guarded == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/tokenize",
                       "/detokenize"}


def post(live: LiveServer, path: str, body: dict) -> httpx.Response:
    # json.dumps writes a lone surrogate as its \udXXX escape, which is how a client sends one.
    return httpx.post(live.url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                      timeout=30)


def refusal(r: httpx.Response, param: str) -> str:
    """The message of a 400 naming `param`, checked to be one sentence in the API's words."""
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    # Not pydantic's: no union members ("function-after[...]", "list[TextPart]"), no errors joined by "; ".
    assert not re.search(r"function-after|\[[A-Za-z_]|Value error|Input should|; ", err["message"]), err
    return err["message"]


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800 hi"}, "prompt",
     "prompt contains a lone UTF-16 surrogate ('\\ud800'), which is not valid Unicode"),
    ("/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "messages[0].content[0] is a part of type 'image_url', but image content is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}},
     "stream_options", "stream_options is only allowed when stream is true"),
])
def test_a_refusal_is_one_sentence_naming_the_field(live, path, body, param, message):
    assert refusal(post(live, path, body), param) == message


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": ["a", "b"], "n": 2}, "n"),  # several prompts make one choice each
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"07": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant"}]}, "messages"),  # content, or calls
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),  # this template takes no tools
    ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
])
def test_the_rules_the_document_states_are_the_servers(live, path, body, param):
    refusal(post(live, path, {"model": MODEL, **body}), param)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),  # nothing generated
    ("/v1/completions", {"prompt": "hi", "n": 2.0, "best_of": 1}),  # JSON Schema's integers include 2.0
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "auto"}),  # no tools to call
])
def test_what_the_document_allows_is_served(live, path, body):
    r = post(live, path, {"model": MODEL, **body})
    assert r.status_code == 200, r.text
