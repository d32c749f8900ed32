"""Faults a server must come through: a KV pool too small for what it runs, and an engine step that raises."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx

from seriatim import LLM, SamplingParams
from seriatim.server import ServerConfig
from support.live_server import LiveServer, tiny_config

MODEL = "hf"  # the served name of the tiny model's directory
POSITION_BYTES = 512  # the tiny Llama's KV entries of one position in float32: 2 layers x 2 heads x 16 x (K, V) x 4
POISON = [13, 14, 15]  # the prompt of the request whose steps raise


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send the completion requests at once; their responses, in order."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.wait_for(asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies)), 60)


def test_a_kv_pool_too_small_for_its_requests_preempts_and_finishes_them_all(tiny_llama, tiny_llm):
    """Four requests of 28 positions on a pool of 64 cannot all run at once: the engine preempts and recomputes,
    and every one finishes with the text the model gives it alone. One that could never fit is a 400 that says
    why."""
    live = LiveServer(tiny_config(tiny_llama, kv_cache_memory=64 * POSITION_BYTES)).start()
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]
    alone = [out.text for out in tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                          ignore_eos=True))]
    try:
        assert live.state.llm.engine.scheduler.blocks.num_blocks == 4  # of 16 positions
        bodies = [{"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
                  for p in prompts]
        together = asyncio.run(post_all(live.url, bodies))
        assert [r.status_code for r in together] == [200] * 4
        assert [r.json()["choices"][0]["text"] for r in together] == alone
        assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in together)
        assert live.metric("seriatim_preemptions_total") > 0

        too_big = httpx.post(live.url + "/v1/completions", json={**bodies[0], "max_tokens": 100}, timeout=30)
        assert too_big.status_code == 400 and "KV cache" in too_big.json()["error"]["message"]
        assert live.metric("seriatim_requests_running") == live.metric("seriatim_requests_waiting") == 0
    finally:
        live.stop()


def failing_on_poison(config: ServerConfig) -> LLM:
    """The tiny model running one request at a time (the others wait their turn), whose forward pass raises in
    any step that holds the poisoned prompt."""
    llm = LLM(config.model, dtype=config.dtype, device=config.device, max_running=1)
    forward = llm.engine._forward

    def faulty(chunks):
        if any(c.seq.prompt_ids == POISON for c in chunks):
            raise RuntimeError("injected fault")
        return forward(chunks)

    llm.engine._forward = faulty
    return llm


async def queued_in_order(live: LiveServer, bodies: list[dict]) -> list[httpx.Response]:
    """Send the completion requests one after another, each once the engine holds the one before (one runs at a
    time: the first runs, the others wait); their responses, in order."""
    engine = live.state.engine
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
        sent = []
        for waiting, body in enumerate(bodies):
            sent.append(asyncio.create_task(client.post("/v1/completions", json=body)))
            deadline = time.monotonic() + 10
            while (engine.engine_metrics.running, engine.engine_metrics.waiting) != (1, waiting):
                assert time.monotonic() < deadline, "the request did not reach the engine"
                await asyncio.sleep(0.005)
        return await asyncio.wait_for(asyncio.gather(*sent), 60)


def test_a_step_that_raises_fails_its_requests_and_the_server_serves_on(tiny_llama, caplog):
    """A step that raises, with the poisoned request in it and another waiting: the poisoned request gets a 500
    in OpenAI's shape (a stream: an error event) and the log the traceback; the request running before it, the
    one waiting meanwhile, and later ones are served."""
    live = LiveServer(tiny_config(tiny_llama), failing_on_poison).start()
    body = {"model": MODEL, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    try:
        with caplog.at_level(logging.ERROR, logger="seriatim.engine.async_engine"):
            before, poisoned, waiting = asyncio.run(queued_in_order(live, [
                {**body, "prompt": [5, 6, 7], "max_tokens": 100}, {**body, "prompt": POISON}, {**body, "prompt": [8]}]))
            streamed = httpx.post(live.url + "/v1/completions", json={**body, "prompt": POISON, "stream": True},
                                  timeout=30)
            later = httpx.post(live.url + "/v1/completions", json={**body, "prompt": [9]}, timeout=30)
        assert poisoned.status_code == 500
        error = poisoned.json()["error"]
        assert error["type"] == "server_error"
        assert error["message"] == "engine step failed: RuntimeError: injected fault"
        events = [line.removeprefix("data: ") for line in streamed.text.split("\n\n") if line]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"] == error
        for r, tokens in ((before, 100), (waiting, 30), (later, 30)):
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens

        failures = [r for r in caplog.records if r.getMessage().startswith("engine step failed")]
        assert len(failures) == 2 and all("injected fault" in str(r.exc_info[1]) for r in failures)
        assert "Traceback" in caplog.text and "in faulty" in caplog.text
        assert not live.state.llm.engine.has_unfinished()
    finally:
        live.stop()
