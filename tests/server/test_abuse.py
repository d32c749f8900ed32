"""HTTP under abuse: slow and idle connections, bodies at the size limit, oversized lists and maps, deep
nesting, constraints built to compile slowly, and clients that hang up at every stage of a request. Each
gets a 4xx or is cut off, within bounded time; none gets a 5xx; other clients are served meanwhile; and
the server ends idle (no request left in the engine, no connection held open)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from seriatim.server.constraints import COMPILE_TIMEOUT
from seriatim.server.schemas import MAX_STOP_CHARS, MAX_STOPS
from support.live_server import LiveServer, tiny_config

MODEL = "hf"
READ_TIMEOUT = 1.0
PLAIN = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def live(tiny_llama):
    live = LiveServer(tiny_config(tiny_llama, read_timeout=READ_TIMEOUT)).start()
    yield live
    fives = [line for line in httpx.get(live.url + "/metrics").text.splitlines()
             if line.startswith("seriatim_http_requests_total") and 'status="5' in line]
    live.stop()
    assert not fives, fives


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def connect(live) -> socket.socket:
    return socket.create_connection(("127.0.0.1", live.server.port), timeout=15)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One response with a content-length, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head_.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head_ + b"\r\n\r\n" + body


def served_promptly(live, seconds: float = 10.0) -> None:
    """A plain request, sent now, is answered within `seconds`."""
    t = time.monotonic()
    r = httpx.post(live.url + "/v1/completions", json=PLAIN, timeout=seconds)
    assert r.status_code == 200 and time.monotonic() - t < seconds


def head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n\r\n").encode()


def trickle(sock: socket.socket, data: bytes, every: float = 0.2) -> None:
    """Send `data` a byte at a time until it is all sent or the server closes the connection."""
    for i in range(len(data)):
        try:
            sock.sendall(data[i:i + 1])
        except OSError:
            return
        time.sleep(every)


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_request_trickled_a_byte_at_a_time_is_cut_off_with_408(live, part):
    body = json.dumps(PLAIN).encode()
    sock = connect(live)
    if part == "body":
        sock.sendall(head("/v1/completions", len(body)))
    sender = threading.Thread(target=trickle, args=(sock, head("/v1/completions", len(body)) if part == "head"
                                                    else body), daemon=True)
    t = time.monotonic()
    sender.start()
    served_promptly(live)  # others are served meanwhile
    answer = read_until_closed(sock)
    elapsed = time.monotonic() - t
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout" and part in error["message"]
    assert READ_TIMEOUT * 0.9 < elapsed < READ_TIMEOUT + 3


def test_hundreds_of_idle_connections_neither_block_others_nor_stay_open(live):
    silent = [connect(live) for _ in range(200)]  # connect and send nothing
    kept = [connect(live) for _ in range(100)]  # one request, then an idle keep-alive connection
    for sock in kept:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
    served_promptly(live)
    t = time.monotonic()
    for sock in silent + kept:  # each closed by the server, without a word
        assert read_until_closed(sock) == b""
        sock.close()
    assert time.monotonic() - t < READ_TIMEOUT + 3
    wait_for(lambda: len(live.server.server_state.connections) == 0)


def test_a_body_at_the_size_limit_is_read_and_one_byte_more_is_413(live):
    limit = live.state.config.max_body_bytes
    body = json.dumps({**PLAIN, "prompt": "a" * (limit - len(json.dumps({**PLAIN, "prompt": ""})))}).encode()
    assert len(body) == limit
    r = httpx.post(live.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    r = httpx.post(live.url + "/v1/completions", content=body + b" ", headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413
    chunked = httpx.post(live.url + "/v1/completions", content=iter([body, b" "]), timeout=30)  # no length
    assert chunked.status_code == 413


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
OVERSIZED = {
    "10k stop strings": ("/v1/completions", {**PLAIN, "stop": [f"<{i}>" for i in range(10_000)]}, "stop"),
    "a stop string too long": ("/v1/completions", {**PLAIN, "stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
    "100k logit_bias entries": ("/v1/completions", {**PLAIN, "logit_bias": {str(i): 1 for i in range(100_000)}},
                                "logit_bias"),
    "n of a billion": ("/v1/completions", {**PLAIN, "n": 10**9}, "n"),
    "100k prompts": ("/v1/completions", {**PLAIN, "prompt": ["a"] * 100_000}, "prompt"),
    "100k token-id prompts": ("/v1/completions", {**PLAIN, "prompt": [[1]] * 100_000}, "prompt"),
    "10k messages of 10k tools": ("/v1/chat/completions", {**CHAT, "tools": [
        {"type": "function", "function": {"name": f"f{i}"}} for i in range(10_000)]}, "tools"),
}


@pytest.mark.parametrize("name", OVERSIZED)
def test_oversized_lists_and_maps_are_refused_quickly(live, name):
    path, body, param = OVERSIZED[name]
    t = time.monotonic()
    r = httpx.post(live.url + path, json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
    assert time.monotonic() - t < 5


def test_the_most_stop_strings_and_a_bias_on_every_token_are_served(live):
    vocab = live.state.llm.config.vocab_size
    body = {**PLAIN, "max_tokens": 32, "stop": ["y" * (MAX_STOP_CHARS - 1) + str(i % 10) for i in range(MAX_STOPS)],
            "logit_bias": {str(i): -1 for i in range(vocab)}}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text[:300]


def nested_schema(depth: int) -> str:
    """JSON text of a schema of objects `depth` deep (json.dumps itself recurses too deeply to write it)."""
    return '{"type": "object", "required": ["a"], "properties": {"a": ' * depth + '{"type": "integer"}' + "}}" * depth


def body_with(base: dict, field: str, json_text: str) -> bytes:
    return (json.dumps(base)[:-1] + f', "{field}": {json_text}}}').encode()


DEEP = 100_000  # levels of nesting within the default 1 MiB body
NESTED = {
    "arrays in prompt": body_with({"model": MODEL}, "prompt", "[" * DEEP + "]" * DEEP),
    "objects in user": body_with(PLAIN, "user", '{"a": ' * DEEP + "1" + "}" * DEEP),
    **{f"a schema {d} deep": body_with(PLAIN, "guided_json", nested_schema(d)) for d in (100, 300, 450, 1000)},
    **{f"a response_format schema {d} deep": body_with(CHAT, "response_format",
                                                        '{"type": "json_schema", "json_schema": {"name": "deep", '
                                                        f'"schema": {nested_schema(d)}}}}}') for d in (300, 450)},
    **{f"tool parameters {d} deep": body_with({**CHAT, "tool_choice": "required"}, "tools",
                                              f'[{{"type": "function", "function": {{"name": "f", '
                                              f'"parameters": {nested_schema(d)}}}}}]') for d in (300, 450)},
    "a regex 900 groups deep": json.dumps({**PLAIN, "guided_regex": "(" * 900 + "a" + ")" * 900}).encode(),
    "a grammar 900 groups deep": json.dumps({**PLAIN, "guided_grammar": "start: " + "(" * 900 + '"a"' + ")" * 900}
                                            ).encode(),
}


@pytest.mark.parametrize("name", NESTED)
def test_deeply_nested_json_is_answered_without_a_5xx(live, name):
    path = "/v1/chat/completions" if b'"messages"' in NESTED[name] else "/v1/completions"
    r = httpx.post(live.url + path, content=NESTED[name], headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        assert "Traceback" not in r.json()["error"]["message"], r.text[:300]
    served_promptly(live)


SLOW = {
    "a regex whose DFA explodes": {"guided_regex": "(a|b)*a(a|b){40}"},
    "nested counted repeats": {"guided_regex": "(a{1000}){1000}"},
    "a pattern whose DFA explodes": {"guided_json": {"type": "string", "pattern": "(a|b)*a(a|b){30}"}},
    "3000 required properties": {"guided_json": {"type": "object", "required": [f"p{i}" for i in range(3000)],
                                                 "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}}},
    "1000 alternatives with patterns": {"guided_json": {"anyOf": [
        {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i}}}"}}}
        for i in range(1000)]}},
    "20k choices": {"guided_choice": [f"option number {i}" for i in range(20_000)]},
    "a grammar of nested repeats": {"guided_grammar": 'start: x{1000}\nx: "a"{1000}'},
}


@pytest.mark.parametrize("name", SLOW)
def test_constraints_built_to_compile_slowly_do_not_stall_others(live, name):
    done, latencies = threading.Event(), []

    def others() -> None:
        with httpx.Client(timeout=30) as client:
            while not latencies or not done.is_set():  # one request at least, however quick the other
                t = time.monotonic()
                assert client.post(live.url + "/v1/completions", json=PLAIN).status_code == 200
                latencies.append(time.monotonic() - t)

    side = threading.Thread(target=others)
    side.start()
    t = time.monotonic()
    try:
        r = httpx.post(live.url + "/v1/completions", json={**PLAIN, **SLOW[name]}, timeout=COMPILE_TIMEOUT + 30)
    finally:
        done.set()
        side.join()
    assert r.status_code in (200, 400), r.text[:300]
    assert time.monotonic() - t < COMPILE_TIMEOUT + 5
    assert latencies and max(latencies) < 5, latencies


STAGES = ("connected", "mid-head", "mid-body", "sent", "generating", "streaming")


@pytest.mark.parametrize("stage", STAGES)
def test_a_client_that_hangs_up_at_any_stage_leaves_nothing_behind(live, stage):
    body = json.dumps({**PLAIN, "max_tokens": 200, "ignore_eos": True, "stream": stage == "streaming"}).encode()
    request = head("/v1/completions", len(body)) + body
    sent = {"connected": 0, "mid-head": 20, "mid-body": len(request) - 5}.get(stage, len(request))
    aborted = live.metric("seriatim_requests_aborted_total")
    live.slow.delay = 0.02  # 200 tokens take seconds: the request is in the engine when the client leaves
    try:
        sock = connect(live)
        sock.sendall(request[:sent])
        if stage == "generating":
            wait_for(lambda: live.metric("seriatim_requests_running") == 1)
        if stage == "streaming":
            seen = b""
            while b"data: " not in seen:
                seen += sock.recv(65536)
        sock.close()
        if stage in ("generating", "streaming"):
            wait_for(lambda: live.metric("seriatim_requests_aborted_total") == aborted + 1)
        wait_for(lambda: live.metric("seriatim_requests_running") + live.metric("seriatim_requests_waiting") == 0)
        wait_for(lambda: len(live.server.server_state.connections) == 0)
    finally:
        live.slow.delay = 0.0
    assert not live.state.llm.engine.has_unfinished()
    served_promptly(live)


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_given_up_on_mid_generation_is_a_400_naming_its_field(live, stream):
    grammar = "start: x+\nx: " + " | ".join(f'"a{i}"' for i in range(2500))  # too many Earley items after "a"
    body = {**PLAIN, "guided_grammar": grammar, "stream": stream}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    if stream:  # the stream had begun: its last event before [DONE] is the error
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
    else:
        assert r.status_code == 400
        error = r.json()["error"]
    assert error["param"] == "guided_grammar" and error["code"] == "invalid_constraint"
    assert error["message"].startswith("guided_grammar could not be followed: llguidance gave up on it at token")
    served_promptly(live)
