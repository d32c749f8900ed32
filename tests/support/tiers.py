"""ISA tiers in tests: the ones with kernels of their own, and a skip for those above the machine's."""

from __future__ import annotations

import pytest

from seriatim.kernels import isa

KERNEL_TIERS = ["avx2", "avx512", "amx"]  # each has its own products, so each is measured


def skip_above_machine(name: str) -> None:
    """Skip, with the reason, a test of a tier this CPU lacks (SERIATIM_ISA can only lower the tier)."""
    if isa.Tier[name.upper()] > isa.machine_tier():
        pytest.skip(f"this CPU's ISA tier is {isa.machine_tier()}, below {name}")
