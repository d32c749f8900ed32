"""Fuzzing the GGUF reader with atheris (libFuzzer for Python, coverage-guided).

Each input is written to a file and loaded as a user's model is (`weights.loader.load`: the file's layout,
metadata, config, tensor table and shapes, the weights dequantized, the tokenizer built and checked against
the vocabulary); it must load or raise ModelFileError. Any other exception, a timeout, or the process
growing past libFuzzer's -rss_limit_mb is a finding: libFuzzer saves the input under -artifact_prefix, and
tests/weights/test_gguf_fuzz.py replays every input saved in tests/weights/fuzz_regressions/.

libFuzzer reads the peak from getrusage, which Linux carries over from the process that started this one
(across fork and exec): started by a test run that has loaded real models, it would report their gigabytes.
There, set SERIATIM_FUZZ_PEAK_MB instead (with -rss_limit_mb=0): the process's own peak (VmHWM) is checked
after every input, and passing it is a finding like any exception.

    python tests/support/gguf_fuzz.py seeds DIR                  # write the seed corpus (tiny valid GGUF files)
    python tests/support/gguf_fuzz.py fuzz DIR [libFuzzer flags]  # e.g. -runs=1000000 -rss_limit_mb=2048

Run with tests/ on PYTHONPATH (scripts/fuzz does). Only seriatim's modules are instrumented for coverage.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

PEAK_MB = int(os.environ.get("SERIATIM_FUZZ_PEAK_MB", "0"))


def own_peak_mb() -> int:
    """This process's peak resident memory, its own (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load_bytes(data: bytes, scratch: Path) -> None:
    """Load `data`, written to the file `scratch` (removed after), as a GGUF model file (float32 weights: no
    packing, no kernels); returns if it loads or is refused with a ModelFileError."""
    from seriatim.errors import ModelFileError
    from seriatim.weights.loader import Precision, load

    scratch.write_bytes(data)
    try:
        with contextlib.suppress(ModelFileError):
            load(scratch, Precision(torch.float32, compact=False), None)
    finally:  # libFuzzer ends the process without running exit handlers
        scratch.unlink()
    if PEAK_MB and own_peak_mb() > PEAK_MB:
        raise MemoryError(f"loading this input took the process to {own_peak_mb()} MB (limit {PEAK_MB} MB)")


def _fuzz(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["seriatim"]):
        import seriatim.weights.loader  # noqa: F401 - imported here to be instrumented
    # On tmpfs where there is one: the file is rewritten at every execution.
    scratch = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()) / f"seriatim-fuzz-{os.getpid()}"
    atheris.Setup(argv, lambda data: load_bytes(data, scratch))
    atheris.Fuzz()


def main(argv: list[str]) -> None:
    if argv[1:2] == ["seeds"] and len(argv) == 3:
        from support.tiny_models import write_fuzz_seeds

        for path in write_fuzz_seeds(Path(argv[2])):
            print(path)
    elif argv[1:2] == ["fuzz"]:
        _fuzz([argv[0], *argv[2:]])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
