"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("seriatim.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class ErrorDetail(BaseModel):
    message: str  # one sentence
    type: str  # invalid_request_error, authentication_error, not_found_error, ...
    param: str | None  # the request field at fault, where there is one
    code: str | None  # e.g. context_length_exceeded, model_not_found, queue_full


class ErrorBody(BaseModel):
    """Every error's body, in OpenAI's shape."""

    error: ErrorDetail


_WHEN = {
    400: "An invalid request: the message names the problem, `param` the field",
    401: "A missing or wrong API key",
    404: "An unknown model",
    408: "The request took longer than the server's --request-timeout, or its body than --read-timeout to arrive",
    413: "A body larger than the server's --max-body-bytes",
    429: "The server's queue (--max-queue) is full",
    500: "An error in the engine",
    503: "The model is loading, failed to load, or the server is shutting down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error statuses, each with the error body's schema."""
    return {status: {"model": ErrorBody, "description": _WHEN[status]} for status in statuses}


def _validation_error(exc: RequestValidationError) -> APIError:
    """A 400 for the first of pydantic's errors: one sentence, naming where it is, and the parameter."""
    err = exc.errors()[0]
    path = _path(exc.body, err.get("loc", ()), err["type"])
    ctx = err.get("ctx") or {}
    param = path[0] if path else ctx.get("param")
    return invalid(_sentence(err, _where(path)), param if isinstance(param, str) else None)


def _path(body: Any, loc: tuple, kind: str) -> list[str | int]:
    """pydantic's location of an error as keys and indices into the body. The location also names the union
    member a value was checked as (a form of `prompt`, say), which is no part of the request: steps that do
    not lead into the body are left out, but for the name of a missing field."""
    steps = loc[1:] if loc[:1] == ("body",) else loc
    path, node = [], body
    for i, step in enumerate(steps):
        if (isinstance(node, dict) and step in node
                or isinstance(node, list) and type(step) is int and 0 <= step < len(node)):
            path.append(step)
            node = node[step]
        elif kind == "missing" and i == len(steps) - 1:
            path.append(step)
    return path


def _where(path: list[str | int]) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path).removeprefix(".")


_TYPES_NAMED = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
                "bool_type": "a boolean", "list_type": "a list", "dict_type": "a JSON object",
                "model_type": "a JSON object", "model_attributes_type": "a JSON object"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}
_SIZES = {"string_too_short": ("at least", "min_length", "characters"),
          "string_too_long": ("at most", "max_length", "characters"),
          "too_short": ("at least", "min_length", "items"), "too_long": ("at most", "max_length", "items")}


def _sentence(err: dict, where: str) -> str:
    """One sentence for one of pydantic's errors at `where` (empty: the whole body)."""
    kind, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
    if kind == "missing":
        return f"missing required argument: {where}" if where else "request body is required"
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {where}"
    if kind in ("json_invalid", "json_type"):
        return f"the body is not valid JSON: {ctx.get('error', msg)}"
    if kind == "rule":  # a whole sentence already, about the fields of the object at `where`
        return f"{where}: {msg}" if where else msg
    return f"{where or 'the request body'} {_predicate(kind, ctx, err.get('input'), msg)}"


def _number(x: float) -> float | int:
    return int(x) if isinstance(x, float) and x.is_integer() else x  # a bound of 0, not 0.0


def _predicate(kind: str, ctx: dict, given: Any, msg: str) -> str:
    if kind in _TYPES_NAMED:
        return f"must be {_TYPES_NAMED[kind]}"
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return f"must be {op} {_number(ctx[key])}, got {json.dumps(given)}"
    if kind in _SIZES:
        most, key, unit = _SIZES[kind]
        unit = "characters" if isinstance(given, str) else unit  # a bound after a validator is pydantic's generic one
        if kind.endswith("short") and ctx[key] == 1:
            return "must be non-empty"
        if kind.endswith("long") and ctx[key] == 0:  # a field taken only empty, for clients that send it
            return "is not supported"
        return f"must have {most} {ctx[key]} {unit}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return f"must match the pattern {ctx['pattern']}"
    if kind in ("form", "unicode", "unsupported_content"):  # ours (schemas.py), written to follow the field
        return msg
    return f"is invalid: {msg}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif isinstance(exc.__cause__, RecursionError):  # FastAPI's "error parsing the body", from json.loads
            message = "the body is not valid JSON: it is nested too deeply"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(message, _TYPES.get(exc.status_code, "invalid_request_error"), None, None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)
