"""KV cache blocks: allocation, sharing of identical prompt prefixes, reference counts, LRU reuse.

The cache is a pool of fixed-size blocks. A sequence owns a table of block
ids; position p lives in block table[p // block_size]. A block that is full
is registered under a key made of its tokens and its predecessor's key, so
a later sequence whose prompt starts with the same tokens can point at the
same blocks instead of recomputing them. When no sequence uses a registered
block it stays cached (least recently used first out) until its memory is
needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the previous block's key, this block's tokens)


@dataclass
class BlockTable:
    """One sequence's blocks, in position order."""

    blocks: list[int] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)  # keys of the leading full blocks registered so far


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    def record(self, queried: int, hit: int) -> None:
        """One admitted sequence: `queried` tokens looked up, `hit` of them found cached."""
        self.queried_tokens += queried
        self.hit_tokens += hit

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        # Unused and unregistered, as a stack: the most recently released block is reused first, so a busy
        # engine keeps cycling through the same, cache- and TLB-warm memory instead of walking the pool.
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.cached: dict[BlockKey, int] = {}  # registered full blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # registered, unused: LRU order
        self.stats = PrefixStats()

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reuse_prefix(self, table: BlockTable, tokens: list[int]) -> int:
        """Point an empty table at cached blocks matching the start of `tokens`; returns tokens covered.

        At least one token is left uncovered: its forward pass yields the logits to sample from.
        The caller records the lookup in `stats` once the sequence is admitted (a sequence waiting for
        memory looks up again at every step).
        """
        parent = 0
        for i in range((len(tokens) - 1) // self.block_size):
            key = (parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))
            block = self.cached.get(key)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.keys.append(key)
            parent = hash(key)
        return len(table.blocks) * self.block_size

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Make `table` hold `num_tokens` positions; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(table.blocks)
        if need > self.num_available:
            return False
        for _ in range(max(need, 0)):
            block = self.free.pop() if self.free else self._evict()
            self.ref_counts[block] = 1
            table.blocks.append(block)
        return True

    def register_full_blocks(self, table: BlockTable, tokens: list[int]) -> None:
        """Make the full blocks holding `tokens` (the sequence's cached tokens) reusable by others."""
        parent = hash(table.keys[-1]) if table.keys else 0
        for i in range(len(table.keys), len(tokens) // self.block_size):
            key = (parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))
            block = table.blocks[i]
            if key not in self.cached:  # an identical block may be registered already: keep that one
                self.cached[key] = block
                self.block_keys[block] = key
            table.keys.append(key)
            parent = hash(key)

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Drop positions from `num_tokens` on (rejected speculative tokens); no block is copied.

        The block that will receive the next token must not be shared: writing into it would
        change another sequence's cache (a speculation only rolls back its own new tokens).
        """
        keep_keys = num_tokens // self.block_size
        if num_tokens % self.block_size and self.ref_counts[table.blocks[keep_keys]] > 1:
            raise ValueError("cannot truncate into a block shared with another sequence")
        del table.keys[keep_keys:]
        for block in table.blocks[keep_keys:]:
            if self.ref_counts[block] == 1 and self.block_keys[block] is not None:
                self._unregister(block)  # its contents are about to be overwritten
        keep = self.blocks_for(num_tokens)
        for block in table.blocks[keep:]:
            self._release(block)
        del table.blocks[keep:]

    def free_table(self, table: BlockTable) -> None:
        for block in reversed(table.blocks):  # tail first: it is the least likely to be shared again
            self._release(block)
        table.blocks.clear()
        table.keys.clear()

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.block_keys[block] is None:
                self.free.append(block)
            else:
                self.evictable[block] = None

    def _evict(self) -> int:
        block, _ = self.evictable.popitem(last=False)
        self._unregister(block)
        return block

    def _unregister(self, block: int) -> None:
        key = self.block_keys[block]
        if key is not None and self.cached.get(key) == block:
            del self.cached[key]
        self.block_keys[block] = None
