"""HTTP connections a slow or idle client cannot hold open: uvicorn's h11 protocol, plus a deadline for
each request's head. uvicorn closes a connection idle between requests after its keep-alive timeout, but
a client that trickles its head (a byte a second) resets that timer with every byte and would hold the
connection forever; here the head must be complete within `read_timeout` of the connection opening (or
of the previous response ending), or the client gets a 408 and the connection closes. The body's own
deadline is the app's (app._Guard), which can answer it in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body


class DeadlineProtocol(H11Protocol):
    read_timeout: float = 30.0  # seconds; set per server by `deadline_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in: the app takes it from here
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # waiting for the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial, _ = self.conn.trailing_data
        if partial:  # a head begun but not finished: say why the connection ends
            self.transport.write(_timeout_response(self.read_timeout))
        self.transport.close()


def deadline_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's `http` protocol class for a server whose clients have `read_timeout` s to send a head."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"read_timeout": read_timeout})


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(error_body(f"the request's head did not arrive within {seconds:g} s", "timeout_error",
                                 code="request_timeout")).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: each connection holds a descriptor, and a few
    hundred idle clients must not exhaust a default soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
