"""seriatim's own CPU kernels (csrc/), compiled once per machine and cached.

- expand.cpp: packed int4 weights expanded to dense bfloat16 in one AVX-512 pass (long chunks).
- fused.cpp: RMSNorm, rotary embedding and silu(gate) * up as one op each for bfloat16 activations.
- gemv.cpp: int4 and int8 weights times a few activation rows (decode steps' vector products).
- amx_mm.cpp: int4 and int8 weights times a few to a hundred activation rows on AMX tiles (batched decode).
- decode_attention.cpp: one query per sequence over its cached keys and values, read in place.
- decode_layer.cpp: a decoding pass's Llama-family decoder layers in one call (DecodeStack, fused_decode.py).
- prefill_attention.cpp: causal attention of prompt chunks on AMX tiles (flash-style, online softmax).
- argmax.cpp: row-wise argmax of float32 logits (greedy picks), torch.argmax's indices.
- bitmask.cpp: grammar masks (one bit per token) applied to float32 logits, -inf where a bit is clear.

The first use compiles them (about 30 s, with a notice) into `<cache>/kernels/<key>`, the key
being a hash of the sources, the flags and the PyTorch version; later processes load the built library
directly. Where they cannot be had (an ISA tier below avx512, by the CPU or by `SERIATIM_ISA`, see isa.py;
no compiler), `ops()` returns None and the callers use tensor ops instead: slower, and the
same numbers up to bfloat16 rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

from ..storage import cache_dir
from . import isa

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.cpp"))
NAME = "seriatim_kernels"
# AMX code is compiled in everywhere but runs only where `amx()` allows it.
# -fopenmp: at::parallel_for is a header template, and without it the kernels run on one thread.
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vbmi",
         "-mavx512vnni", "-mfma", "-mamx-tile", "-mamx-bf16", "-mamx-int8"]


def _cpu_supports() -> bool:
    """Whether the tier in use runs these kernels (all of them need AVX-512; see isa.py)."""
    return isa.tier() >= isa.Tier.AVX512


def _build_dir() -> Path:
    code = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.[ch]*")))  # sources and the shared header
    key = hashlib.sha256(code + " ".join(FLAGS).encode() + torch.__version__.encode())
    return cache_dir() / "kernels" / key.hexdigest()[:16]


def _build(folder: Path) -> None:
    """Compile with torch's extension builder (ninja, the torch headers, the right ABI flags)."""
    from torch.utils import cpp_extension

    # ninja comes with the package's dependencies, into the environment's bin folder, which need not be on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    folder.mkdir(parents=True, exist_ok=True)
    print("seriatim: compiling its CPU kernels (once per machine, about 30 s)...", file=sys.stderr, flush=True)
    cpp_extension.load(NAME, [str(p) for p in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                       build_directory=str(folder), is_python_module=False)


def amx() -> bool:
    """Whether the AMX kernels (amx_mm.cpp, prefill_attention.cpp) may run: the tier in use is AMX (the CPU
    has tiles, BF16 and INT8 products, Linux grants the tile state, and SERIATIM_ISA does not forbid it)."""
    return isa.tier() is isa.Tier.AMX


@functools.cache
def ops() -> object | None:
    """`torch.ops.seriatim` (int4_dequantize_t, rms_norm, rotary, silu_mul, int4_gemv, int8_gemv,
    int4_mm_amx, int8_mm_amx, decode_attention, prefill_attention, argmax_rows, apply_bitmask; and the class
    torch.classes.seriatim.DecodeStack) where the tier in use runs them, else None.
    The AMX ones (and DecodeStack given AMX products) may run only where `amx()` says so."""
    return _library() if _cpu_supports() else None


@functools.cache
def _library() -> object | None:
    """The kernels, loaded into this process once (built first if this machine has no build of these
    sources); None where they cannot be had."""
    if _registered():  # loaded already, from another cache folder say: a second load would register twice
        return torch.ops.seriatim
    folder = _build_dir()
    library = folder / f"{NAME}.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            _build(folder)
    except Exception as e:  # noqa: BLE001 - any build or load failure leaves PyTorch's kernels in charge
        log.warning("seriatim's CPU kernels are unavailable (%s); using tensor ops (slower)", e)
        return None
    return torch.ops.seriatim


def _registered() -> bool:
    """Whether this process has the kernels' ops registered."""
    try:
        torch.ops.seriatim.argmax_rows  # noqa: B018 - the lookup is the test
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
