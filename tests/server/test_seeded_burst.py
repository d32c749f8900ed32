"""A seeded request through the server in the fast mode: the same text and log-probabilities alone and inside a
burst of 16 others (batch invariance, docs/batch-invariance.md)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from seriatim.kernels import library
from seriatim.server import ServerConfig
from support.live_server import LiveServer

pytestmark = pytest.mark.skipif(library.ops() is None, reason="batch invariance needs seriatim's kernels "
                                "(ISA tier avx2 or above)")


@pytest.fixture(scope="module")
def fast_server(tiny_llama):
    live = LiveServer(ServerConfig(model=str(tiny_llama[0] / "Q4_1.gguf"), dtype="auto", device="cpu")).start()
    yield live
    live.stop()


def complete(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]}


def test_a_seeded_request_is_the_same_alone_and_in_a_burst(fast_server):
    model = httpx.get(f"{fast_server.url}/v1/models").json()["data"][0]["id"]
    request = {"model": model, "prompt": "Once upon a time there was a little model. " * 4, "max_tokens": 24,
               "temperature": 1.0, "seed": 7, "logprobs": 2}
    alone = complete(fast_server.url, request)
    others = [{"model": model, "prompt": "The quick brown fox jumps. " * (1 + i % 6), "max_tokens": 8 + i,
               "temperature": 0.8, "seed": i} for i in range(16)]
    bodies = others[:8] + [request] + others[8:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda body: complete(fast_server.url, body), bodies))
    assert results[8] == alone
    greedy = {**request, "temperature": 0, "seed": None}
    assert complete(fast_server.url, greedy) == complete(fast_server.url, greedy)  # the second hits the prefix cache
