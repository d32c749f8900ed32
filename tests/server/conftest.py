"""The live servers the HTTP tests share (support/live_server.py)."""

from __future__ import annotations

import pytest

from support.live_server import LiveServer, tiny_config


@pytest.fixture(scope="module")
def server(tiny_llama):
    """The main test server with default limits; tests may slow its steps (`server.slow.delay`, reset after)."""
    live = LiveServer(tiny_config(tiny_llama)).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def strict_server(tiny_llama):
    """A server with every limit set low: API key, queue of 1, small bodies, 8-token cap, 2 s timeout."""
    config = tiny_config(tiny_llama, api_key="sekret", max_queue=1, max_body_bytes=4096, max_tokens_cap=8,
                         request_timeout=2.0, max_n=4)
    live = LiveServer(config).start()
    yield live
    live.stop()
