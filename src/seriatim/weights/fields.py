"""Values read from a model file's key/value stores (GGUF metadata, config.json, the tokenizer's JSON files),
checked for their kind and range where they are read: what a malformed file puts there becomes a
ModelFileError naming the key, not a TypeError, a ZeroDivisionError or a wrong number deep in the loader."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

from ..errors import ModelFileError

REQUIRED: Any = object()  # the default of a key that must be there: KeyError(key) if it is not


def value(store: Mapping[str, Any], key: str, kind: Any, default: Any = REQUIRED) -> Any:
    """`store[key]`, checked to be of `kind` (int, float, bool, str, dict, list, list[str], list[int]); an
    absent or null key gives `default`. Floats accept integers (JSON writes 10000 for 1e4) and must be
    finite; booleans are not numbers here."""
    found = store.get(key)
    if found is None:
        if default is REQUIRED:
            raise KeyError(key)
        return default
    if get_origin(kind) is list:
        _check_list(found, key, get_args(kind)[0])
    elif not _is(found, kind):
        raise ModelFileError(f"{key} must be {_a(kind)}, not {_show(found)}")
    return float(found) if kind is float else found


def positive(store: Mapping[str, Any], key: str, kind: type = int, default: Any = REQUIRED,
             limit: int | None = None) -> Any:
    """A size, count or scale: a number above zero (and at most `limit`)."""
    found = value(store, key, kind, default)
    if found is not None and (found <= 0 or (limit is not None and found > limit)):
        bound = "" if limit is None else f" up to {limit}"
        raise ModelFileError(f"{key} must be a positive {_NOUNS[kind]}{bound}, not {_show(found)}")
    return found


def read_json(path: Path) -> dict[str, Any]:
    """A file holding one JSON object (config.json, tokenizer_config.json, ...)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[... nested deep
        raise ModelFileError(f"is not valid JSON: {e}", path) from None
    if not isinstance(data, dict):
        raise ModelFileError(f"holds {_show(data)}, not a JSON object", path)
    return data


def _is(found: Any, kind: type) -> bool:
    if isinstance(found, bool):
        return kind is bool
    if kind is float:
        try:
            return isinstance(found, int | float) and math.isfinite(found)
        except OverflowError:  # an integer beyond any float
            return False
    return isinstance(found, kind)


def _check_list(found: Any, key: str, item: type) -> None:
    if not isinstance(found, list):
        raise ModelFileError(f"{key} must be a list of {_NOUNS[item]}s, not {_show(found)}")
    bad = next((i for i, x in enumerate(found) if not _is(x, item)), None)
    if bad is not None:
        raise ModelFileError(f"{key} must be a list of {_NOUNS[item]}s, but item {bad} is {_show(found[bad])}")


_NOUNS = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object", list: "list"}


def _a(kind: type) -> str:
    noun = _NOUNS[kind]
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _show(found: Any) -> str:
    """A value for a message, short whatever its size."""
    if isinstance(found, list | dict):
        return f"{'a list' if isinstance(found, list) else 'an object'} of {len(found)} items"
    text = repr(found)
    return text if len(text) <= 40 else text[:37] + "..."
