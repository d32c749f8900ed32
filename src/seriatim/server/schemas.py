"""Request bodies of the OpenAI-compatible API. Each declaration is both the check and its description in
/openapi.json, so the two cannot disagree: bounds are pydantic's; a field that takes several forms is a oneOf,
the form picked by the value's JSON type; a rule between fields (`Rule`) is written as JSON Schema, documented
as such and checked by `matches`. Bounds that depend on the running server (its vocabulary, its --max-n) are
named here (`server_bound`) and written in by openapi.py. Unknown fields are refused, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..sampling import MAX_LOGPROBS

SERVER_BOUNDS = "x-seriatim-server-bounds"  # {JSON Schema keyword: the server limit that is its value}


def server_bound(**bounds: str) -> Any:
    """JSON Schema keywords whose values the running server decides, e.g. `maximum="max_token_id"`
    (openapi.py); the checks are the server's own (the engine's vocabulary, check_n)."""
    return Field(json_schema_extra={SERVER_BOUNDS: bounds})


_JSON_TYPES = {str: "string", list: "array", dict: "object", bool: "boolean", int: "integer", float: "number",
               type(None): "null"}


def json_type(value: object) -> str | None:
    """The JSON type of a value as parsed, or as validated (a model is an object: pydantic asks again when it
    writes a union's value out)."""
    return "object" if isinstance(value, BaseModel) else _JSON_TYPES.get(type(value))


def one_of(forms: dict[str, Any], message: str, form_of: Callable[[Any], str | None] = json_type,
           param: str | None = None) -> Any:
    """A field that takes one of `forms` ({tag: type}), documented as oneOf. The form is picked by
    `form_of(value)` (by default the value's JSON type), so an error speaks of that form alone; a value of
    no form is answered "<field> <message>" (`param`: the param named when that is the whole body)."""
    members = tuple(Annotated[form, Tag(tag)] for tag, form in forms.items())
    return Annotated[Union[members], Discriminator(form_of, custom_error_type="form",  # noqa: UP007
                                                   custom_error_message=message,
                                                   custom_error_context={"param": param} if param else None)]


def _unicode(text: str) -> str:
    # JSON's \ud800 escapes decode to lone surrogates, which are not Unicode text and no tokenizer takes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("unicode", "contains a lone UTF-16 surrogate ({char}), which is not valid Unicode",
                                  {"char": repr(text[e.start])}) from None
    return text


def _whole(value: object) -> object:
    return int(value) if type(value) is float and value.is_integer() else value


def integer(**bounds: int) -> Any:
    """A JSON integer within `bounds` (pydantic's ge, le): never a boolean nor text, but 2.0 is 2, as JSON
    Schema counts it (and clients that write every number as a float)."""
    return Annotated[StrictInt, Field(**bounds), BeforeValidator(_whole)]


Number = StrictFloat  # any JSON number (ints too), never a boolean
Text = Annotated[StrictStr, AfterValidator(_unicode)]  # text that reaches the tokenizer
NonEmptyText = Annotated[Text, Field(min_length=1)]
Integer = integer()
NonNegative = integer(ge=0)
Positive = integer(ge=1)
Logprobs = integer(ge=0, le=MAX_LOGPROBS)  # alternatives per token
TopK = integer(ge=-1)  # 0, and vLLM's -1, turn it off
BestOf = integer(ge=1, le=1)  # one candidate per choice: more are not supported
TokenId = Annotated[NonNegative, server_bound(maximum="max_token_id")]
Regex = Annotated[NonEmptyText, Field(json_schema_extra={"format": "regex"})]
# A grammar in llguidance's Lark syntax or llama.cpp's GBNF: a format of our own naming, which validators
# that do not know it ignore and generators may be taught (tests/support/schemathesis_hooks.py).
Grammar = Annotated[NonEmptyText, Field(json_schema_extra={"format": "grammar"})]
Choices = Annotated[list[NonEmptyText], Field(min_length=1)]
# JSON text of an object, which the server parses: a tool call's arguments, as OpenAI writes them.
JsonObjectText = Annotated[StrictStr, Field(pattern=r"^[ \t\n\r]*\{",
                                            json_schema_extra={"contentMediaType": "application/json"}),
                           AfterValidator(_unicode)]
# A JSON schema. vLLM's clients may send its JSON text instead, which the server parses (grammar/constraint.py);
# the schema leaves that form to its description: no JSON Schema says which text parses, so requests made from
# one would carry text that does not.
JsonSchema = Annotated[dict | Text, WithJsonSchema({"type": "object",
                                                    "description": "A JSON schema (or, from vLLM's clients, its "
                                                                   "JSON text)"})]
# Each stop string is checked against every new token's text, on the engine thread: a bounded number, of a
# bounded length (OpenAI takes 4; vLLM's clients may send more).
MAX_STOPS, MAX_STOP_CHARS = 64, 1000
StopText = Annotated[NonEmptyText, Field(max_length=MAX_STOP_CHARS)]
Stop = one_of({"string": StopText, "array": Annotated[list[StopText], Field(max_length=MAX_STOPS)]},
              "must be a string or a list of strings")


# ---- rules between fields --------------------------------------------------------------------------------


def matches(value: object, schema: dict) -> bool:
    """Whether a JSON value matches `schema`, in JSON Schema's sense, for the keywords rules use."""
    return all(_KEYWORDS[keyword](value, arg) for keyword, arg in schema.items())


def _same(a: object, b: object) -> bool:
    return json_type(a) == json_type(b) and a == b


_KEYWORDS: dict[str, Callable[[Any, Any], bool]] = {
    "const": _same,
    "enum": lambda v, options: any(_same(v, o) for o in options),
    "not": lambda v, s: not matches(v, s),
    "anyOf": lambda v, schemas: any(matches(v, s) for s in schemas),
    "type": lambda v, t: json_type(v) in ((t,) if isinstance(t, str) else t),
    "minLength": lambda v, n: not isinstance(v, str) or len(v) >= n,
    "minItems": lambda v, n: not isinstance(v, list) or len(v) >= n,
    "items": lambda v, s: not isinstance(v, list) or all(matches(item, s) for item in v),
    "properties": lambda v, props: not isinstance(v, dict) or all(matches(v[k], s) for k, s in props.items() if k in v),
    "required": lambda v, names: not isinstance(v, dict) or all(k in v for k in names),
}


def given(field: str, schema: dict | None = None) -> dict:
    """JSON Schema of a body in which `field` is given and matches `schema` (by default: is not null; a
    `schema` must rule out null itself)."""
    return {"properties": {field: schema or {"not": {"type": "null"}}}, "required": [field]}


@dataclass(frozen=True)
class Rule:
    """A body that matches `when` must match `then` too; `message` answers one that does not, naming `param`."""

    param: str
    when: dict
    then: dict
    message: str

    def holds(self, body: dict) -> bool:
        return not matches(body, self.when) or matches(body, self.then)

    def schema(self) -> dict:
        return {"if": self.when, "then": self.then}


def exclusive(fields: dict[str, dict], message: Callable[[str, str], str]) -> tuple[Rule, ...]:
    """Rules that a body matches at most one of `fields` ({param: the body given it}); `message(a, b)` answers
    one that matches both a and b, naming b."""
    names = list(fields)
    return tuple(Rule(b, fields[b], {"not": fields[a]}, message(a, b))
                 for i, a in enumerate(names) for b in names[i + 1:])


def _document_rules(schema: dict, model: type[_Strict]) -> None:
    if model.rules:
        schema["allOf"] = [rule.schema() for rule in model.rules]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_document_rules)
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _follow_rules(self):
        if self.rules:
            body = self.model_dump(by_alias=True, exclude_unset=True)  # the fields as given, as JSON values
            broken = next((rule for rule in self.rules if not rule.holds(body)), None)
            if broken is not None:
                raise PydanticCustomError("rule", broken.message, {"param": broken.param})
        return self


# ---- the bodies ------------------------------------------------------------------------------------------


def _one_constraint(first: str, second: str) -> str:
    return f"one constraint per request, got {first} and {second}"


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None  # accepted for vLLM clients; ignored


class JsonSchemaFormat(_Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # None: any JSON
    strict: StrictBool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    rules = (Rule("json_schema", given("type", {"const": "json_schema"}), given("json_schema"),
                  "json_schema is required with type 'json_schema'"),
             Rule("json_schema", given("json_schema"), given("type", {"const": "json_schema"}),
                  "json_schema is only allowed with type 'json_schema'"))


_STRUCTURED = {**{kind: given(kind) for kind in ("json", "regex", "choice", "grammar")},
               "json_object": given("json_object", {"const": True})}


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra: one of these."""

    json_: JsonSchema | None = Field(default=None, alias="json")
    regex: Regex | None = None
    choice: Choices | None = None
    grammar: Grammar | None = None
    json_object: StrictBool | None = None

    rules = exclusive(_STRUCTURED, _one_constraint)


# The fields that each name a constraint on the output (server/constraints.py), as the body given one.
_CONSTRAINTS = {
    "response_format": given("response_format", given("type", {"enum": ["json_object", "json_schema"]})),
    "structured_outputs": given("structured_outputs", {"anyOf": list(_STRUCTURED.values())}),
    **{field: given(field) for field in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")},
}


def _sampling_rules(constraints: dict[str, dict]) -> tuple[Rule, ...]:
    """The rules of `_Sampling`'s fields, with `constraints` the fields that may name the output's constraint."""
    return (
        Rule("stream_options", given("stream_options"), given("stream", {"const": True}),
             "stream_options is only allowed when stream is true"),
        *exclusive(constraints, _one_constraint),
        # A constraint's grammar decides where the output ends.
        Rule("ignore_eos", given("ignore_eos", {"const": True}), {"not": {"anyOf": list(constraints.values())}},
             "ignore_eos cannot be combined with a constraint on the output"),
    )


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: StrictStr | None = None
    temperature: Annotated[Number, Field(ge=0)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[Positive, server_bound(maximum="max_n")] | None = None
    stop: Stop | None = None
    seed: Integer | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]],
                          server_bound(propertyNames="token_id_names")] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # Extras beyond OpenAI's (vLLM's names).
    top_k: TopK | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    ignore_eos: StrictBool | None = None
    speculative: StrictBool | None = None  # false: decode this request without speculation (serve --speculative)
    # Structured output (server/constraints.py): OpenAI's response_format, or vLLM's extras.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | None = None
    guided_regex: Regex | None = None
    guided_choice: Choices | None = None
    guided_grammar: Grammar | None = None


def _prompt_form(prompt: object) -> str | None:
    """A prompt's form: by its JSON type, and a list's by its first item's (a number: a token id, if whole)."""
    if not isinstance(prompt, list):
        return json_type(prompt)
    first = json_type(prompt[0]) if prompt else "string"
    return {"string": "strings", "integer": "tokens", "number": "tokens", "array": "token lists"}.get(first)


def _prompts(prompt: Any) -> Any:
    """A list of prompts, each making n choices: as many as the server takes (generation.check_n)."""
    return Annotated[list[prompt], Field(min_length=1), server_bound(maxItems="max_prompts")]


PromptTokens = Annotated[list[TokenId], Field(min_length=1), server_bound(maxItems="max_prompt_tokens")]
Prompt = one_of({"string": NonEmptyText, "strings": _prompts(NonEmptyText),
                 "tokens": PromptTokens, "token lists": _prompts(PromptTokens)},
                "must be a string, a list of strings, a list of token ids, or a list of token-id lists", _prompt_form)


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: NonNegative | None = None  # 0: none generated (with echo: the prompt alone)
    logprobs: Logprobs | None = None
    echo: StrictBool | None = False
    best_of: BestOf | None = None
    suffix: Annotated[StrictStr, Field(max_length=0)] | None = None  # not supported: only "" or null
    trace: StrictBool | None = None  # seriatim's extension for the playground (server/trace.py)

    rules = (
        *_sampling_rules(_CONSTRAINTS),
        # Each prompt makes n choices: several prompts make one each, and one prompt n (generation.check_n).
        Rule("n", given("prompt", {"type": "array", "minItems": 2, "not": {"items": {"type": "integer"}}}),
             {"properties": {"n": {"enum": [1, None]}}}, "n must be 1 when prompt is a list of several prompts"),
    )


class TextPart(_Strict):
    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _refuse_media(cls, part: object) -> object:
        # Before the fields: an image part is answered as one, not as a text part with the wrong fields.
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            media = kind.removeprefix("input_").removesuffix("_url")  # image_url: image, input_audio: audio
            raise PydanticCustomError("unsupported_content",
                                      "is a part of type {kind}, but {media} content is not supported",
                                      {"kind": repr(kind), "media": media})
        return part


class CalledFunction(_Strict):
    name: StrictStr
    arguments: JsonObjectText


class ToolCallItem(_Strict):
    id: Text
    type: Literal["function"] = "function"
    function: CalledFunction


Content = one_of({"string": Text, "array": list[TextPart]}, "must be a string or a list of text parts")


# An assistant's message that makes calls, which may leave out its content.
_CALLS = {"properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}},
          "required": ["role", "tool_calls"]}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None  # None only for an assistant's calls (OpenAI's tool-call form)
    name: StrictStr | None = None
    # An assistant's calls; only where the chat template takes tools (chat.chat_prompt_ids).
    tool_calls: Annotated[list[ToolCallItem], server_bound(maxItems="max_tools")] | None = None
    tool_call_id: Text | None = None  # the call a tool message answers

    rules = (Rule("content", {"not": _CALLS}, given("content"),
                  "a message needs content, unless it is an assistant's with tool_calls"),)


class FunctionDefinition(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; None: any object
    strict: StrictBool | None = None  # arguments are always held to the schema where a call is required


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = one_of({"string": Literal["none", "auto", "required"], "object": NamedToolChoice},
                    "must be 'none', 'auto', 'required' or a named function")
# A required or named call holds the reply to a grammar, as a constraint does (server/tools.py).
_TOOL_CALL = given("tool_choice", {"not": {"enum": [None, "none", "auto"]}})


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Logprobs | None = None
    tools: Annotated[list[Tool], server_bound(maxItems="max_tools")] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    rules = (
        Rule("tool_choice", _TOOL_CALL, given("tools", {"type": "array", "minItems": 1}), "tool_choice needs tools"),
        *_sampling_rules({"tool_choice": _TOOL_CALL, **_CONSTRAINTS}),
        Rule("top_logprobs", given("top_logprobs"), given("logprobs", {"const": True}),
             "top_logprobs needs logprobs to be true"),
    )


class TokenizePrompt(_Strict):
    model: StrictStr | None = None
    prompt: Text
    add_special_tokens: StrictBool = True


class TokenizeMessages(_Strict):
    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_special_tokens: StrictBool = True  # the chat template writes the special tokens: ignored


def _tokenize_form(body: object) -> str | None:
    if not isinstance(body, dict):
        return "prompt"  # answered as a body that is not an object
    forms = [form for form in ("prompt", "messages") if form in body]
    return forms[0] if len(forms) == 1 else None


TokenizeRequest = one_of({"prompt": TokenizePrompt, "messages": TokenizeMessages},
                         "must give exactly one of prompt or messages", _tokenize_form, param="prompt")


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: list[TokenId]
