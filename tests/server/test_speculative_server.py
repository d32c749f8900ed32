"""`seriatim serve --speculative ngram` (and with a draft model): greedy completions as a plain server gives
them, the draft counters in /metrics, and a request that opts out with `"speculative": false`."""

from __future__ import annotations

import json

import httpx
import pytest

from seriatim import SamplingParams
from seriatim.server.state import ServerConfig
from support.live_server import LiveServer

REPEATING = {"model": "hf", "prompt": [42, 7, 42], "max_tokens": 30, "temperature": 0, "ignore_eos": True,
             "logit_bias": {"42": 100}}


@pytest.fixture(scope="module")
def spec_server(tiny_llama):
    # Not adaptive: greedy requests draft by measured pass times, which a busy machine would change.
    live = LiveServer(ServerConfig(model=str(tiny_llama[0] / "hf"), dtype="float32", device="cpu",
                                   speculative={"method": "ngram", "adaptive": False})).start()
    yield live
    live.stop()


def test_greedy_completions_are_a_plain_servers(spec_server, tiny_llm):
    for prompt in ("The quick brown fox", "one two one two one two"):
        body = {"model": "hf", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        got = httpx.post(spec_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        expected = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        assert got == expected.text


def test_drafts_are_counted_and_a_request_may_opt_out(spec_server):
    drafted = spec_server.metric("seriatim_spec_draft_tokens_total")
    accepted = spec_server.metric("seriatim_spec_accepted_tokens_total")
    verifications = spec_server.metric("seriatim_spec_verifications_total")
    r = httpx.post(spec_server.url + "/v1/completions", json=REPEATING, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 30
    kept = spec_server.metric("seriatim_spec_accepted_tokens_total") - accepted
    passes = spec_server.metric("seriatim_spec_verifications_total") - verifications
    assert kept >= 20 and (kept + passes) / passes >= 3  # tokens per verifying pass
    drafted = spec_server.metric("seriatim_spec_draft_tokens_total")
    httpx.post(spec_server.url + "/v1/completions", json={**REPEATING, "speculative": False}, timeout=60)
    assert spec_server.metric("seriatim_spec_draft_tokens_total") == drafted


def test_a_stream_carries_several_tokens_per_chunk(spec_server):
    whole = httpx.post(spec_server.url + "/v1/completions", json=REPEATING, timeout=60).json()["choices"][0]["text"]
    with httpx.stream("POST", spec_server.url + "/v1/completions", json={**REPEATING, "stream": True},
                      timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["text"]]
    assert "".join(texts) == whole and len(texts) < 30  # 30 tokens in fewer chunks: several per pass


def test_a_server_with_a_draft_model_answers_as_a_plain_one(tiny_llama, tiny_qwen2, tiny_llm):
    draft = {"method": "draft", "model": str(tiny_qwen2 / "hf"), "adaptive": False}
    live = LiveServer(ServerConfig(model=str(tiny_llama[0] / "hf"), dtype="float32", device="cpu",
                                   speculative=draft)).start()
    try:
        body = {"model": "hf", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        got = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert got == tiny_llm.generate(body["prompt"], SamplingParams(temperature=0, max_tokens=24,
                                                                       ignore_eos=True))[0].text
        assert live.metric("seriatim_spec_draft_tokens_total") > 0
    finally:
        live.stop()
