"""Server-sent events in OpenAI's format, and noticing clients that went away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from .errors import APIError, error_body

T = TypeVar("T")
log = logging.getLogger("seriatim.server")

DONE = "data: [DONE]\n\n"


# Characters JSON leaves unescaped that str.splitlines() (and so httpx's aiter_lines) ends a line at: a model
# that writes one would split its event in two for such a client. JSON has them only inside strings, where
# their escapes mean the same.
_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def sse(obj: dict) -> str:
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {data}\n\n"


def event_stream(events: AsyncIterator[str], on_close) -> StreamingResponse:
    """Stream `events`, then `[DONE]`. An error after the first byte becomes an error event.
    `on_close()` runs however the stream ends: finished, failed, or the client disconnected
    (Starlette cancels the stream when it sees the disconnect, even before the first token)."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            log.exception("error while streaming")
            yield sse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"))
        finally:
            on_close()
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then answer 499)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(499, "the client disconnected")
    return task.result()


async def run_to_completion(request: Request, job) -> None:
    """Wait for a non-streamed job to finish (aborted if the client leaves); always close it."""

    async def drain() -> None:
        async for _ in job.events():
            pass

    try:
        await unless_disconnected(request, drain())
    finally:
        job.close()
