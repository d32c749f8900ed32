"""Run the app under uvicorn: print the URL when listening, abort in-flight requests on SIGTERM/SIGINT."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

import uvicorn

from .app import create_app
from .connection import deadline_protocol, raise_open_file_limit
from .state import ServerConfig, ServerState


class Server(uvicorn.Server):
    """uvicorn's server, plus: on a signal, the engine aborts what is in flight (so streams end at
    once instead of running to completion) and the process exits 0 rather than re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.listening = threading.Event()
        self.on_listening = None  # called once the sockets are bound

    @classmethod
    def of(cls, app, host: str, port: int, *, log_level: str = "warning", graceful_s: float = 10) -> Server:
        """The server for `create_app`'s app: its clients have ServerConfig.read_timeout to send a request."""
        state: ServerState = app.state.seriatim
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=graceful_s,
                                http=deadline_protocol(state.config.read_timeout))
        return cls(config, state)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()
            if self.on_listening is not None:
                self.on_listening()

    def handle_exit(self, sig, frame) -> None:
        self.state.begin_shutdown()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()  # a handled signal is a clean exit

    @property
    def port(self) -> int | None:
        for server in getattr(self, "servers", []) or []:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return None

    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to say when the server listens beyond this machine without an API key."""
    if api_key or host in LOOPBACK or host.startswith("127."):
        return None
    return (f"serving on {host} without --api-key: anyone who can reach this port can use the model; "
            "set --api-key, or --host 127.0.0.1 to serve this machine only")


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          out: TextIO = sys.stdout) -> None:
    """Serve until SIGINT/SIGTERM. Raises ValueError if the model cannot be found or fails to load."""
    from ..weights.registry import resolve_model

    resolve_model(config.model)  # an unknown model fails now, not after the server is up
    warning = exposure_warning(host, config.api_key)
    if warning:
        print(f"seriatim: warning: {warning}", file=sys.stderr, flush=True)
    raise_open_file_limit()
    app = create_app(config)
    server = Server.of(app, host, port, log_level=log_level)
    state = server.state
    lock = threading.Lock()
    said: set[str] = set()

    def report() -> None:
        with lock:
            if server.listening.is_set() and "url" not in said:
                said.add("url")
                url = server.url()
                note = "ready" if state.ready else "loading the model..."
                print(f"seriatim: serving {config.model_name!r} at {url} (OpenAI API base {url}/v1); {note}",
                      file=out, flush=True)
                if state.ready:
                    said.add("ready")
            if "url" in said and state.ready and "ready" not in said:
                said.add("ready")
                print(f"seriatim: model loaded in {state.load_seconds:.1f} s; ready", file=out, flush=True)

    def failed(_: ServerState) -> None:
        server.should_exit = True

    state.on_loaded = lambda _: report()
    state.on_load_error = failed
    server.on_listening = report
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when it cannot bind; its log line says why
        if e.code:
            raise ValueError(f"could not serve on {host}:{port} (see the message above)") from None
    if state.load_error:
        raise ValueError(f"the model failed to load: {state.load_error}")
