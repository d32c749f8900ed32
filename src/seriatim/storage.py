"""Where seriatim keeps what it makes once and reuses: assembled model files, converted weights and
compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """seriatim's cache: `$SERIATIM_CACHE`, else ~/.cache/seriatim/models. It holds the assembled model
    files, and the converted weights (`converted/`) and compiled kernels (`kernels/`)."""
    return Path(os.environ.get("SERIATIM_CACHE") or Path.home() / ".cache" / "seriatim" / "models").expanduser()
