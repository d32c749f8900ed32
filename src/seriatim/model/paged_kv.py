"""The engine's KV cache: one pool of blocks for all sequences, and the attention over it.

Global layers store [layers][kv_heads, num_blocks * block_size, head_dim]: a
position's "slot" is block * block_size + offset, so one sequence's keys are
gathered with a single index_select, or taken as a plain view when its blocks
happen to be consecutive (the common case for a lone request).

Sliding-window layers (Gemma 3) need only a sequence's last `window`
positions, so they do not use the pool: each running sequence gets a ring of
window + ROLLBACK positions per sliding layer, where position p lives in slot
p % size. Their memory is bounded by the window however long the sequence.
The rings' contents are not shareable, so models with sliding layers run
without prefix caching.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import library
from .attention import MaskKey, attend, flash_kernel, ring_store
from .config import ModelConfig

ROLLBACK = 16  # positions a ring keeps beyond its window, so rejected speculative tokens can be rolled back


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, max_sequences: int = 1):
        self.windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
        paged = [i for i, w in enumerate(self.windows) if w is None]
        sliding = [i for i, w in enumerate(self.windows) if w is not None]
        self.index = {layer: j for j, layer in enumerate(paged)} | {layer: j for j, layer in enumerate(sliding)}
        shape = (len(paged), cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # Rings are allocated for every possible running sequence; untouched pages cost no memory.
        ring = (max(w for w in self.windows if w) + ROLLBACK) if sliding else 0
        ring_shape = (max_sequences if sliding else 0, len(sliding), cfg.num_kv_heads, ring, cfg.head_dim)
        self.ring_k = torch.empty(ring_shape, dtype=dtype, device=device)
        self.ring_v = torch.empty(ring_shape, dtype=dtype, device=device)
        self.rings: dict[int, int] = {}  # request id -> its ring
        self.free_rings = list(range(ring_shape[0]))
        self.block_size = block_size
        self.device = device

    @property
    def has_rings(self) -> bool:
        return self.ring_k.shape[1] > 0

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Pool bytes per cached position (global layers only)."""
        paged = sum(cfg.layer_window(i) is None for i in range(cfg.num_layers))
        return 2 * paged * cfg.kv_size * dtype.itemsize

    @staticmethod
    def ring_bytes(cfg: ModelConfig, dtype: torch.dtype, max_sequences: int) -> int:
        """Bytes of the sliding layers' rings, for `max_sequences` running sequences."""
        windows = [w for w in (cfg.layer_window(i) for i in range(cfg.num_layers)) if w]
        if not windows:
            return 0
        return 2 * max_sequences * len(windows) * (max(windows) + ROLLBACK) * cfg.kv_size * dtype.itemsize

    def ring_of(self, request_id: int) -> int | None:
        """The ring of a running sequence (given on first use); None for a model without sliding layers."""
        if not self.has_rings:
            return None
        if request_id not in self.rings:
            self.rings[request_id] = self.free_rings.pop()
        return self.rings[request_id]

    def release_rings(self, running: set[int]) -> None:
        """Take back the rings of sequences no longer running (finished, aborted or preempted)."""
        for rid in [r for r in self.rings if r not in running]:
            self.free_rings.append(self.rings.pop(rid))

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor | slice:
        """Slots of positions [start, end): a slice when they are consecutive in storage."""
        bs = self.block_size
        run = blocks[start // bs : (end - 1) // bs + 1]
        if run == list(range(run[0], run[0] + len(run))):
            base = run[0] * bs + start % bs
            return slice(base, base + end - start)
        pos = torch.arange(start, end)
        table = torch.tensor(blocks)
        return (table[pos // bs] * bs + pos % bs).to(self.device)


@dataclass
class PagedSpan:
    """The new tokens of one sequence inside a flat batch."""

    start: int  # position of the first new token (= tokens already cached)
    length: int
    write: torch.Tensor | slice  # slots of the new tokens
    read: torch.Tensor | slice  # slots of positions [0, start + length)
    ring: int | None = None  # the sequence's ring in the sliding layers


class PagedAttention:
    """`model.AttentionBackend` over a `PagedKVCache` for a flat batch of spans.

    With `batch_decodes`, the single-token spans of the pass attend together (`DecodeBatch`): one call
    per layer instead of one per sequence (seriatim's decode-attention kernel for bfloat16 on the CPU,
    else a gather and one SDPA call). The float32 reference keeps one call per sequence, because a
    padded batch can change the summation order in the last bits and its greedy tokens are promised
    to be batch-invariant.

    With `invariant` (and the decode-attention kernel), every new token of the pass attends that way, as
    one query over its sequence's keys read where they lie: a token's attention is then computed alike
    whether it is decoded, verified or prefilled, in whatever chunk and batch, from cached keys or fresh.
    """

    def __init__(self, cache: PagedKVCache, spans: list[PagedSpan], batch_decodes: bool = False,
                 invariant: bool = False):
        self.cache = cache
        offsets = [0, *itertools.accumulate(s.length for s in spans)]
        self.spans = [(slice(a, b), span) for a, b, span in zip(offsets, offsets[1:], spans)]
        self.masks: dict[MaskKey, torch.Tensor] = {}  # shared by the layers of one pass
        # With the decode-attention kernel even a lone decode goes this way: it beats SDPA there too. So do
        # short chunks after cached positions (a speculative verification's): each token attends as its
        # decode would, and SDPA's set-up would cost more than the attention.
        kernel = library.for_tensor(cache.k) is not None
        self.invariant = invariant and kernel
        queries = [(sl.start, span) for sl, span in self.spans
                   if self.invariant or span.length == 1 or (kernel and short_chunk(span))]
        fewest = 1 if kernel else 2
        self.decodes = DecodeBatch.of(queries, cache.device) if batch_decodes and len(queries) >= fewest else None
        batched = {id(span) for _, span in queries} if self.decodes is not None else set()
        # The spans attended one by one in the pooled layers.
        self.rows = [(sl, span) for sl, span in self.spans if id(span) not in batched]
        # ... except that, in the fast mode, consecutive whole prompts of one length attend in one call
        # (`_fresh_batch`; the float32 reference keeps one call per sequence, like its decodes).
        self.parts = _fresh_runs(self.rows) if batch_decodes else [[row] for row in self.rows]
        # Each run's slots for its new keys and values, gathered once for all layers.
        self.run_writes = [torch.cat([_as_tensor(span.write, cache.device) for _, span in part]) if len(part) > 1
                           else None for part in self.parts]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: [T, H, Dh], k/v: [T, Hkv, Dh] -> [T, H, Dh]"""
        index = self.cache.index[layer]
        if window is not None:
            return self._sliding(index, q, k, v, scale, window)
        k_store, v_store = self.cache.k[index], self.cache.v[index]  # [Hkv, slots, Dh]
        outs = []
        for part, writes in zip(self.parts, self.run_writes):
            if writes is not None:
                outs.append(_fresh_batch(k_store, v_store, part, writes, q, k, v, scale))
                continue
            (sl, span), = part
            _store(k_store, span.write, k[sl])
            _store(v_store, span.write, v[sl])
            keys, values = _load(k_store, span.read), _load(v_store, span.read)
            outs.append(attend(q[sl], keys, values, span.start, scale, None, self.masks))
        if self.decodes is None:
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        if not self.rows:  # a pass of decodes only: the kernel's rows are the batch's, in order
            return self.decodes.attend(k_store, v_store, q, k, v, scale)
        out = q.new_empty(q.shape)
        out[self.decodes.rows] = self.decodes.attend(k_store, v_store, q, k, v, scale)
        for part, part_out in zip(self.parts, outs):
            out[part[0][0].start : part[-1][0].stop] = part_out
        return out

    def _sliding(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 window: int) -> torch.Tensor:
        """Each sequence over its own ring of this sliding layer."""
        outs = []
        for sl, span in self.spans:
            ring_k, ring_v = self.cache.ring_k[span.ring, index], self.cache.ring_v[span.ring, index]
            keys, values = ring_store(ring_k, span.start, k[sl], window), ring_store(ring_v, span.start, v[sl], window)
            if self.invariant:
                outs.append(_window_queries(q[sl], k[sl], v[sl], keys, values, span.start, scale, window))
            else:
                outs.append(attend(q[sl], keys, values, span.start, scale, window, self.masks))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _window_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    start: int, scale: float, window: int) -> torch.Tensor:
    """A sliding layer's new tokens (q, k, v: [n, H or Hkv, Dh] at positions [start, start + n)) attending one
    query each, by the decode-attention kernel, over `keys`/`values` [Hkv, L, Dh] (positions up to the last
    new one, in position order, as `ring_store` gives them): each query sees its own last `window` positions,
    summed in position order as its decode would sum them."""
    n, length = q.shape[0], keys.shape[1]
    first = start + n - length  # position of keys[:, 0]
    positions = torch.arange(start, start + n)
    lows = (positions - window + 1).clamp(min=first) - first  # each query's first visible key, as an index
    lengths = positions - first - lows + 1
    read = lows[:, None] + torch.arange(int(lengths.max()))[None, :]
    keys, values = keys.contiguous(), values.contiguous()
    device = q.device
    # The kernel stores each new key and value before attending: at their own indices, the same values.
    return library.ops().decode_attention(q, k, v, keys, values, torch.arange(n, device=device),
                                          positions.to(device) - first, read.clamp(max=length - 1).to(device),
                                          lengths.to(device), scale)


SHORT_CHUNK = 16  # new tokens of one sequence after cached ones that attend as decodes (decode kernel)


def short_chunk(span: PagedSpan) -> bool:
    """A few new tokens after cached ones: with the decode-attention kernel, they attend as decodes."""
    return 1 < span.length <= SHORT_CHUNK and span.start > 0


@dataclass
class DecodeBatch:
    """New tokens of a pass that attend one query each, together, in a pooled layer: every decode, and the
    tokens of short chunks, each seeing its sequence's positions up to its own. By the decode-attention
    kernel, which stores the new keys and values and reads each sequence's slots in place, or with each
    query's keys gathered into one padded [B, Hkv, width, Dh] batch and masked to its own length."""

    rows: torch.Tensor  # [B] their rows in the flat batch
    write: torch.Tensor  # [B] slot of each new token
    read: torch.Tensor  # [B, width] slots of each query's sequence's positions (the first `lengths` count)
    lengths: torch.Tensor  # [B] positions each query sees (the cached ones, and the new ones up to its own)

    @classmethod
    def of(cls, spans: list[tuple[int, PagedSpan]], device: torch.device) -> DecodeBatch:
        """The tokens of `spans`, whose first token is at the given row of the flat batch."""
        lengths = [span.start + i + 1 for _, span in spans for i in range(span.length)]
        read = torch.zeros(len(lengths), max(lengths), dtype=torch.long, device=device)
        query = 0
        for _, span in spans:  # every token of a span gets all its slots; its length says how many it sees
            end = span.start + span.length
            read[query : query + span.length, :end] = _as_tensor(span.read, device)
            query += span.length
        return cls(
            rows=torch.tensor([row + i for row, span in spans for i in range(span.length)], device=device),
            write=torch.cat([_as_tensor(span.write, device) for _, span in spans]),
            read=read,
            lengths=torch.tensor(lengths, device=device),
        )

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[B, 1, 1, width]: key j is visible to sequence b's query when j < length_b (SDPA path only,
        made once per pass)."""
        width = self.read.shape[1]
        return (torch.arange(width, device=self.read.device)[None, :] < self.lengths[:, None])[:, None, None, :]

    def attend(self, k_store: torch.Tensor, v_store: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float) -> torch.Tensor:
        """Store the new keys/values, then attend -> [B, H, Dh]."""
        if (ops := library.for_tensor(q)) is not None:  # one op: stores, then reads the cache in place
            return ops.decode_attention(q, k, v, k_store, v_store, self.rows, self.write, self.read, self.lengths,
                                        scale)
        k_store.index_copy_(1, self.write, k[self.rows].transpose(0, 1))
        v_store.index_copy_(1, self.write, v[self.rows].transpose(0, 1))
        (batch, width), (kv_heads, _, dim) = self.read.shape, k_store.shape
        keys = k_store.index_select(1, self.read.view(-1)).view(kv_heads, batch, width, dim).transpose(0, 1)
        values = v_store.index_select(1, self.read.view(-1)).view(kv_heads, batch, width, dim).transpose(0, 1)
        # Query heads sharing a KV head folded into the query axis, as for a lone decode: [B, Hkv, H/Hkv, Dh].
        queries = q[self.rows].view(batch, kv_heads, -1, dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.mask, scale=scale)
        return out.reshape(batch, -1, dim)


def _fresh_runs(rows: list[tuple[slice, PagedSpan]]) -> list[list[tuple[slice, PagedSpan]]]:
    """`rows` in runs: spans adjacent in the batch that are whole prompts (start 0) of one length form one run."""
    runs: list[list[tuple[slice, PagedSpan]]] = []
    for sl, span in rows:
        last_sl, last = runs[-1][-1] if runs else (None, None)
        adjacent = last is not None and last_sl.stop == sl.start
        if adjacent and span.start == last.start == 0 and span.length == last.length:
            runs[-1].append((sl, span))
        else:
            runs.append([(sl, span)])
    return runs


def _fresh_batch(k_store: torch.Tensor, v_store: torch.Tensor, run: list[tuple[slice, PagedSpan]], writes: torch.Tensor,
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A run of whole prompts of length n (`_fresh_runs`, rows a..b of the batch): store their keys and
    values at `writes`, then attend each to its own, as [G, H, n, Dh] in one causal SDPA call -> [G n, H, Dh].
    Their keys are exactly their own new ones, so nothing is read back from the pool; one call instead of G
    (each ~0.1 ms on the CPU for a 64-token prompt, almost all of it overhead)."""
    a, b, n, groups = run[0][0].start, run[-1][0].stop, run[0][1].length, len(run)
    _store(k_store, writes, k[a:b])
    _store(v_store, writes, v[a:b])
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    keys, values = (x[a:b].view(groups, n, kv_heads, dim).transpose(1, 2) for x in (k, v))  # [G, Hkv, n, Dh]
    if (ops := flash_kernel(q)) is not None:
        out = ops.prefill_attention(q[a:b].view(groups, n, heads, dim), keys, values, 0, 0, 0, scale)
        return out.view(-1, heads, dim)
    out = F.scaled_dot_product_attention(
        q[a:b].view(groups, n, heads, dim).transpose(1, 2), keys, values, is_causal=True, scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(groups * n, heads, dim)


def _as_tensor(slots: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
    return torch.arange(slots.start, slots.stop, device=device) if isinstance(slots, slice) else slots


def _store(store: torch.Tensor, slots: torch.Tensor | slice, x: torch.Tensor) -> None:
    """x: [n, Hkv, Dh] into store[:, slots]"""
    if isinstance(slots, slice):
        store[:, slots] = x.transpose(0, 1)
    else:
        store.index_copy_(1, slots, x.transpose(0, 1))


def _load(store: torch.Tensor, slots: torch.Tensor | slice) -> torch.Tensor:
    return store[:, slots] if isinstance(slots, slice) else store.index_select(1, slots)
