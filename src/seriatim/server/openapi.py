"""The OpenAPI document at /openapi.json: FastAPI's, made from the routes and the request models
(schemas.py), with what only the running server knows written in: the bounds its model and limits set
(`schemas.server_bound`), and the API key that the routes which may answer 401 need. Validation errors are
answered 400 (errors.py), never FastAPI's 422."""

from __future__ import annotations

import copy
from collections.abc import Iterator

from fastapi import FastAPI

from .schemas import SERVER_BOUNDS
from .state import ServerConfig, ServerState


def install_openapi(app: FastAPI, state: ServerState) -> None:
    made_by_fastapi = app.openapi  # built on first use, then kept

    def document() -> dict:
        doc = copy.deepcopy(made_by_fastapi())
        _drop_fastapi_422(doc)
        _fill_server_bounds(doc, server_limits(state))
        _require_key(doc)
        return doc

    app.openapi = document


def server_limits(state: ServerState) -> dict[str, object]:
    """The values of `server_bound`s: the config's, and the model's once it is loaded (None: no bound)."""
    config = state.config
    limits: dict[str, object] = {"max_n": _max_n(config), "max_prompts": _choices(config)}
    if state.llm is not None:
        vocab, context = state.llm.config.vocab_size, state.llm.config.context_length
        limits |= {"max_token_id": vocab - 1, "token_id_names": {"pattern": numerals_below(vocab)},
                   "max_prompt_tokens": context - 1,  # one position is left for output (engine.validate_prompt)
                   "max_tools": None if state.llm.tokenizer.takes_tools else 0}
    return limits


def numerals_below(n: int) -> str:
    """A regular expression of the decimal numerals 0 .. n-1 (n >= 1), without leading zeros."""
    digits = str(n)
    shorter = ["[0-9]" if k == 1 else f"[1-9][0-9]{{{k - 1}}}" for k in range(1, len(digits))]
    same_length = []  # numerals as long as n's: n's digits up to i, then a smaller one, then any
    for i, d in enumerate(digits):
        lowest = 1 if i == 0 and len(digits) > 1 else 0
        if int(d) > lowest:
            rest = len(digits) - i - 1
            same_length.append(f"{digits[:i]}[{lowest}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "^(" + "|".join(shorter + same_length) + ")$"


def _choices(config: ServerConfig) -> int:
    """The most choices one request may ask for (generation.check_n): n of one prompt, or one of each prompt."""
    return min(config.max_choices, config.max_queue)


def _max_n(config: ServerConfig) -> int:
    return min(config.max_n, _choices(config))


def _drop_fastapi_422(doc: dict) -> None:
    for operation in _operations(doc):
        operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(name, None)


def _fill_server_bounds(node: object, limits: dict[str, object]) -> None:
    if isinstance(node, dict):
        for keyword, limit in node.pop(SERVER_BOUNDS, {}).items():
            if limits.get(limit) is not None:
                node[keyword] = limits[limit]
        children = node.values()
    else:
        children = node if isinstance(node, list) else ()
    for child in children:
        _fill_server_bounds(child, limits)


def _require_key(doc: dict) -> None:
    """The bearer key on the operations that may answer 401 (app.py declares it where the server has a key)."""
    guarded = [operation for operation in _operations(doc) if "401" in operation["responses"]]
    if guarded:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for operation in guarded:
        operation["security"] = [{"apiKey": []}]


def _operations(doc: dict) -> Iterator[dict]:
    for operations in doc["paths"].values():
        yield from operations.values()
