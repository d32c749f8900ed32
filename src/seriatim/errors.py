"""The errors seriatim raises for bad input. They are ValueErrors (what the Python API promises). A request's
errors say which parameter is wrong, so the server answers with `param` and `code` without reading the
message; a model file's errors say which file, and what in it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


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


class ModelFileError(ValueError):
    """A model file (GGUF, safetensors, config.json, tokenizer files) is malformed, inconsistent or of an
    unsupported kind. `path` is the file, where the code that found the problem knows it (see `in_file`)."""

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None):
        super().__init__(problem)
        self.problem = problem
        self.path = path

    def __str__(self) -> str:
        return self.problem if self.path is None else f"{os.fspath(self.path)}: {self.problem}"


@contextmanager
def in_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Name `path` in the ModelFileErrors raised inside, by readers of values that do not know their file."""
    try:
        yield
    except ModelFileError as e:
        if e.path is None:
            e.path = path
        raise
