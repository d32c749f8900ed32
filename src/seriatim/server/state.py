"""Server settings, and the model that loads in the background while the server already answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.async_engine import AsyncEngine
from .errors import APIError

log = logging.getLogger("seriatim.server")


@dataclass
class ServerConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 256  # requests in flight (running + waiting); one more gets 429
    max_tokens_cap: int | None = None  # an upper bound for max_tokens on top of the context
    max_n: int = 16  # choices per prompt
    max_choices: int = 64  # prompts x n in one request
    max_body_bytes: int = 1 << 20
    request_timeout: float | None = None  # seconds for one request, queue time included
    read_timeout: float = 30.0  # seconds a client has to send a request's head, and then its body
    speculative: str | dict | None = None  # LLM's `speculative`: "ngram" or its settings
    batch_invariant: bool = True  # LLM's `batch_invariant`
    kv_cache_memory: int | None = None  # LLM's `kv_cache_memory` (bytes): the most the KV cache may hold

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_n", "max_choices", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}")
        for name in ("request_timeout", "read_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def model_name(self) -> str:
        """The id clients send as `model`: the registry name, or a path's file or directory name."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.stem if path.suffix == ".gguf" else (path.name or self.model)


class ServerState:
    """Holds the LLM and its AsyncEngine once loaded; answers 503 until then."""

    def __init__(self, config: ServerConfig, load: Callable[[ServerConfig], Any] | None = None):
        self.config = config
        self._load = load or load_llm
        self.llm: Any = None
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.created = int(time.time())
        self.shutting_down = False
        self.on_loaded: Callable[[ServerState], None] | None = None
        self.on_load_error: Callable[[ServerState], None] | None = None
        self._task: asyncio.Task | None = None

    def start_loading(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load_in_background())

    async def _load_in_background(self) -> None:
        t0 = time.perf_counter()
        try:
            llm = await _in_daemon_thread(self._load, self.config)
        except Exception as e:  # noqa: BLE001 - reported by /health and the CLI
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            log.error("model failed to load: %s", self.load_error)
            if self.on_load_error:
                self.on_load_error(self)
            return
        if self.shutting_down:
            return
        engine = AsyncEngine(llm.engine, max_requests=self.config.max_queue)
        engine.start()
        self.llm, self.engine = llm, engine
        self.load_seconds = time.perf_counter() - t0
        if self.on_loaded:
            self.on_loaded(self)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.shutting_down

    def require(self) -> tuple[Any, AsyncEngine]:
        """(llm, engine), or a 503 while loading, after a failed load, or while shutting down."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down")
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}")
            raise APIError(503, f"the model {self.config.model_name!r} is still loading; retry shortly")
        return self.llm, self.engine

    def begin_shutdown(self) -> None:
        """Refuse new requests and abort those in flight. Safe from a signal handler."""
        self.shutting_down = True
        if self.engine is not None:
            self.engine.begin_shutdown(abort_running=True)

    async def close(self) -> None:
        self.shutting_down = True
        if self.engine is not None:
            await self.engine.shutdown(abort_running=True)
        if self._task is not None and not self._task.done():
            self._task.cancel()


async def _in_daemon_thread(fn: Callable[[ServerConfig], Any], config: ServerConfig) -> Any:
    """Run `fn(config)` in a daemon thread, so a shutdown during a long load need not wait for it."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(setter, value) -> None:
        if not fut.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(config)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            outcome = (fut.set_exception, e)
        else:
            outcome = (fut.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped while loading
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="seriatim-load", daemon=True).start()
    return await fut


def load_llm(config: ServerConfig) -> Any:
    """The LLM `config` describes (the server's default loader)."""
    from ..llm import LLM

    return LLM(config.model, dtype=config.dtype, device=config.device, threads=config.threads,
               kv_cache_memory=config.kv_cache_memory, speculative=config.speculative,
               batch_invariant=config.batch_invariant)
