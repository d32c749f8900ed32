"""AsyncEngine: one engine thread, asyncio callers; concurrency, cancellation, errors, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from seriatim import SamplingParams
from seriatim.engine.async_engine import AsyncEngine, EngineError, EngineShutDown, QueueFull
from seriatim.model.scoring import prompt_logprobs


def prompt_ids(llm, n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class RecordingEngine:
    """Delegates to a real Engine and logs steps, aborts and calls, with the thread each ran in."""

    def __init__(self, engine, fail_steps: int = 0):
        self.engine = engine
        self.log: list[str] = []
        self.threads: set[int] = set()
        self.fail_steps = fail_steps
        self.idle_polls = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt, params):
        self.threads.add(threading.get_ident())
        return self.engine.add_request(prompt, params)

    def step(self):
        self.threads.add(threading.get_ident())
        self.log.append("step")
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("boom")
        return self.engine.step()

    def abort(self, rid):
        self.log.append(f"abort {rid}")
        return self.engine.abort(rid)

    def has_unfinished(self):
        self.idle_polls += 1
        return self.engine.has_unfinished()


@contextlib.asynccontextmanager
async def running(engine, **kw):
    ae = AsyncEngine(engine, **kw)
    ae.start()
    try:
        yield ae
    finally:
        await ae.shutdown(abort_running=True)
    assert not ae._thread.is_alive()


async def collect(ae, prompt, params):
    deltas = [d async for d in ae.generate(prompt, params)]
    return deltas


def test_concurrent_generations_equal_sequential(tiny_llm):
    params = [SamplingParams(temperature=0, max_tokens=12 + i, ignore_eos=True) for i in range(6)]
    prompts = [prompt_ids(tiny_llm, n, n) for n in (3, 17, 9, 30, 5, 11)]
    expected = [tiny_llm.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=20, ignore_eos=True)
    expected_seeded = tiny_llm.generate(prompts[0], seeded)[0]
    stats = tiny_llm.engine.stats
    finished, aborted = stats.finished, stats.aborted

    async def main():
        rec = RecordingEngine(tiny_llm.engine)
        async with running(rec) as ae:
            results = await asyncio.gather(
                *(collect(ae, p, sp) for p, sp in zip(prompts, params)), collect(ae, prompts[0], seeded)
            )
        assert rec.threads == {ae._thread.ident}  # the Engine is touched by one thread only
        return results, ae

    results, ae = asyncio.run(main())
    for deltas, exp in zip(results, expected + [expected_seeded]):
        assert [t for d in deltas for t in d.token_ids] == exp.token_ids
        assert "".join(d.text for d in deltas) == exp.text
        assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].metrics is not None
    assert (stats.finished - finished, stats.aborted - aborted) == (7, 0)
    assert not tiny_llm.engine.has_unfinished()


def test_cancelled_consumer_aborts_within_one_step(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    stats = tiny_llm.engine.stats
    aborted = stats.aborted

    async def main():
        rec = RecordingEngine(tiny_llm.engine)
        async with running(rec) as ae:
            gen = ae.generate(prompt_ids(tiny_llm, 8), params)
            got = [await gen.__anext__() for _ in range(3)]
            rid = got[0].request_id
            rec.log.append("closed")
            await gen.aclose()  # the consumer stops reading
            busy, m = await ae.run_in_engine_thread(lambda: (tiny_llm.engine.has_unfinished(), tiny_llm.engine.metrics))
            assert not busy and m.stats.aborted - aborted == 1 and m.running == 0
            log = rec.log[rec.log.index("closed"):]
            assert f"abort {rid}" in log and log.index(f"abort {rid}") <= 2  # at most one step in between

            # Cancelling the task that iterates does the same, also while the request is queued.
            task = asyncio.create_task(collect(ae, prompt_ids(tiny_llm, 8), params))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            busy = await ae.run_in_engine_thread(tiny_llm.engine.has_unfinished)
            assert not busy and stats.aborted - aborted == 2

    asyncio.run(main())


def test_validation_errors_raise_before_the_first_delta(tiny_llm):
    async def main():
        async with running(tiny_llm.engine) as ae:
            for prompt, params, match in [
                ([], SamplingParams(), "empty"),
                ([10**6], SamplingParams(), "vocabulary"),
                (prompt_ids(tiny_llm, tiny_llm.config.context_length), SamplingParams(), "context"),
                ([5, 6], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
            ]:
                gen = ae.generate(prompt, params)
                with pytest.raises(ValueError, match=match):
                    await gen.__anext__()
            assert ae._reserved == 0
            # The engine still works afterwards.
            deltas = await collect(ae, [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
            assert len(deltas) == 3

    asyncio.run(main())


def test_a_step_failing_outside_any_request_fails_all_in_flight_and_engine_recovers(tiny_llm):
    """A step that raises before the engine touched a request (none dropped) could fail the same way at every
    step: every request in flight gets the error, rather than the thread spinning on it."""

    async def main():
        rec = RecordingEngine(tiny_llm.engine, fail_steps=1)
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        async with running(rec) as ae:
            results = await asyncio.gather(
                collect(ae, [5, 6, 7], params), collect(ae, [8, 9], params), return_exceptions=True
            )
            assert all(isinstance(r, EngineError) and "boom" in str(r) for r in results)
            assert not tiny_llm.engine.has_unfinished()
            deltas = await collect(ae, [5, 6, 7], params)
            assert sum(len(d.token_ids) for d in deltas) == 5

    asyncio.run(main())


def test_queue_limit_and_idle_thread(tiny_llm):
    async def main():
        rec = RecordingEngine(tiny_llm.engine)
        async with running(rec, max_requests=1) as ae:
            gen = ae.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
            await gen.__anext__()
            with pytest.raises(QueueFull):
                await ae.submit([5, 6], SamplingParams())
            await gen.aclose()
            await ae.run_in_engine_thread(lambda: None)
            # Idle: no steps and no polling while nothing is in flight.
            before = (len(rec.log), rec.idle_polls)
            await asyncio.sleep(0.3)
            assert (len(rec.log), rec.idle_polls) == before
            deltas = await collect(ae, [5, 6], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
            assert deltas[-1].finish_reason == "length"

    asyncio.run(main())


def test_shutdown_aborts_in_flight_and_refuses_new_requests(tiny_llm):
    async def main():
        ae = AsyncEngine(tiny_llm.engine)
        ae.start()
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        task = asyncio.create_task(collect(ae, [5, 6, 7], params))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await ae.shutdown(abort_running=True)
        deltas = await task
        assert deltas[-1].finish_reason == "abort"
        assert time.perf_counter() - t0 < 5
        with pytest.raises(EngineShutDown):
            await ae.submit([5, 6], SamplingParams())
        assert not tiny_llm.engine.has_unfinished()

        # Without aborting, running requests complete before the thread ends.
        ae = AsyncEngine(tiny_llm.engine)
        ae.start()
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        task = asyncio.create_task(collect(ae, [5, 6, 7], params))
        await asyncio.sleep(0.01)
        await ae.shutdown(abort_running=False)
        assert (await task)[-1].finish_reason == "length"

    asyncio.run(main())


def test_prompt_logprobs_are_raw_model_logprobs(tiny_llm):
    from support.parity import run_chunks

    prompt = prompt_ids(tiny_llm, 40, 3)
    logits = run_chunks(tiny_llm, prompt, [len(prompt)])
    ref = torch.log_softmax(logits, -1)
    got = prompt_logprobs(tiny_llm.model, prompt, 3, torch.float32, tiny_llm.device, chunk=16)  # 3 chunks
    assert got[0] is None and len(got) == len(prompt)
    for pos in range(1, len(prompt)):
        lp = got[pos]
        assert lp.token_id == prompt[pos]
        assert lp.logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[pos - 1].topk(3).indices.tolist()


def test_freed_memory_goes_back_when_the_engine_goes_idle(tiny_llm, monkeypatch):
    """Once per idle spell, not between steps or close requests: glibc keeps freed memory for the passes'
    reuse, and a server idle for a while hands it back."""
    import seriatim.engine.async_engine as module

    releases = []
    monkeypatch.setattr(module, "release_freed_memory", lambda: releases.append(threading.get_ident()))
    monkeypatch.setattr(module, "RELEASE_AFTER_IDLE_S", 0.05)

    async def main():
        rec = RecordingEngine(tiny_llm.engine)
        async with running(rec) as ae:
            await ae.run_in_engine_thread(lambda: None)
            await asyncio.sleep(0.1)
            before = len(releases)
            await collect(ae, [5, 6], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            await asyncio.sleep(0.3)
            assert len(releases) == before + 1 and rec.log.count("step") >= 8
            assert set(releases) == rec.threads  # in the engine thread

    asyncio.run(main())
