"""Structured output on the HTTP routes. A request names its constraint in one of three ways:
OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` object
(json, regex, choice, grammar, json_object) or vLLM's older `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar` fields. Each becomes SamplingParams' keyword, and the grammar is compiled off the engine
thread, within a time limit, before the request is queued."""

from __future__ import annotations

import asyncio

from ..errors import ParameterError
from ..sampling import SamplingParams
from .errors import APIError, invalid
from .schemas import _Sampling

COMPILE_TIMEOUT = 10.0  # seconds; llguidance's own limits end nearly every compile within tens of milliseconds


def constraint_fields(req: _Sampling, tool_grammar: str | None = None) -> dict[str, tuple[str, object]]:
    """The request's constraint as {SamplingParams keyword: (request field, value)}: one at most
    (schemas._sampling_rules). `tool_grammar`: the grammar of a required or named tool call (server/tools.py)."""
    found: list[tuple[str, str, object]] = [] if tool_grammar is None else [("grammar", "tool_choice", tool_grammar)]
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("json_object", "response_format", True))
    elif fmt is not None and fmt.type == "json_schema":
        found.append(("json_schema", "response_format", fmt.json_schema.schema_))
    if req.structured_outputs is not None:
        given = req.structured_outputs.model_dump(exclude_none=True, by_alias=True)
        found += [("json_schema" if k == "json" else k, "structured_outputs", v) for k, v in given.items()
                  if v is not False]
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append(("json_schema" if kind == "json" else kind, f"guided_{kind}", value))
    return {kind: (field, value) for kind, field, value in found}


def constraint_error(e: ParameterError, fields: dict[str, tuple[str, object]]) -> APIError:
    """A 400 naming the request field a constraint came from (SamplingParams names its own keyword)."""
    field = fields.get(e.param, (e.param,))[0]
    return invalid(str(e), field, "invalid_constraint")


def constraint_param(params: SamplingParams, fields: dict[str, tuple[str, object]]) -> str | None:
    """The request field `params`' constraint came from (None: it has none)."""
    return None if params.constraint is None else fields[params.constraint.kind][0]


async def compile_constraint(engine, params: SamplingParams, fields: dict[str, tuple[str, object]]) -> None:
    """Compile `params`' constraint into the engine's cache from a worker thread, so the engine thread only
    copies it; a 400 if it does not compile or takes longer than COMPILE_TIMEOUT."""
    if params.constraint is None:
        return
    try:
        await asyncio.wait_for(asyncio.to_thread(engine.engine.grammars.compile, params.constraint), COMPILE_TIMEOUT)
    except ParameterError as e:
        raise constraint_error(e, fields) from None
    except TimeoutError:
        field = constraint_param(params, fields)
        raise invalid(f"{field} took longer than {COMPILE_TIMEOUT:g} s to compile; simplify it", field,
                      "constraint_timeout") from None
