"""The FastAPI application: routes, API-key check, body-size limit, request metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from .. import package_version
from .chat import chat_prompt_ids, create_chat_completion
from .completions import check_model, create_completion
from .errors import APIError, error_body, error_responses, install_error_handlers, invalid
from .metrics import CONTENT_TYPE, Metrics
from .openapi import install_openapi
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizePrompt, TokenizeRequest
from .state import ServerConfig, ServerState

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
          "/metrics", "/openapi.json", "/docs", "/")
# No API key needed: these, and the playground's files (the page asks for the key when the API needs one).
_OPEN = ("/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/")
PLAYGROUND = Path(__file__).with_name("playground")
# The page runs only its own files and talks only to this server: no inline script, no other origin, no
# framing by another site (what it shows is the model's text, which must never run as code).
PLAYGROUND_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                  "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}  # a chunk, or [DONE]
# What each kind of route may answer besides 200 (and 401, where the server has an API key).
_GENERATION = {200: {"description": "The completion; with `stream`, server-sent events of its chunks",
                     "content": {"text/event-stream": {"itemSchema": _EVENT}}},
               **error_responses(400, 404, 408, 413, 429, 500, 503)}
_TOKENS = error_responses(400, 404, 408, 413, 503)


class Health(BaseModel):
    status: Literal["ok", "loading", "error", "shutting_down"]
    model: str
    error: str | None = None  # why the model failed to load


def create_app(config: ServerConfig, load: Callable[[ServerConfig], Any] | None = None) -> FastAPI:
    """The app; the model starts loading (in a thread) when the app starts up.

    `load(config) -> LLM` replaces the default loader (tests, embedding).
    """
    state = ServerState(config, load)
    metrics = Metrics(lambda: state.engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start_loading()
        yield
        await state.close()

    app = FastAPI(title="seriatim", version=package_version(), lifespan=lifespan, redoc_url=None,
                  description="OpenAI-compatible text generation with seriatim")
    app.state.seriatim = state
    app.state.metrics = metrics
    install_error_handlers(app)
    install_openapi(app, state)
    app.add_middleware(_Guard, state=state, metrics=metrics)
    key = error_responses(401) if config.api_key is not None else {}  # on the routes not in _OPEN

    @app.post("/v1/completions", responses=_GENERATION | key)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state, metrics)

    @app.post("/v1/chat/completions", responses=_GENERATION | key)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state, metrics)

    @app.get("/v1/models", responses=error_responses(503) | key)
    async def models() -> dict:
        llm, _ = state.require()
        return {"object": "list", "data": [_model_card(state, llm)]}

    @app.get("/v1/models/{model:path}", responses=error_responses(404, 503) | key)
    async def model(model: str) -> dict:
        llm, _ = state.require()
        check_model(model, state)
        return _model_card(state, llm)

    @app.post("/tokenize", responses=_TOKENS | key)
    async def tokenize(body: TokenizeRequest) -> dict:
        return _tokenize(body, state)

    @app.post("/detokenize", responses=_TOKENS | key)
    async def detokenize(body: DetokenizeRequest) -> dict:
        return _detokenize(body, state)

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
    async def health() -> Response:
        return _health(state)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND / "index.html", headers={"Content-Security-Policy": PLAYGROUND_CSP})

    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")
    return app


def _tokenize(body: TokenizeRequest, state: ServerState) -> dict:
    """A prompt or chat messages -> token ids, as the completion routes would make them."""
    llm, _ = state.require()
    check_model(body.model, state)
    if isinstance(body, TokenizePrompt):
        ids = llm.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        ids = chat_prompt_ids(llm, body.messages)
    return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.context_length}


def _detokenize(body: DetokenizeRequest, state: ServerState) -> dict:
    llm, _ = state.require()
    check_model(body.model, state)
    vocab = llm.config.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": llm.tokenizer.decode(body.tokens)}


def _health(state: ServerState) -> Response:
    """200 when the model is ready; 503 with the reason while loading, after a failed load, or shutting down."""
    config = state.config
    if state.ready:
        return JSONResponse({"status": "ok", "model": config.model_name})
    status = "shutting_down" if state.shutting_down else "error" if state.load_error else "loading"
    body = {"status": status, "model": config.model_name}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503)


def _model_card(state: ServerState, llm) -> dict:
    return {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "seriatim",
            "root": state.config.model, "max_model_len": llm.config.context_length}


class _Guard:
    """Pure ASGI middleware: API key (401), body size (413), and request counts by endpoint and status.

    The body is read here, up to the limit, and replayed to the app; later `receive` calls go to
    the server, so the app can still notice a disconnect.
    """

    def __init__(self, app, state: ServerState, metrics: Metrics):
        self.app, self.state, self.metrics = app, state, metrics
        key = state.config.api_key
        self.key = None if key is None else key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        status = [500]

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counting_send, status)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()

    async def _handle(self, scope, receive, send, status: list[int]) -> None:
        path = scope["path"]
        public = path in _OPEN or path.startswith("/playground/")
        if self.key is not None and not public and not self._authorized(scope):
            await _send_error(send, APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                             code="invalid_api_key"))
            return
        limit = self.state.config.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, invalid("the Content-Length header is not a number"))
                return
            if int(length) > limit:
                await _send_error(send, _too_large(limit), close=True)
                return
        seconds = self.state.config.read_timeout
        try:
            async with asyncio.timeout(seconds):  # a trickled body must not hold the connection
                chunks = await _read_body(receive, limit)
        except TimeoutError:
            await _send_error(send, APIError(408, f"the request body did not arrive within {seconds:g} s",
                                             code="request_timeout"), close=True)
            return
        except APIError as e:
            await _send_error(send, e, close=True)
            return
        if chunks is None:  # gone before its body arrived
            status[0] = 499
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)


async def _read_body(receive, limit: int) -> list[bytes] | None:
    """The body's chunks, or None if the client disconnects first; a 413 past `limit` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return None


async def _send_error(send, err: APIError, close: bool = False) -> None:
    """Answer `err`; `close`: and end the connection (its body was not read to the end, so the next bytes on it
    would not begin a request)."""
    body = json.dumps(error_body(err.message, err.type, err.param, err.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
