"""seriatim: autoregressive text generation, one token at a time."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the lazy exports below resolve to, for type checkers and editors
    from .llm import LLM as LLM
    from .outputs import CompletionOutput as CompletionOutput
    from .outputs import Delta as Delta
    from .sampling import SamplingParams as SamplingParams

# Exported lazily (PEP 562): `from seriatim import LLM` works as ever, while the command line's
# `seriatim --help`, `models` or `pull` do not pay for importing PyTorch (~1 s) before they start.
_EXPORTS = {"LLM": ".llm", "SamplingParams": ".sampling", "CompletionOutput": ".outputs", "Delta": ".outputs"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seriatim' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def package_version() -> str:
    """The installed distribution's version ("0" when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("seriatim")
    except PackageNotFoundError:
        return "0"
