"""The playground's extension of /v1/completions: `trace`, with `logprobs` or without, streamed and not; the
OpenAI fields unchanged beside it."""

from __future__ import annotations

import json

import httpx

MODEL = "hf"


def test_trace_explains_each_token_and_names_its_pass(server):
    body = {"model": MODEL, "prompt": "trace", "max_tokens": 5, "temperature": 0.9, "top_k": 3, "seed": 2,
            "logprobs": 5, "ignore_eos": True}
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    whole = httpx.post(server.url + "/v1/completions", json={**body, "trace": True}, timeout=30).json()["choices"][0]
    assert "trace" not in plain and {k: whole[k] for k in plain} == plain  # OpenAI's fields as they were
    tokens = whole["trace"]["tokens"]
    assert len(tokens) == 5 and [t["text"] for t in tokens] == whole["logprobs"]["tokens"]
    for t in tokens:
        assert t["processed_logprob"] is not None and t["processed_entropy"] <= t["entropy"]
        alts = t["alternatives"]
        assert len(alts) == 5 and [a["removed_by"] for a in alts[3:]] == ["top_k", "top_k"]
        assert all(a["processed_logprob"] is None for a in alts[3:])
        assert all(a["processed_logprob"] is not None and a["removed_by"] is None for a in alts[:3])
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "trace": True, "stream": True},
                      timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    traced = [e["choices"][0]["trace"] for e in events if e["choices"][0].get("trace", {}).get("tokens")]
    assert [t["tokens"][0]["id"] for t in traced] == [t["id"] for t in tokens]
    passes = [t["pass"] for t in traced]
    assert passes[0]["tokens"] > 1 and all(p["tokens"] == 1 and p["ms"] > 0 for p in passes[1:])
    assert [p["index"] for p in passes] == list(range(passes[0]["index"], passes[0]["index"] + 5))


def test_trace_without_logprobs_explains_the_chosen_tokens_alone(server):
    body = {"model": MODEL, "prompt": "x", "trace": True, "max_tokens": 3, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None
    tokens = choice["trace"]["tokens"]
    assert len(tokens) == 3 and all(t["alternatives"] == [] and t["processed_logprob"] is not None for t in tokens)
