"""Which sequences run in the next step, and how many of their tokens.

Decodes go first (one token each) so streams keep flowing; the rest of the
step's token budget goes to prompts, in chunks, so a long prompt never
stalls the others for more than one budget's worth of compute (chunked
prefill). A waiting request is admitted only when its whole KV cache fits in
the pool, so a running sequence never runs out of memory mid-generation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_step_tokens: int = 512  # tokens in one forward pass
    max_running: int = 64  # sequences decoding together
    kv_capacity_tokens: int = 1 << 20  # KV cache positions the pool may hold, all sequences together

    def __post_init__(self) -> None:
        for name in ("max_step_tokens", "max_running", "kv_capacity_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Chunk:
    """`length` of `seq`'s uncached tokens go into this step."""

    seq: Sequence
    length: int

    @property
    def completes(self) -> bool:
        """True when the chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_cached + self.length == self.seq.length


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocate: Callable[[Sequence], None], release: Callable[[Sequence], None]):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_used_tokens = 0
        self._allocate, self._release = allocate, release

    def add(self, seq: Sequence) -> None:
        if seq.max_length > self.config.kv_capacity_tokens:
            raise ValueError(
                f"request needs {seq.max_length} KV cache positions but the cache holds "
                f"{self.config.kv_capacity_tokens}; lower max_tokens or the prompt, or raise the KV cache memory"
            )
        self.waiting.append(seq)

    def schedule(self) -> list[Chunk]:
        budget = self.config.max_step_tokens
        chunks = []
        # Decodes first, then prompts already part-way through, then newcomers.
        for seq in sorted(self.running, key=lambda s: len(s.pending_tokens()) > 1):
            n = min(len(seq.pending_tokens()), budget)
            if n:
                chunks.append(Chunk(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if self.kv_used_tokens + seq.max_length > self.config.kv_capacity_tokens:
                break  # first come, first served: wait for memory rather than let others overtake
            self.waiting.popleft()
            self._allocate(seq)
            self.kv_used_tokens += seq.max_length
            self.running.append(seq)
            n = min(len(seq.pending_tokens()), budget)
            chunks.append(Chunk(seq, n))
            budget -= n
        return chunks

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence, wherever it is, and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv_used_tokens -= seq.max_length
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
