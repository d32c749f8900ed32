"""What a request's output must match: a JSON schema, any JSON object, a regular expression, a grammar or one
of a list of choices. `SamplingParams` takes one of them; here it becomes llguidance's grammar text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from ..errors import ParameterError

Kind = Literal["json_schema", "json_object", "regex", "grammar", "choice"]
KINDS: tuple[Kind, ...] = ("json_schema", "json_object", "regex", "grammar", "choice")

# JSON as people and models write it on one line: `{"a": 1, "b": [2, 3]}`. Flexible whitespace would let a
# sampled model run on in blank lines and indentation until max_tokens, which is the commonest way constrained
# JSON fails to finish.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# A grammar as written can have a dead end that llguidance does not see: after "a", `start: /a+/ /a+/` allows
# only more "a"s, for ever (a greedy lexeme never lets the next one begin). Jump-forward would force those bytes
# without end, inside one call that holds the engine thread and the GIL, so the model writes a written grammar's
# fixed text itself, a masked token at a time. Schemas, regexes and choices, whose grammars llguidance builds
# and checks for emptiness, keep jump-forward.
NO_FORCING = '%llguidance {"no_forcing": true}\n'


@dataclass(frozen=True)
class Constraint:
    """One constraint as text (a schema as JSON, keys in the order given, which is the order the output writes
    them; choices as a JSON list): the key compiled grammars are cached by."""

    kind: Kind
    spec: str

    @classmethod
    def of(cls, kind: Kind, value: object) -> Constraint:
        """The constraint `kind` with `value` as SamplingParams took it; ParameterError (param `kind`) when the
        value has the wrong shape. Whether a schema or grammar compiles is the compiler's to say."""
        if kind == "json_schema":
            return cls(kind, _schema_text(value))
        if kind == "json_object":
            if value is not True:
                raise ParameterError(kind, f"json_object must be True or left out, got {value!r}")
            return cls(kind, "")
        if kind == "choice":
            return cls(kind, json.dumps(_choices(value)))
        if not isinstance(value, str) or not value:
            raise ParameterError(kind, f"{kind} must be a non-empty string, got {value!r}")
        return cls(kind, value)

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_LAYOUT)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            # Lark string literals take JSON's escapes, so any choice text is spelled exactly.
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.spec)))
        # A grammar in llama.cpp's GBNF (rules written `name ::= ...`) is translated to llguidance's Lark.
        try:
            lark = any_to_lark(self.spec)
        except GbnfToLarkError as e:  # not a ValueError, but as much the grammar's fault
            raise ValueError(str(e)) from None
        return LLMatcher.grammar_from_lark(NO_FORCING + lark)


def _schema_text(value: object) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ParameterError("json_schema", f"json_schema is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise ParameterError("json_schema", f"json_schema must be a JSON object, got {type(value).__name__}")
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ParameterError("json_schema", f"json_schema cannot be written as JSON: {e}") from None


def _choices(value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ParameterError("choice", f"choice must be a non-empty list of strings, got {value!r}")
    bad = next((c for c in value if not isinstance(c, str) or not c), None)
    if bad is not None:
        raise ParameterError("choice", f"each choice must be a non-empty string, got {bad!r}")
    return list(value)
