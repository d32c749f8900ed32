"""Which sequences run in the next step, and how many of their tokens.

Decodes go first (one token each) so streams keep flowing; the rest of the
step's token budget goes to prompts, in chunks, so a long prompt never
stalls the others for more than one budget's worth of compute (chunked
prefill). KV blocks are taken as tokens arrive; when the pool runs dry the
most recently admitted sequence is preempted: its blocks are freed and it
waits at the head of the queue to be recomputed, keeping what it generated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence


@dataclass
class Chunk:
    """`length` of `seq`'s uncached tokens go into this step."""

    seq: Sequence
    length: int


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.max_length) > self.blocks.num_blocks:
            raise ValueError(
                f"request needs {seq.max_length} KV cache positions but the cache holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}; lower max_tokens or the prompt, "
                "or give the KV cache more memory"
            )
        self.waiting.append(seq)

    def schedule(self) -> list[Chunk]:
        budget = self.config.max_step_tokens
        chunks = []
        # Decodes first, then prompts already part-way through.
        for seq in sorted(self.running, key=lambda s: s.length - s.num_cached > 1):
            if seq not in self.running:
                continue  # preempted to make room for another
            if seq.fed_length - seq.num_cached > budget:
                seq.draft = []  # drafts are verified in one pass or not at all
            n = min(seq.fed_length - seq.num_cached, budget)
            if n and self._grow(seq, n, {c.seq.request_id for c in chunks}):
                chunks.append(Chunk(seq, n))
                budget -= 0 if self.config.deterministic else n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            n = self._admit(self.waiting[0], budget)
            if not n:
                break  # first come, first served: wait for memory rather than let others overtake
            chunks.append(Chunk(self.waiting.popleft(), n))
            budget -= 0 if self.config.deterministic else n
        return chunks

    def _grow(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Blocks for `n` more tokens of a running sequence, preempting the latest arrivals not yet
        scheduled in this step (or `seq` itself, last) if the pool is dry."""
        while not self.blocks.grow(seq.block_table, seq.num_cached + n):
            victims = [s for s in self.running if s is not seq and s.request_id not in scheduled]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Start `seq` (reusing a cached prefix) if the pool can hold all its tokens; tokens to run now."""
        tokens = seq.all_tokens()
        reuse = self.config.prefix_caching and not self.config.deterministic
        seq.num_cached = self.blocks.reuse_prefix(seq.block_table, tokens) if reuse else 0
        n = min(len(tokens) - seq.num_cached, budget)
        fits = self.blocks.blocks_for(len(tokens)) - len(seq.block_table.blocks) <= self.blocks.num_available
        if not fits or not self.blocks.grow(seq.block_table, seq.num_cached + n):
            self.blocks.free_table(seq.block_table)
            seq.num_cached = 0
            return 0
        self.running.append(seq)
        if reuse:
            self.blocks.stats.record(len(tokens), seq.num_cached)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft = []
        self.blocks.free_table(seq.block_table)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def computed(self, seq: Sequence, n: int) -> None:
        """`n` more tokens of `seq` are now cached: make its full blocks shareable."""
        seq.num_cached += n
        self.blocks.register_full_blocks(seq.block_table, seq.all_tokens()[: seq.num_cached])

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Forget `seq`'s cached positions from `num_tokens` on (e.g. rejected speculative tokens);
        the tokens after it are fed again, several in one step, without copying any block."""
        limit = self.config.max_rollback
        if limit is not None and seq.num_cached - num_tokens > limit:
            raise ValueError(f"cannot roll back {seq.num_cached - num_tokens} positions (at most {limit} here: "
                             "sliding-window layers keep only that many beyond their window)")
        self.blocks.truncate(seq.block_table, num_tokens)
        seq.num_cached = min(seq.num_cached, num_tokens)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence, wherever it is, and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_table(seq.block_table)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
