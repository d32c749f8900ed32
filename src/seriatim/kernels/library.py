"""seriatim's own CPU kernels (csrc/), compiled once per machine and ISA tier, and cached.

Each tier has its library, built from its own sources with its own flags (isa.py picks the tier):

- avx512 and amx (csrc/*.cpp): AVX-512 with BF16, VNNI and VBMI; the AMX ones run only where `amx()` says.
  - expand.cpp: packed int4 weights expanded to dense bfloat16 in one AVX-512 pass (long chunks).
  - fused.cpp: RMSNorm, rotary embedding and silu(gate) * up as one op each for bfloat16 activations.
  - gemv.cpp: int4 and int8 weights times a few activation rows (decode steps' vector products).
  - amx_mm.cpp: int4 and int8 weights times a few to a hundred activation rows on AMX tiles (batched decode).
  - decode_attention.cpp: one query per sequence over its cached keys and values, read in place.
  - prefill_attention.cpp: causal attention of prompt chunks on AMX tiles (flash-style, online softmax).
  - argmax.cpp: row-wise argmax of float32 logits (greedy picks), torch.argmax's indices.
  - bitmask.cpp: grammar masks (one bit per token) applied to float32 logits, -inf where a bit is clear.
- avx2 (csrc/avx2/*.cpp): the same ops but the AMX ones, for AVX2 and FMA: int4 products on int8
  activations (VPMADDUBSW), int8 products as exact integer totals, float32 arithmetic on bfloat16 data.
- both: decode_layer.cpp, a decoding pass's Llama-family decoder layers in one call (DecodeStack,
  fused_decode.py), which calls the tier's ops.

Each library registers its ops in its own namespace (`torch.ops.seriatim` for avx512, ...seriatim_avx2),
so that two tiers can be loaded in one process (the tests run every tier the machine has). The first use
compiles a tier's library (about 30 s, with a notice) into `<cache>/kernels/<key>`, the key being a hash
of the sources, the flags and the PyTorch version; later processes load it directly. A build killed half-way
(kill -9) leaves nothing that stops the next process from building it again. Where there is none
for the tier in use (tier none; no compiler), `ops()` returns None and the callers use tensor ops instead:
slower, and the same numbers up to bfloat16 rounding.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage import cache_dir
from . import isa

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# -fopenmp: at::parallel_for is a header template, and without it the kernels run on one thread.
COMMON_FLAGS = ["-O3", "-fopenmp"]
FINISHED = "finished"  # written in a build folder once its library is whole


@dataclass(frozen=True)
class Build:
    """One tier's library: its sources, compiler flags, op namespace, and the int4 layout its kernels read
    (quant.pack_int4)."""

    namespace: str
    sources: tuple[Path, ...]
    flags: tuple[str, ...]
    int4_layout: str = "columns"

    @property
    def name(self) -> str:
        return f"{self.namespace}_kernels"


# AMX code is compiled into the AVX-512 library but runs only where `amx()` allows it.
AVX512 = Build("seriatim", tuple(sorted(CSRC.glob("*.cpp"))),
               ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vbmi",
                "-mavx512vnni", "-mfma", "-mamx-tile", "-mamx-bf16", "-mamx-int8"))
AVX2 = Build("seriatim_avx2", (*sorted((CSRC / "avx2").glob("*.cpp")), CSRC / "decode_layer.cpp"),
             ("-mavx2", "-mfma", "-mf16c", "-DSERIATIM_OPS=seriatim_avx2"), int4_layout="quads")


def build_for(tier: isa.Tier) -> Build | None:
    """The library serving `tier`, if it has one."""
    return AVX512 if tier >= isa.Tier.AVX512 else AVX2 if tier is isa.Tier.AVX2 else None


def _build_dir(build: Build) -> Path:
    headers = sorted(CSRC.glob("*.h")) + sorted((CSRC / "avx2").glob("*.h"))
    code = b"".join(p.read_bytes() for p in (*build.sources, *headers))
    key = hashlib.sha256(code + " ".join((*COMMON_FLAGS, *build.flags)).encode() + torch.__version__.encode())
    return cache_dir() / "kernels" / f"{build.namespace}-{key.hexdigest()[:16]}"


def _compile(build: Build, folder: Path) -> None:
    """Compile with torch's extension builder (ninja, the torch headers, the right ABI flags)."""
    from torch.utils import cpp_extension

    # ninja comes with the package's dependencies, into the environment's bin folder, which need not be on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    print(f"seriatim: compiling its CPU kernels for {build.namespace} (once per machine, about 30 s)...",
          file=sys.stderr, flush=True)
    cpp_extension.load(build.name, [str(p) for p in build.sources], extra_cflags=[*COMMON_FLAGS, *build.flags],
                       extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False)


def _load_or_build(build: Build, folder: Path) -> None:
    """Load the library built in `folder`, building it there first unless a build finished: only such a
    library is loaded, since a build killed half-way may leave a truncated one, which may crash whoever maps it."""
    if not (folder / FINISHED).exists():
        _build(build, folder)
    torch.ops.load_library(str(folder / f"{build.name}.so"))  # a no-op where the build just loaded it


def _build(build: Build, folder: Path) -> None:
    """Build the library in `folder`, one process at a time. The hold is an flock, which the kernel drops when
    its process dies, however it dies. PyTorch's own lock file (`lock`), which a build killed half-way leaves
    behind and which would make every later build wait for it forever, is stale once the hold is ours."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "seriatim.lock", "w") as hold:
        fcntl.flock(hold, fcntl.LOCK_EX)  # released when the file closes, or its process ends
        if (folder / FINISHED).exists():  # another process built it while this one waited
            return
        (folder / "lock").unlink(missing_ok=True)
        _compile(build, folder)
        (folder / FINISHED).touch()


def amx() -> bool:
    """Whether the AMX kernels (amx_mm.cpp, prefill_attention.cpp) may run: the tier in use is AMX (the CPU
    has tiles, BF16 and INT8 products, Linux grants the tile state, and SERIATIM_ISA does not forbid it)."""
    return isa.tier() is isa.Tier.AMX


def ops() -> object | None:
    """The ops of the tier in use (rms_norm, rotary, silu_mul, int4_gemv, int8_gemv, int4_dequantize_t,
    decode_attention, argmax_rows, apply_bitmask; at avx512 and amx also int4_mm_amx, int8_mm_amx and
    prefill_attention, which may run only where `amx()` says so), or None where it has none."""
    build = build_for(isa.tier())
    return _library(build) if build is not None else None


def bf16_matmul() -> bool:
    """Whether the tier in use multiplies bfloat16 in hardware (AVX-512 BF16, AMX). Where it does not
    (avx2, none), PyTorch's bfloat16 matmuls run ~75x slower than its float32 ones (1.2 against 90 GFLOP/s
    on a Zen 3 core pair), so no dense bfloat16 product may run there."""
    return isa.tier() >= isa.Tier.AVX512


def int4_layout() -> str:
    """The int4 layout the tier in use's kernels read; "columns" (PyTorch's on AVX-512) where it has none."""
    build = build_for(isa.tier())
    return build.int4_layout if build is not None else "columns"


def decode_stack() -> type:
    """decode_layer.cpp's DecodeStack class of the tier in use (whose `ops()` are not None)."""
    return getattr(torch.classes, build_for(isa.tier()).namespace).DecodeStack


@functools.cache
def _library(build: Build) -> object | None:
    """A tier's ops, loaded into this process once (built first if this machine has no build of these
    sources); None where they cannot be had."""
    namespace = getattr(torch.ops, build.namespace)
    if _registered(namespace):  # loaded already, from another cache folder say: a second load would register twice
        return namespace
    try:
        _load_or_build(build, folder=_build_dir(build))
    except Exception as e:  # noqa: BLE001 - any build or load failure leaves PyTorch's kernels in charge
        log.warning("seriatim's CPU kernels are unavailable (%s); using tensor ops (slower)", e)
        return None
    return namespace


def _registered(namespace: object) -> bool:
    """Whether this process has a library's ops registered."""
    try:
        namespace.argmax_rows  # noqa: B018 - the lookup is the test
    except (AttributeError, RuntimeError):
        return False
    return True


def for_tensor(x: torch.Tensor) -> object | None:
    """The kernels where they serve activations like x: bfloat16 on the CPU. Else None: the float32
    reference and CUDA run tensor ops, which the fused kernels equal up to bfloat16 rounding."""
    return ops() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None


def amx_for_tensor(x: torch.Tensor) -> object | None:
    """The kernels where their AMX ones may serve activations like x (bfloat16 on a CPU with AMX); else None."""
    ops = for_tensor(x)
    return ops if ops is not None and amx() else None
