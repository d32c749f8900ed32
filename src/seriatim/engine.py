"""The generation loop: admit requests, run one forward pass per step, sample, emit deltas.

Every step feeds each running sequence its tokens that are not yet cached
(the whole prompt on its first step: prefill; one token afterwards: decode)
in one flat batch, then samples one token per sequence.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

import torch

from .detokenizer import IncrementalDetokenizer
from .kv_cache import BatchAttention, SequenceCache, Span
from .model import Transformer
from .outputs import Delta
from .sampling import SamplingParams, SamplingState, sample
from .sequence import Sequence
from .tokenizer import Tokenizer


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, device: torch.device, kv_dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.kv_dtype = kv_dtype
        self.context_length = model.cfg.context_length
        self.running: dict[int, Sequence] = {}
        self._ids = itertools.count()

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams) -> int:
        """Validate and queue a tokenized prompt; returns the request id."""
        prompt = self.validate_prompt(prompt_ids)
        params.validate_for_vocab(self.model.cfg.vocab_size)
        max_length = min(self.context_length, len(prompt) + params.max_tokens)
        rid = next(self._ids)
        self.running[rid] = Sequence(
            request_id=rid,
            prompt_ids=prompt,
            params=params,
            sampling=SamplingState(params, prompt, self.model.cfg.vocab_size, self.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
            cache=SequenceCache(self.model.cfg, max_length, self.kv_dtype, self.device),
            eos_ids=self.tokenizer.eos_token_ids,
            max_length=max_length,
        )
        return rid

    def validate_prompt(self, prompt_ids: Seq[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.context_length:
            raise ValueError(
                f"prompt has {len(prompt)} tokens but the model's context is {self.context_length} tokens "
                "(at least one must remain for output)"
            )
        return prompt

    def abort(self, request_id: int) -> Delta | None:
        seq = self.running.pop(request_id, None)
        if seq is None:
            return None
        seq.abort()
        return Delta(request_id, "", [], None, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def sequence(self, request_id: int) -> Sequence:
        return self.running[request_id]

    @torch.inference_mode()
    def step(self) -> list[tuple[Delta, Sequence]]:
        """One forward pass over all running sequences; one new token each."""
        seqs = list(self.running.values())
        if not seqs:
            return []
        tokens: list[int] = []
        positions: list[int] = []
        spans: list[Span] = []
        for s in seqs:
            new = s.pending_tokens()
            start = s.cache.length
            spans.append(Span(s.cache, start, len(new)))
            tokens += new
            positions += range(start, start + len(new))
        backend = BatchAttention(spans)
        hidden = self.model(self._tensor(tokens), self._tensor(positions), backend)
        backend.commit()
        last = self._tensor(list(itertools.accumulate(sp.length for sp in spans))) - 1
        out = sample(self.model.logits(hidden[last]), [s.sampling for s in seqs])
        results = []
        for s, token, lp in zip(seqs, out.token_ids, out.logprobs):
            delta = s.append(token, lp)
            if s.finished:
                del self.running[s.request_id]
            results.append((delta, s))
        return results

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
