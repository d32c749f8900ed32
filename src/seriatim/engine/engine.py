"""The generation loop: admit requests, run one forward pass per step, sample, emit deltas.

Every step feeds the scheduled sequences their tokens that are not yet cached
(prompt chunks: prefill; one token: decode) in one flat batch, and samples a
new token for each sequence whose tokens are now all cached.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ..text.detokenizer import IncrementalDetokenizer
from ..model.fused_decode import FusedDecode
from ..model.transformer import Transformer
from ..outputs import Delta
from ..model.paged_kv import ROLLBACK, PagedAttention, PagedKVCache, PagedSpan
from ..sampling import SamplingParams, SamplingState, sample
from .scheduler import Chunk, Scheduler, SchedulerConfig
from .sequence import Sequence
from ..text.tokenizer import Tokenizer


@dataclass
class EngineStats:
    """Counters of the engine's work: `steps` and `step_tokens` reach the server's /metrics (which counts
    requests and tokens itself); the rest serve the Python API, benchmarks and tests."""

    steps: int = 0
    step_tokens: int = 0  # tokens fed in the last step
    prompt_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0


@dataclass
class EngineMetrics:
    """A snapshot of the engine's state."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_hit_rate: float
    preemptions: int
    stats: EngineStats


def validate_prompt(prompt_ids: Seq[int], vocab: int, context: int) -> list[int]:
    """The prompt as ints; ValueError unless it is non-empty, in the vocabulary and leaves room for output."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt is empty")
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    if len(prompt) >= context:
        raise ValueError(f"prompt has {len(prompt)} tokens but the model's context is {context} tokens "
                         "(at least one must remain for output)")
    return prompt


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        device: torch.device,
        kv_dtype: torch.dtype,
        config: SchedulerConfig | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.kv_dtype = kv_dtype
        self.context_length = model.cfg.context_length
        config = config or SchedulerConfig()
        self.cache = PagedKVCache(model.cfg, config.num_blocks, config.block_size, kv_dtype, device, config.max_running)
        if self.cache.has_rings:  # ring contents are per sequence: nothing to share, little to roll back
            config = dataclasses.replace(config, prefix_caching=False, max_rollback=ROLLBACK)
        self.scheduler = Scheduler(config)
        self.batch_decodes = kv_dtype != torch.float32  # the float32 reference stays batch-invariant
        self.fused = FusedDecode.of(model)  # decoding passes' layers as one op each, where they can be
        self.stats = EngineStats()
        self.requests: dict[int, Sequence] = {}  # waiting or running
        self._ids = itertools.count()

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams) -> int:
        """Validate and queue a tokenized prompt; returns the request id."""
        prompt = self.validate_prompt(prompt_ids)
        rid = next(self._ids)
        seq = Sequence(
            request_id=rid,
            prompt_ids=prompt,
            params=params,
            sampling=SamplingState(params, prompt, self.model.cfg.vocab_size, self.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
            eos_ids=self.tokenizer.eos_token_ids,
            max_length=min(self.context_length, len(prompt) + params.max_tokens),
        )
        self.scheduler.add(seq)
        self.requests[rid] = seq
        return rid

    def validate_prompt(self, prompt_ids: Seq[int]) -> list[int]:
        return validate_prompt(prompt_ids, self.model.cfg.vocab_size, self.context_length)

    def abort(self, request_id: int) -> Delta | None:
        """Cancel a waiting or running request; its cache is freed at once."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        seq.abort()
        self.scheduler.finish(seq)
        self.stats.aborted += 1
        return Delta(request_id, "", [], None, "abort", seq.metrics)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def metrics(self) -> EngineMetrics:
        blocks = self.scheduler.blocks
        return EngineMetrics(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=blocks.num_used,
            kv_blocks_free=blocks.num_available,
            prefix_hit_rate=blocks.stats.hit_rate,
            preemptions=self.scheduler.preemptions,
            stats=self.stats,
        )

    @torch.inference_mode()
    def step(self) -> list[tuple[Delta, Sequence]]:
        """One forward pass over the scheduled chunks; one new token per completed sequence."""
        chunks = self.scheduler.schedule()
        self.cache.release_rings({seq.request_id for seq in self.scheduler.running})
        if not chunks:
            return []
        hidden = self._forward(chunks)
        ends = list(itertools.accumulate(c.length for c in chunks))
        ready = [(c.seq, end - 1) for c, end in zip(chunks, ends) if c.seq.num_cached == c.seq.length]
        if not ready:
            return []
        logits = self.model.logits(hidden[self._tensor([i for _, i in ready])])
        out = sample(logits, [s.sampling for s, _ in ready])
        results = []
        for (seq, _), token, lp in zip(ready, out.token_ids, out.logprobs):
            delta = seq.append(token, lp)
            self.stats.generated_tokens += 1
            if seq.finished:
                self.requests.pop(seq.request_id, None)
                self.scheduler.finish(seq)
                self.stats.finished += 1
            results.append((delta, seq))
        return results

    def _forward(self, chunks: list[Chunk]) -> torch.Tensor:
        tokens: list[int] = []
        positions: list[int] = []
        spans: list[PagedSpan] = []
        for c in chunks:
            start, end = c.seq.num_cached, c.seq.num_cached + c.length
            if start < len(c.seq.prompt_ids):
                self.stats.prompt_tokens += min(end, len(c.seq.prompt_ids)) - start
                c.seq.metrics.scheduled = c.seq.metrics.scheduled or time.perf_counter()
            tokens += c.seq.pending_tokens()[: c.length]
            positions += range(start, end)
            blocks = c.seq.block_table.blocks
            spans.append(PagedSpan(start, c.length, self.cache.slots(blocks, start, end),
                                   self.cache.slots(blocks, 0, end), self.cache.ring_of(c.seq.request_id)))
        if self.scheduler.config.deterministic:  # one pass per sequence: results cannot depend on the batch
            bounds = [0, *itertools.accumulate(c.length for c in chunks)]
            hidden = torch.cat([self._pass(tokens[a:b], positions[a:b], PagedAttention(self.cache, [span]))
                                for a, b, span in zip(bounds, bounds[1:], spans)])
        else:
            hidden = self._pass(tokens, positions, PagedAttention(self.cache, spans, self.batch_decodes))
        for c in chunks:
            self.scheduler.computed(c.seq, c.length)
        self.stats.steps += 1
        self.stats.step_tokens = len(tokens)
        return hidden

    def _pass(self, tokens: list[int], positions: list[int], backend: PagedAttention) -> torch.Tensor:
        """One forward pass: by the fused decode layers where they serve it, else by the model's modules."""
        tokens_t, positions_t = self._tensor(tokens), self._tensor(positions)
        if self.fused is not None and (hidden := self.fused.forward(tokens_t, positions_t, backend)) is not None:
            return hidden
        return self.model(tokens_t, positions_t, backend)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
