"""Reading a GGUF file's key/value metadata as plain Python values."""

from __future__ import annotations

import os
from typing import Any

from gguf import GGUFReader


def read_gguf_metadata(source: str | os.PathLike[str] | GGUFReader) -> dict[str, Any]:
    """Every metadata field of a GGUF file, keyed by its GGUF name.

    Strings are decoded, arrays become lists and scalars become int/float/bool. An open
    `GGUFReader` is accepted so that a loader that also wants the tensors parses the file once.
    """
    reader = source if isinstance(source, GGUFReader) else GGUFReader(source)
    # `contents()` already yields Python values (numpy scalars go through `tolist()`).
    return {name: field.contents() for name, field in reader.fields.items()}
