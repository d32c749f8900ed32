"""The instruction-set tier seriatim's kernels run at: the best the CPU offers, or a lower one named by
`SERIATIM_ISA` (amx, avx512, avx2 or none), so that every tier below the machine's can run, and be tested,
on any machine. A tier above the machine's is never taken.

A new tier (ARM's NEON/SVE, say) is a member here with the CPU flags it needs, a library of kernels compiled
for it (library.py), and the products that `quant.Product` may pick there.
"""

from __future__ import annotations

import functools
import logging
import os
from enum import IntEnum

from ..hardware import cpu_flags, cpu_model

log = logging.getLogger(__name__)


class Tier(IntEnum):
    NONE = 0  # PyTorch's tensor ops only
    AVX2 = 1  # AVX2, FMA and F16C: seriatim's AVX2 kernels (csrc/avx2)
    AVX512 = 2  # AVX-512 F/BW/VL/DQ with BF16, VBMI and VNNI: seriatim's vector kernels
    AMX = 3  # the above and AMX tiles (BF16, INT8) that Linux grants: the AMX kernels too

    def __str__(self) -> str:
        return self.name.lower()


# What each tier needs beyond the one below it, as /proc/cpuinfo names the flags.
_FLAGS = {
    Tier.AVX2: {"avx2", "fma", "f16c"},
    Tier.AVX512: {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512vbmi", "avx512_vnni"},
    Tier.AMX: {"amx_tile", "amx_bf16", "amx_int8"},
}


def _amx_granted() -> bool:
    """Whether Linux lets this process use the AMX tile state (asked through PyTorch, arch_prctl)."""
    import torch

    init = getattr(torch._C._cpu, "_init_amx", None)
    return init is not None and bool(init())


@functools.cache
def machine_tier() -> Tier:
    """The highest tier this CPU (and, for AMX, Linux) supports."""
    flags, best = cpu_flags(), Tier.NONE
    for tier in (Tier.AVX2, Tier.AVX512, Tier.AMX):
        if not _FLAGS[tier] <= flags or (tier is Tier.AMX and not _amx_granted()):
            break
        best = tier
    return best


def requested_tier() -> Tier | None:
    """The tier `SERIATIM_ISA` names, if set; ValueError for a name that is no tier."""
    name = os.environ.get("SERIATIM_ISA", "").strip().lower()
    if not name:
        return None
    try:
        return Tier[name.upper()]
    except KeyError:
        raise ValueError(f"SERIATIM_ISA={name!r} is no ISA tier; use one of: "
                         f"{', '.join(str(t) for t in reversed(Tier))}") from None


@functools.cache
def tier() -> Tier:
    """The tier in use: the machine's, lowered to `SERIATIM_ISA`'s where that names a lower one."""
    machine, requested = machine_tier(), requested_tier()
    if requested is None or requested >= machine:
        if requested is not None and requested > machine:
            log.warning("SERIATIM_ISA=%s is above this CPU's tier (%s); using %s", requested, machine, machine)
        return machine
    return requested


def describe() -> str:
    """The CPU model and the tier in use, for benchmarks and start-up logs."""
    machine = machine_tier()
    lowered = f", lowered from {machine} by SERIATIM_ISA" if tier() < machine else ""
    return f"{cpu_model()}, ISA tier {tier()}{lowered}"
