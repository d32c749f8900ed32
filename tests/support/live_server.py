"""Live servers for the HTTP tests: the real app under uvicorn, in a thread, on a free 127.0.0.1 port.

(No tests here; the server test modules import these fixtures.)
"""

from __future__ import annotations

import threading
import time

import httpx

from seriatim.server import ServerConfig, create_app
from seriatim.server.runner import Server
from seriatim.server.state import load_llm


class LiveServer:
    def __init__(self, config: ServerConfig, load=None):
        self.slow = SlowSteps()
        self.app = create_app(config, load or self.slow.load)
        self.state = self.app.state.seriatim
        self.server = Server.of(self.app, "127.0.0.1", 0, graceful_s=5)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        assert self.server.listening.wait(30), "server did not start"
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/health").status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("model did not load")

    @property
    def url(self) -> str:
        return self.server.url()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "server did not stop"

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics").text
        want = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0


class SlowSteps:
    """Wraps an Engine's step so tests can slow generation down (to catch a request mid-flight)."""

    def __init__(self):
        self.delay = 0.0

    def load(self, config: ServerConfig):
        llm = load_llm(config)
        step = llm.engine.step

        def slow_step():
            if self.delay:
                time.sleep(self.delay)
            return step()

        llm.engine.step = slow_step
        return llm


def tiny_config(tiny_llama, **kw) -> ServerConfig:
    return ServerConfig(model=str(tiny_llama[0] / "hf"), dtype="float32", device="cpu", **kw)
