"""A step's forward pass: the scheduled chunks as one flat batch, and the one place that decides whether the
fused decode layers or the model's modules compute it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..kernels import library
from ..model.fused_decode import FusedDecode
from ..model.paged_kv import DecodeBatch, PagedAttention, PagedKVCache, PagedSpan, short_chunk
from ..model.quant import set_batch_invariant
from ..model.transformer import Transformer
from .scheduler import Chunk


@dataclass
class Feed:
    """New tokens of one sequence for a pass: `tokens` at positions from `start`, in the cache's `blocks`."""

    blocks: list[int]
    start: int
    tokens: list[int]
    ring: int | None = None  # the sequence's ring in the sliding layers, if the model has them


@dataclass
class StepBatch:
    """The new tokens of every scheduled sequence, concatenated: [T] ids and positions, and each sequence's
    span of them in the paged cache."""

    tokens: list[int]
    positions: list[int]
    spans: list[PagedSpan]

    @classmethod
    def of(cls, chunks: list[Chunk], cache: PagedKVCache) -> StepBatch:
        return cls.of_feeds([Feed(c.seq.block_table.blocks, c.seq.num_cached, c.seq.pending_tokens()[: c.length],
                                  cache.ring_of(c.seq.request_id)) for c in chunks], cache)

    @classmethod
    def of_feeds(cls, feeds: list[Feed], cache: PagedKVCache) -> StepBatch:
        tokens: list[int] = []
        positions: list[int] = []
        spans: list[PagedSpan] = []
        for f in feeds:
            end = f.start + len(f.tokens)
            tokens += f.tokens
            positions += range(f.start, end)
            spans.append(PagedSpan(f.start, len(f.tokens), cache.slots(f.blocks, f.start, end),
                                   cache.slots(f.blocks, 0, end), f.ring))
        return cls(tokens, positions, spans)

    @property
    def queries_only(self) -> bool:
        """Whether every new token attends as one query of the decode-attention kernel: decodes, and short
        chunks after cached tokens (a speculative verification's)."""
        return all(span.length == 1 or short_chunk(span) for span in self.spans)

    def first_rows(self) -> list[int]:
        """Each span's first row in the flat batch."""
        return [0, *itertools.accumulate(span.length for span in self.spans)][:-1]

    def per_sequence(self) -> list[StepBatch]:
        """One batch per sequence, in order."""
        return [StepBatch(self.tokens[a : a + span.length], self.positions[a : a + span.length], [span])
                for a, span in zip(self.first_rows(), self.spans)]


class ModelRunner:
    """Runs a `StepBatch` through the model over the paged cache -> hidden states [T, D].

    Passes of decodes and short chunks after cached tokens go through the fused decode layers where the model
    has them (the plain Llama form, bfloat16, our kernels: fused_decode.py); everything else through the
    modules. The float32 reference attends one sequence at a time (batch-invariant to the last bit), and with
    `deterministic` every sequence gets a pass of its own.

    With `batch_invariant` where our kernels run, every token is computed as a decode would compute it: its
    products by the vector kernels (`quant.set_batch_invariant`), its attention as one query of the
    decode-attention kernel, so every pass may take the fused layers. A token's hidden state then depends
    on its sequence alone, not on the pass's other rows, its chunking, or what the prefix cache held."""

    def __init__(self, model: Transformer, cache: PagedKVCache, deterministic: bool, batch_invariant: bool):
        self.model = model
        self.cache = cache
        self.deterministic = deterministic
        self.batch_decodes = cache.k.dtype != torch.float32
        kernel = library.for_tensor(cache.k) is not None  # the decode-attention kernel serves this cache
        self.invariant = batch_invariant and kernel
        set_batch_invariant(model, self.invariant)
        self.fused = FusedDecode.of(model) if self.batch_decodes and kernel and not cache.has_rings else None

    def run(self, batch: StepBatch) -> torch.Tensor:
        if self.deterministic:  # results cannot depend on the batch
            return torch.cat([self._modules(part, batch_decodes=False) for part in batch.per_sequence()])
        if self.fused is not None and (self.invariant or batch.queries_only):
            decodes = DecodeBatch.of(list(zip(batch.first_rows(), batch.spans)), self.cache.device)
            return self.fused.forward(self._tensor(batch.tokens), self._tensor(batch.positions), self.cache.k,
                                      self.cache.v, decodes)
        return self._modules(batch, self.batch_decodes)

    def _modules(self, batch: StepBatch, batch_decodes: bool) -> torch.Tensor:
        backend = PagedAttention(self.cache, batch.spans, batch_decodes, self.invariant)
        return self.model(self._tensor(batch.tokens), self._tensor(batch.positions), backend)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.cache.device)
