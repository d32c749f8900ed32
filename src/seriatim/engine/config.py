"""Every sizing decision of an engine, made in one place: the KV cache's capacity, a step's token budget,
how many sequences run together, and what a model with sliding-window layers allows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..hardware import available_memory
from ..model.config import ModelConfig
from ..model.paged_kv import ROLLBACK, PagedKVCache
from .speculation import Speculation

KV_MEMORY_CAP = 4 << 30  # the default KV budget: a quarter of free memory, at most this


@dataclass(frozen=True)
class EngineConfig:
    max_step_tokens: int = 512  # tokens in one forward pass
    max_running: int = 64  # sequences decoding together
    kv_capacity_tokens: int = 1 << 20  # KV cache positions in the pool, all sequences together
    block_size: int = 16
    prefix_caching: bool = True  # reuse the KV blocks of identical prompt prefixes
    # Batch invariance at any precision: every sequence gets its own forward pass and the same
    # chunking as if it ran alone (no shared budget, no cached prefixes computed elsewhere).
    deterministic: bool = False
    # Fast mode with seriatim's kernels: a row's results do not depend on its batch, chunking or cached
    # prefix (runner.py), at some cost to long chunks; False takes the fastest product for each pass.
    batch_invariant: bool = True
    max_rollback: int | None = None  # most positions `Scheduler.truncate` may take back (None: any)
    speculation: Speculation | None = None  # draft tokens verified several per pass (speculation.py)

    def __post_init__(self) -> None:
        for name in ("max_step_tokens", "max_running", "kv_capacity_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    @classmethod
    def resolve(cls, model: ModelConfig, device: torch.device, dtype: torch.dtype, *,
                kv_cache_memory: int | None = None, max_step_tokens: int | None = None, max_running: int = 64,
                prefix_caching: bool = True, deterministic: bool = False, batch_invariant: bool = True,
                speculation: Speculation | None = None) -> EngineConfig:
        """The configuration for `model` on `device` with KV entries of `dtype`; None picks the default."""
        if kv_cache_memory is None:  # a quarter of the free RAM (GPU memory on CUDA)
            kv_cache_memory = min(available_memory(device.type) // 4, KV_MEMORY_CAP)
        if max_step_tokens is None:
            # A CPU's prefill is bound by arithmetic: beyond ~512 tokens a step only makes every stream wait
            # longer. A GPU's is bound by launches: 64 prompts of 64 tokens in one step instead of eight.
            max_step_tokens = 4096 if device.type == "cuda" else 512
        config = cls(max_step_tokens, max_running, _kv_capacity(model, dtype, kv_cache_memory, max_running),
                     prefix_caching=prefix_caching, deterministic=deterministic, batch_invariant=batch_invariant,
                     speculation=speculation)
        if PagedKVCache.ring_bytes(model, dtype, 1):  # ring contents are per sequence: nothing to share
            config = dataclasses.replace(config, prefix_caching=False, max_rollback=ROLLBACK)
        if speculation is not None and config.max_rollback is not None and speculation.k > config.max_rollback:
            raise ValueError(f"speculative k of {speculation.k} exceeds the {config.max_rollback} positions this "
                             "model's sliding-window layers can roll back")
        return config


def _kv_capacity(model: ModelConfig, dtype: torch.dtype, memory: int, max_running: int) -> int:
    """Cache positions `memory` bytes hold, after the sliding-window layers' rings."""
    rings = PagedKVCache.ring_bytes(model, dtype, max_running)
    per_token = PagedKVCache.bytes_per_token(model, dtype)
    block = EngineConfig.block_size * per_token
    if memory < rings + block:
        rings_part = f" plus {rings} for the sliding-window layers of {max_running} running sequences" if rings else ""
        raise ValueError(f"kv_cache_memory of {memory} bytes is too small: this model needs at least "
                         f"{rings + block} (one block of {EngineConfig.block_size} positions, {block} bytes"
                         f"{rings_part})")
    return (memory - rings) // per_token
