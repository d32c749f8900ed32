"""An asyncio front for the (single-threaded) Engine: one background thread owns it.

The thread runs the step loop. Requests, aborts and other work from asyncio
callers go through a thread-safe inbox that the thread drains between steps,
so an abort takes effect (and frees the request's KV cache) before the next
forward pass. Deltas travel back to per-request `asyncio.Queue`s through
`loop.call_soon_threadsafe`. With nothing to do the thread sleeps on a
condition variable; it never spins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from ..hardware import release_freed_memory
from ..outputs import Delta
from ..sampling import SamplingParams
from .engine import Engine, EngineMetrics, ValidPrompt

T = TypeVar("T")
log = logging.getLogger(__name__)


class EngineShutDown(RuntimeError):
    """The engine no longer accepts requests (shutting down, or its thread died)."""


class QueueFull(RuntimeError):
    """More requests are in flight than the engine was told to hold."""


# Idle this long, the engine hands freed memory back to the system (hardware.release_freed_memory): not
# between requests that follow each other closely, whose passes would pay the page faults again.
RELEASE_AFTER_IDLE_S = 1.0


class EngineError(RuntimeError):
    """A step of the engine failed; the requests in that step get it (`AsyncEngine._step_failed`)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of Delta | BaseException


class AsyncEngine:
    """Run `engine` in one background thread and expose it to asyncio.

    `max_requests` bounds the requests in flight (waiting + running); one more
    raises `QueueFull`. `None` means no bound.
    """

    def __init__(self, engine: Engine, *, max_requests: int | None = None):
        self.engine = engine
        self.max_requests = max_requests
        self.engine_metrics: EngineMetrics = engine.metrics  # refreshed in the engine thread after every step
        self._cond = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._streams: dict[int, _Stream] = {}  # engine-thread only
        self._reserved = 0  # requests submitted and not yet ended; under _cond
        self._stopping = False
        self._exited = False
        self._running = threading.Event()  # set once the thread has started
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="seriatim-engine", daemon=True)
        self._thread.start()
        self._running.wait()

    @property
    def accepting(self) -> bool:
        return self._thread is not None and not self._stopping

    def begin_shutdown(self, abort_running: bool = True) -> None:
        """Refuse new requests and (optionally) abort those in flight. Thread-safe, returns at once."""
        with self._cond:
            self._stopping = True
            if abort_running:
                self._inbox.append(self._abort_all)
            self._cond.notify()

    async def shutdown(self, abort_running: bool = True) -> None:
        """Stop accepting; abort in-flight requests or let them finish; wait for the thread to end."""
        self.begin_shutdown(abort_running)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # ---- requests --------------------------------------------------------------------------

    async def submit(
        self, prompt_ids: Seq[int], params: SamplingParams, queue: asyncio.Queue | None = None
    ) -> tuple[int, asyncio.Queue]:
        """Queue a request; return its id and the queue its deltas (or an exception) arrive on.

        Several requests may share one queue (deltas carry their request id). Raises ValueError
        for a bad prompt or parameters, QueueFull, or EngineShutDown, before anything is queued.
        The caller must `abort` the request if it stops reading before the last delta.
        """
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue() if queue is None else queue
        prompt = prompt_ids if isinstance(prompt_ids, ValidPrompt) else list(prompt_ids)  # a copy, unless immutable
        with self._cond:
            if not self.accepting:
                raise EngineShutDown("the engine is shutting down" if self._stopping else "the engine is not running")
            if self.max_requests is not None and self._reserved >= self.max_requests:
                raise QueueFull(f"the server is at its limit of {self.max_requests} requests in flight; retry later")
            self._reserved += 1
        try:
            fut = self._post_call(lambda: self._add(prompt, params, _Stream(loop, queue)))
        except BaseException:
            with self._cond:
                self._reserved -= 1
            raise
        try:
            # Shielded: once the engine thread has the request, a cancelled caller must abort it.
            rid = await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            fut.add_done_callback(self._abort_added)
            raise
        return rid, queue

    def _abort_added(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.abort(fut.result())

    async def generate(self, prompt_ids: Seq[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yield the request's deltas; the last has a finish_reason.

        Errors in the prompt or parameters raise ValueError before the first delta. If the
        consumer stops early (break, cancellation, aclose), the request is aborted and its KV
        cache freed before the engine's next step.
        """
        rid, queue = await self.submit(prompt_ids, params)
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self.abort(rid)

    def abort(self, request_id: int) -> None:
        """Cancel a request wherever it is. Thread-safe; takes effect before the next step."""
        self._post(lambda: self._abort(request_id))

    async def run_in_engine_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn()` in the engine thread between two steps (it may use the model) and return its result."""
        return await self._call(fn)

    # ---- the engine thread -----------------------------------------------------------------

    def _post(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._inbox.append(fn)
            self._cond.notify()

    def _post_call(self, fn: Callable[[], T]) -> Future:
        """Queue `fn` for the engine thread; its result or exception lands in the returned Future."""
        fut: Future = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        with self._cond:
            if self._exited or self._thread is None:
                raise EngineShutDown("the engine is not running")
            self._inbox.append(run)
            self._cond.notify()
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._post_call(fn))

    def _run(self) -> None:
        self._running.set()
        released = True  # nothing ran since freed memory was last handed back
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._streams and not self._stopping:
                        if not self._cond.wait(None if released else RELEASE_AFTER_IDLE_S):
                            release_freed_memory()  # a few milliseconds
                            released = True
                    work, self._inbox = self._inbox, []
                released = False
                for fn in work:
                    fn()
                if self._streams:
                    if self.engine.has_unfinished():
                        self._step()
                    else:  # cannot happen with a sound engine; never spin on it
                        dropped = EngineError("the engine dropped requests without finishing them")
                        self._fail(list(self._streams), dropped)
                self._snapshot()
                with self._cond:
                    if self._stopping and not self._streams and not self._inbox:
                        self._exited = True
                        return
        finally:
            with self._cond:  # also when the thread dies: nothing may wait on it forever
                self._stopping = self._exited = True
                leftovers, self._inbox = self._inbox, []
            for fn in leftovers:  # adds refuse (stopping); other calls run or fail in their futures
                try:
                    fn()
                except Exception:  # noqa: BLE001 - the engine is going down anyway; say what failed
                    log.exception("a call left for the stopping engine failed")
            self._fail(list(self._streams), EngineShutDown("the engine stopped"))

    def _step(self) -> None:
        try:
            results = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the requests it took down get it; the engine serves on
            self._step_failed(e)
            return
        out: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}
        for delta, _ in results:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            out.setdefault(stream.loop, []).append((stream.queue, delta))
            if delta.finish_reason is not None:
                self._end(delta.request_id)
        for loop, items in out.items():
            _deliver(loop, items)

    def _step_failed(self, e: Exception) -> None:
        """Fail the requests a failed step took down (Engine.step aborts those in the step), and log it. A failure
        that took none down came from outside any request's pass and may recur at every step: then every request
        in flight is aborted and fails, rather than the thread spinning on it."""
        failed = [rid for rid in self._streams if rid not in self.engine.requests]
        if not failed:
            failed = list(self._streams)
            for rid in failed:
                try:
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001 - its stream gets the step's error below either way
                    log.exception("aborting request %d after a failed step failed too", rid)
        log.error("engine step failed; failing request(s) %s", ", ".join(map(str, failed)), exc_info=e)
        err = EngineError(f"engine step failed: {type(e).__name__}: {e}")
        err.__cause__ = e
        self._fail(failed, err)

    def _add(self, prompt: Seq[int], params: SamplingParams, stream: _Stream) -> int:
        try:
            with self._cond:
                if self._stopping:
                    raise EngineShutDown("the engine is shutting down")
            rid = self.engine.add_request(prompt, params)  # ValueError goes back to the caller
        except BaseException:
            with self._cond:
                self._reserved -= 1
            raise
        self._streams[rid] = stream
        self._snapshot()
        return rid

    def _abort(self, rid: int) -> None:
        stream = self._streams.get(rid)
        if stream is None:
            return
        delta = self.engine.abort(rid) or Delta(rid, "", [], None, "abort")
        self._end(rid)
        _deliver(stream.loop, [(stream.queue, delta)])

    def _abort_all(self) -> None:
        for rid in list(self._streams):
            self._abort(rid)

    def _end(self, rid: int) -> None:
        self._streams.pop(rid, None)
        with self._cond:
            self._reserved -= 1
        self._snapshot()

    def _fail(self, rids: list[int], err: BaseException) -> None:
        """End these requests' streams with `err`."""
        streams = [self._streams[rid] for rid in rids]
        for rid in rids:
            self._end(rid)
        for stream in streams:
            _deliver(stream.loop, [(stream.queue, err)])
        self._snapshot()

    def _snapshot(self) -> None:
        """Refresh `engine_metrics` (a snapshot taken here, in the engine thread)."""
        self.engine_metrics = self.engine.metrics


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
    def put() -> None:
        for queue, item in items:
            queue.put_nowait(item)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
        loop.call_soon_threadsafe(put)
