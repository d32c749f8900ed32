"""Rendering a model's Jinja chat template, the way transformers' `apply_chat_template` does."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta
import numpy as np
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ParameterError

# Names a message's reasoning may come under; transformers fills all of the first two from any of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def text_messages(messages: object) -> list[dict[str, Any]]:
    """Chat messages in the form templates take, checked: dicts with a string role and text content, given as
    a string or as OpenAI's text parts (joined); "developer" is the system role. Content may be missing only
    on an assistant turn (OpenAI's tool-call form). ParameterError (param "messages") otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ParameterError("messages", f"messages must be a non-empty list of message dicts, got {messages!r}")
    return [_text_message(i, m) for i, m in enumerate(messages)]


def _text_message(i: int, message: object) -> dict[str, Any]:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ParameterError("messages", f"message {i} must be a dict with a string 'role', got {message!r}")
    role, content = message["role"], message.get("content")
    if isinstance(content, Sequence) and not isinstance(content, str):
        content = "".join(_text_part(i, part) for part in content)
    if content is None and role != "assistant":
        raise ParameterError("messages", f"message {i} (a {role} message) has no content")
    if content is not None and not isinstance(content, str):
        raise ParameterError("messages", f"message {i}: content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
    return {**message, "role": "system" if role == "developer" else role, "content": content}


def _text_part(i: int, part: object) -> str:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    what = f"{kind} content is" if isinstance(kind, str) else f"content part {part!r} is"
    raise ParameterError("messages", f"message {i}: {what} not supported; only text parts ({{'type': 'text', "
                         "'text': ...}})")


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """The prompt text for `messages`; `extra` reaches the template as variables (`tools=...`)."""
    if not template:
        raise ValueError(
            "This model has no chat template, so chat messages cannot be turned into a prompt; "
            "pass a template or use plain-text completion."
        )
    if not messages:
        raise ValueError("Cannot render an empty conversation; provide at least one message.")
    # transformers only defines the special tokens the tokenizer has, so `bos_token is defined` agrees.
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    specials = {name: value for name, value in specials.items() if value is not None}
    variables = _plain({"tools": None, "documents": None, **specials, **extra})
    return _compile(template).render(
        messages=[_alias_reasoning(message) for message in _normalize_messages(messages)],
        add_generation_prompt=add_generation_prompt,
        **variables,
    )


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # transformers drops None-valued keys (APIs send `content=None`), which templates then see as undefined.
    normalized = []
    for message in _plain(messages):
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
        normalized.append({key: value for key, value in message.items() if value is not None})
    return normalized


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types: templates are untrusted code, so they must not reach
    the methods of richer objects. Anything else becomes an inert "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):  # `np.bool_(False)` would otherwise become a truthy placeholder
        return _plain(value.item())
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # subclasses such as enums carry extra methods
            return convert(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. OpenAI SDK messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by transformers to mask assistant
    tokens for training) and renders its body unchanged, so such templates still compile."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateDict:
    # Jinja's default `dict` global is the type itself; templates get only its constructors, as in transformers.
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces reject underscore attributes so a template cannot reach CPython internals through them.
    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot set {name!r} on a namespace.")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own `tojson` HTML-escapes ('<' becomes '\u003c'), which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from outside (messages, tools, add_generation_prompt, ...)."""
    return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(template)))


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    return env
