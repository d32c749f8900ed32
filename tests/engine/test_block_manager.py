"""Block manager: allocation, prefix sharing, reference counts, LRU eviction, truncation, no leaks."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from seriatim.engine.block_manager import BlockManager, BlockTable


def check_invariants(bm: BlockManager, tables: list[BlockTable]) -> None:
    refs = Counter(b for t in tables for b in t.blocks)
    assert [bm.ref_counts[b] for b in range(bm.num_blocks)] == [refs.get(b, 0) for b in range(bm.num_blocks)]
    free, evictable = set(bm.free), set(bm.evictable)
    assert len(free) == len(bm.free) and not free & evictable and not (free | evictable) & set(refs)
    assert len(free | evictable | set(refs)) == bm.num_blocks
    assert all(bm.block_keys[b] is not None for b in evictable)
    assert all(bm.block_keys[b] == k for k, b in bm.cached.items())


def test_identical_prefix_shares_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))  # two full blocks and a partial one
    first = BlockTable()
    assert bm.reuse_prefix(first, prompt) == 0
    assert bm.grow(first, len(prompt))
    bm.register_full_blocks(first, prompt)
    second = BlockTable()
    assert bm.reuse_prefix(second, prompt + [99]) == 8
    assert second.blocks == first.blocks[:2] and bm.ref_counts[first.blocks[0]] == 2
    check_invariants(bm, [first, second])


def test_whole_prompt_hit_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=4, block_size=4)
    prompt = list(range(8))
    t = BlockTable()
    bm.grow(t, 8)
    bm.register_full_blocks(t, prompt)
    again = BlockTable()
    assert bm.reuse_prefix(again, prompt) == 4


def test_finished_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = BlockTable()
    bm.grow(a, 2)
    bm.register_full_blocks(a, [1, 2])
    bm.free_table(a)
    assert bm.num_available == 2 and len(bm.evictable) == 1
    hit = BlockTable()
    assert bm.reuse_prefix(hit, [1, 2, 3]) == 2  # still cached after its owner finished
    bm.free_table(hit)
    big = BlockTable()
    assert bm.grow(big, 4)  # needs both blocks: the cached one is evicted
    assert not bm.cached
    assert not bm.grow(big, 6)  # pool exhausted: no change
    assert len(big.blocks) == 2
    check_invariants(bm, [big])


def test_truncate_frees_tail_without_copy():
    bm = BlockManager(num_blocks=4, block_size=2)
    t = BlockTable()
    bm.grow(t, 7)
    bm.register_full_blocks(t, list(range(7)))
    kept = t.blocks[:2]
    bm.truncate(t, 3)
    assert t.blocks == kept and len(t.keys) == 1 and bm.num_available == 2
    check_invariants(bm, [t])


def test_truncate_into_shared_block_is_refused():
    import pytest

    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = BlockTable(), BlockTable()
    bm.grow(a, 4)
    bm.register_full_blocks(a, [1, 2, 3, 4])
    bm.reuse_prefix(b, [1, 2, 3, 4, 5])
    bm.grow(b, 5)
    with pytest.raises(ValueError, match="shared"):
        bm.truncate(b, 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "grow", "free", "truncate"]), st.integers(0, 40),
                          st.integers(0, 3)), max_size=60))
def test_random_operations_keep_invariants_and_leak_nothing(ops):
    bm = BlockManager(num_blocks=12, block_size=4)
    tables: list[tuple[BlockTable, list[int]]] = []
    for op, n, pick in ops:
        if op == "new":
            tokens = [pick] * n + [n]  # few distinct prompts, so prefixes really are shared
            t = BlockTable()
            covered = bm.reuse_prefix(t, tokens)
            if bm.grow(t, len(tokens)):
                bm.register_full_blocks(t, tokens)
                tables.append((t, tokens))
            else:
                assert len(t.blocks) == covered // 4
                bm.free_table(t)
        elif tables:
            t, tokens = tables[pick % len(tables)]
            if op == "grow" and bm.grow(t, len(tokens) + n):
                tokens += [7] * n
                bm.register_full_blocks(t, tokens)
            elif op == "truncate":
                n = min(n, len(tokens))
                partial = t.blocks[n // 4] if n % 4 else None
                if partial is not None and bm.ref_counts[partial] > 1:
                    continue  # refused: see test_truncate_into_shared_block_is_refused
                del tokens[n:]
                bm.truncate(t, n)
            elif op == "free":
                bm.free_table(t)
                tables.remove((t, tokens))
        check_invariants(bm, [t for t, _ in tables])
    for t, _ in tables:
        bm.free_table(t)
    assert bm.num_available == bm.num_blocks and all(r == 0 for r in bm.ref_counts)
