"""The errors seriatim raises for bad input. They are ValueErrors (what the Python API promises) that also
say which request parameter is wrong, so the server answers with `param` and `code` without reading the
message."""

from __future__ import annotations


class ParameterError(ValueError):
    """A request parameter is out of its range or of the wrong kind; `param` names it as the API spells it."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class PromptTooLong(ParameterError):
    """The prompt leaves no room for output in the model's context."""

    def __init__(self, message: str):
        super().__init__("prompt", message, "context_length_exceeded")
