"""The HTTP server with the official `openai` client and raw httpx, on the tiny model."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest

from seriatim import SamplingParams
from support.live_server import LiveServer, tiny_config

MODEL = "hf"  # the served name of the tiny model's directory


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def greedy(tiny_llm, prompt, max_tokens, **kw):
    return tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, **kw))[0]


def sse_events(text: str) -> list:
    """The JSON events of an SSE body, checking it ends with [DONE]."""
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# ---- the official client -----------------------------------------------------------------------


def test_completions_match_the_engine(client, tiny_llm):
    prompt = "The quick brown fox"
    expected = greedy(tiny_llm, prompt, 12, ignore_eos=True)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids) and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    # Several prompts (strings and token ids) in one request, choices in order.
    ids = tiny_llm.tokenizer.encode("Once upon a time")
    multi = client.completions.create(model=MODEL, prompt=[[int(t) for t in ids], [5, 6, 7]], max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in multi.choices] == [0, 1]
    assert [c.text for c in multi.choices] == [greedy(tiny_llm, p, 5, ignore_eos=True).text for p in (ids, [5, 6, 7])]


def test_chat_matches_the_engine(client, tiny_llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = tiny_llm.chat(messages, SamplingParams(temperature=0, max_tokens=10))
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens

    # Content parts, and max_completion_tokens.
    parts = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
        max_completion_tokens=10, temperature=0)
    assert parts.choices[0].message.content == tiny_llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=10)).text


def test_text_offsets_point_into_the_text(tiny_llm):
    """A token that is part of a multi-byte character points where that character starts; offsets stay
    inside the text the tokens decode to, with special tokens dropped or kept as the text has them."""
    from seriatim.server.formatting import TextOffsets

    tok = tiny_llm.tokenizer
    ids = tok.encode("aお😀b", add_special_tokens=False)
    assert len(ids) > len("aお😀b")  # some characters take several byte tokens
    for skip, extra in ((True, []), (False, [0, 1])):  # 0, 1: the tiny tokenizer's special tokens
        all_ids = extra + ids
        offsets = TextOffsets(tok, 0, skip_special_tokens=skip)(all_ids)
        expected = [len(tok.decode(all_ids[:i], skip_special_tokens=skip).rstrip("\ufffd"))
                    for i in range(len(all_ids))]
        assert offsets == expected and max(offsets) < len(tok.decode(all_ids, skip_special_tokens=skip))


def test_completion_top_logprobs_include_the_sampled_token(client):
    out = client.completions.create(model=MODEL, prompt="The quick", max_tokens=24, temperature=2.0, seed=1,
                                    logprobs=1, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert all(tok in top and top[tok] == chosen
               for tok, top, chosen in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs))
    assert any(len(top) == 2 for top in lp.top_logprobs)  # a draw that was not the most probable token


def test_completion_logprobs_and_echo(client, tiny_llm):
    prompt = "The quick brown fox"
    expected = greedy(tiny_llm, prompt, 6, ignore_eos=True, logprobs=3)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for got, exp in zip(lp.token_logprobs, expected.logprobs):
        assert got == pytest.approx(exp.logprob, abs=1e-5)
    # The top 3 and, as OpenAI always includes it, the chosen token.
    assert all(3 <= len(top) <= 4 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True,
                                     extra_body={"ignore_eos": True})
    c = echo.choices[0]
    n_prompt = len(expected.prompt_token_ids)
    assert c.text == prompt + expected.text
    assert len(c.logprobs.tokens) == n_prompt + 6
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in c.logprobs.token_logprobs[1:])
    assert c.logprobs.text_offset[n_prompt] == len(prompt)
    # The prompt's logprobs are the model's (the reference: a plain forward pass over the prompt).
    import torch

    from support.parity import run_chunks

    ids = expected.prompt_token_ids
    ref = torch.log_softmax(run_chunks(tiny_llm, ids, [len(ids)]), -1)
    for pos in range(1, n_prompt):
        assert c.logprobs.token_logprobs[pos] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)

    only_prompt = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert only_prompt.choices[0].text == prompt and len(only_prompt.choices[0].logprobs.tokens) == n_prompt
    assert only_prompt.usage.completion_tokens == 0


def test_chat_logprobs(client, tiny_llm):
    messages = [{"role": "user", "content": "hi"}]
    expected = tiny_llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True))
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for got, exp in zip(content, expected.logprobs):
        assert got.logprob == pytest.approx(exp.logprob, abs=1e-5)
        assert len(got.top_logprobs) == 2 and got.top_logprobs[0].logprob >= got.top_logprobs[1].logprob
        assert got.bytes == list(got.bytes)
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == expected.text

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == [t.logprob for t in content]


def test_n_seed_and_stop(client, tiny_llm):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeds reproduce
    assert len({c.text for c in a.choices}) == 3  # choices differ from each other
    assert a.usage.completion_tokens == 48
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2, seed=7)
    assert ([c.message.content for c in client.chat.completions.create(**chat).choices]
            == [c.message.content for c in client.chat.completions.create(**chat).choices])

    full = greedy(tiny_llm, "The quick brown fox", 30, ignore_eos=True).text
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2)
                if full[i:i + 2].strip() and full.count(full[i:i + 2]) == 1)
    out = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=30, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_models_tokenize_detokenize(client, server, tiny_llm):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"})
    assert r.status_code == 200 and r.json()["tokens"] == tiny_llm.tokenizer.encode("hello world")
    assert r.json()["max_model_len"] == tiny_llm.config.context_length
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tiny_llm.chat_prompt([{"role": "user", "content": "hi"}])
    back = httpx.post(server.url + "/detokenize", json={"tokens": r.json()["tokens"]})
    assert back.json() == {"prompt": "hello world"}


# ---- errors ------------------------------------------------------------------------------------


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_invalid_requests_are_400_naming_the_problem(server, tiny_llm):
    url = server.url
    post = lambda path, body: httpx.post(url + path, json=body)  # noqa: E731
    base = {"model": MODEL, "prompt": "hi"}
    err = error_of(post("/v1/completions", {**base, "temprature": 0.5}), 400)
    assert "temprature" in err["message"] and err["param"] == "temprature"
    err = error_of(post("/v1/completions", {**base, "temperature": -1}), 400)
    assert err["message"] == "temperature must be >= 0, got -1" and err["param"] == "temperature"
    err = error_of(post("/v1/completions", {**base, "top_p": 1.5}), 400)
    assert "top_p" in err["message"]
    err = error_of(post("/v1/completions", {**base, "max_tokens": -1}), 400)
    assert "max_tokens" in err["message"]
    err = error_of(post("/v1/completions", {**base, "n": 17}), 400)
    assert err["param"] == "n"
    err = error_of(post("/v1/completions", {**base, "logit_bias": {"abc": 1}}), 400)
    assert "logit_bias" in err["message"]
    err = error_of(post("/v1/completions", {**base, "logit_bias": {"100000": 1}}), 400)
    assert "vocabulary" in err["message"]
    err = error_of(post("/v1/completions", {**base, "prompt": [10**6]}), 400)
    assert "vocabulary" in err["message"]
    err = error_of(post("/v1/completions", {**base, "prompt": "x " * 300}), 400)
    assert "context" in err["message"] and err["code"] == "context_length_exceeded"
    err = error_of(post("/v1/completions", {**base, "temperature": "hot"}), 400)
    assert err["param"] == "temperature"
    err = error_of(httpx.post(url + "/v1/completions", content=b'{"prompt": "x",',
                              headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"] and err["param"] is None
    for path, body in [("/v1/completions", {**base, "prompt": "\ud800 hi"}),
                       ("/v1/completions", {**base, "stop": ["\udfff"]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud83d"}]}),
                       ("/tokenize", {"prompt": "\ud800"})]:
        raw = json.dumps(body).encode()  # the lone surrogate written as its JSON escape, \udXXX
        err = error_of(httpx.post(url + path, content=raw, headers={"content-type": "application/json"}), 400)
        assert "surrogate" in err["message"]
    err = error_of(post("/v1/completions", {**base, "stream_options": {"include_usage": True}}), 400)
    assert "stream_options" in err["message"]
    for key in ("٥", " 5", "5_0"):
        err = error_of(post("/v1/completions", {**base, "logit_bias": {key: 1}}), 400)
        assert err["param"] == "logit_bias"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    text_format = {**chat, "response_format": {"type": "text"}, "max_tokens": 2}
    assert post("/v1/chat/completions", text_format).status_code == 200
    err = error_of(post("/v1/chat/completions", {**chat, "top_logprobs": 2}), 400)
    assert "logprobs" in err["message"]
    err = error_of(post("/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    assert err["param"] == "messages"
    err = error_of(post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": None}]}), 400)
    assert "needs content" in err["message"]
    assert httpx.get(url + "/health").status_code == 200  # still serving


def test_unknown_model_and_route_are_404(server):
    err = error_of(httpx.post(server.url + "/v1/completions", json={"model": "gpt-5", "prompt": "hi"}), 404)
    assert "gpt-5" in err["message"] and err["code"] == "model_not_found"
    error_of(httpx.get(server.url + "/v1/models/gpt-5"), 404)
    err = error_of(httpx.get(server.url + "/v1/nothing"), 404)
    assert "/v1/nothing" in err["message"]
    error_of(httpx.get(server.url + "/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        client.completions.create(model="nope", prompt="a")


def test_api_key_body_limit_cap_queue_and_timeout(strict_server):
    url, body = strict_server.url, {"model": MODEL, "prompt": "hi", "max_tokens": 100, "ignore_eos": True}
    err = error_of(httpx.post(url + "/v1/completions", json=body), 401)
    assert err["code"] == "invalid_api_key"
    error_of(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(url + "/health").status_code == 200  # health and metrics need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    auth = {"Authorization": "Bearer sekret"}
    ok = httpx.post(url + "/v1/completions", json=body, headers=auth)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8  # --max-tokens-cap
    err = error_of(httpx.post(url + "/v1/completions", json={**body, "prompt": "x" * 5000}, headers=auth), 413)
    assert "4096" in err["message"]
    error_of(httpx.post(url + "/v1/completions", json={**body, "n": 5}, headers=auth), 400)  # --max-n 4
    err = error_of(httpx.post(url + "/v1/completions", json={**body, "n": 2}, headers=auth), 400)
    assert "--max-queue" in err["message"]  # two choices could never fit a queue of one: not a 429

    strict_server.slow.delay = 0.5  # 8 tokens take longer than the 2 s timeout: a stream is in flight for 2 s
    try:
        with (httpx.Client(headers=auth, timeout=30) as h,
              h.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as first):
            next(first.iter_lines())  # it is running now
            err = error_of(h.post(url + "/v1/completions", json=body), 429)
            assert "limit" in err["message"]
        idle = lambda: strict_server.state.engine._reserved == 0  # noqa: E731 - no request holds a slot
        wait_for(idle)  # the dropped stream is aborted, freeing its slot (within one step)
        err = error_of(httpx.post(url + "/v1/completions", json=body, headers=auth), 408)
        assert "2 s" in err["message"]
        wait_for(idle)
        r = httpx.post(url + "/v1/completions", json={**body, "stream": True}, headers=auth)
        events = sse_events(r.text)
        assert "error" in events[-1] and events[-1]["error"]["type"] == "timeout_error"
    finally:
        strict_server.slow.delay = 0.0


def test_503_while_loading(tiny_llama):
    import threading

    release = threading.Event()

    def slow_load(config):
        from seriatim import LLM

        release.wait(30)
        return LLM(config.model, dtype="float32", device="cpu")

    live = LiveServer(tiny_config(tiny_llama), slow_load).start(wait_ready=False)
    try:
        r = httpx.get(live.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        err = error_of(httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}), 503)
        assert "loading" in err["message"]
        error_of(httpx.get(live.url + "/v1/models"), 503)
        assert httpx.get(live.url + "/metrics").status_code == 200
        release.set()
        live.wait_ready()
        assert httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 200
    finally:
        release.set()
        live.stop()


# ---- disconnects, load -------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_client_disconnect_aborts_the_request(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    aborted = server.metric("seriatim_requests_aborted_total")
    server.slow.delay = 0.05
    try:
        with (httpx.Client(timeout=30) as h,
              h.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r):
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.metric("seriatim_requests_running") == 1
        # the response is closed: the connection drops mid-stream
        wait_for(lambda: server.metric("seriatim_requests_aborted_total") == aborted + 1)
        assert server.metric("seriatim_requests_running") == 0
        assert server.metric("seriatim_requests_waiting") == 0

        # A non-streamed request whose client gives up (a read timeout closes the connection).
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.5,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                             "ignore_eos": True})
        wait_for(lambda: server.metric("seriatim_requests_aborted_total") == aborted + 2)
        assert server.metric("seriatim_requests_running") == 0
    finally:
        server.slow.delay = 0.0
    assert not server.state.llm.engine.has_unfinished()


def test_64_concurrent_streams(server, tiny_llm):
    prompts = [f"Story {i}: once upon a time" for i in range(64)]
    reference = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompts, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
    expected = [c["text"] for c in reference["choices"]]
    assert expected[0] == greedy(tiny_llm, prompts[0], 12, ignore_eos=True).text
    before_5xx = sum(server.metric("seriatim_http_requests_total", f'endpoint="/v1/completions",status="{s}"')
                     for s in (500, 502, 503, 504))

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64))) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, p) for p in prompts)), 60)

    results = asyncio.run(main())
    assert [t for t, _ in results] == expected
    assert all(f == "length" for _, f in results)
    after_5xx = sum(server.metric("seriatim_http_requests_total", f'endpoint="/v1/completions",status="{s}"')
                    for s in (500, 502, 503, 504))
    assert after_5xx == before_5xx
    assert server.metric("seriatim_requests_running") == 0


def test_metrics_text(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    httpx.post(server.url + "/v1/completions", json=body).raise_for_status()
    text = httpx.get(server.url + "/metrics").text
    for name in ("seriatim_http_requests_total", "seriatim_prompt_tokens_total", "seriatim_generation_tokens_total",
                 "seriatim_time_to_first_token_seconds_bucket", "seriatim_inter_token_latency_seconds_bucket",
                 "seriatim_requests_running", "seriatim_requests_waiting", "seriatim_kv_cache_usage_ratio",
                 "seriatim_prefix_cache_hit_rate", "seriatim_preemptions_total", "seriatim_engine_step_tokens"):
        assert name in text
    assert server.metric("seriatim_generation_tokens_total") > 0
    assert server.metric("seriatim_engine_steps_total") > 0 and server.metric("seriatim_engine_step_tokens") >= 1
    assert not math.isnan(server.metric("seriatim_time_to_first_token_seconds_count"))


@pytest.mark.parametrize("host, key, warned", [("127.0.0.1", None, False), ("localhost", None, False),
                                               ("::1", None, False), ("0.0.0.0", None, True), ("::", None, True),
                                               ("0.0.0.0", "sekret", False), ("10.1.2.3", None, True)])
def test_serving_beyond_this_machine_without_a_key_is_warned_about(host, key, warned):
    from seriatim.server.runner import exposure_warning

    warning = exposure_warning(host, key)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "--api-key" in warning


def test_an_event_stays_one_line_for_clients_that_split_like_splitlines():
    """A model may write U+2028, U+2029 or U+0085, which JSON leaves raw but str.splitlines() (httpx's
    aiter_lines) ends lines at; the soak's client once got half an event. They go out escaped."""
    from seriatim.server.streaming import sse

    text = "a\u2028b\x85c\u2029d"
    line, blank = sse({"text": text}).splitlines()
    assert blank == "" and json.loads(line.removeprefix("data: ")) == {"text": text}
