"""Log-probabilities of given text under the model: perplexity, and prompt logprobs for `echo`."""

from __future__ import annotations

import math

import torch

from .kv_cache import BatchAttention, SequenceCache, Span
from .model import Transformer

CHUNK = 512  # tokens per forward pass, to bound activation memory on long texts


@torch.inference_mode()
def token_logprobs(model: Transformer, ids: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, as float32 [len(ids) - 1]."""
    if not 2 <= len(ids) <= model.cfg.context_length:
        raise ValueError(f"scoring needs 2 to {model.cfg.context_length} tokens, got {len(ids)}")
    cache = SequenceCache(model.cfg, len(ids), dtype, device)
    tokens = torch.tensor(ids, device=device)
    out = []
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)
        backend = BatchAttention([Span(cache, start, end - start)])
        hidden = model(tokens[start:end], torch.arange(start, end, device=device), backend)
        backend.commit()
        logp = torch.log_softmax(model.logits(hidden), dim=-1)
        out.append(logp.gather(1, tokens[start + 1 : end + 1, None])[:, 0])
    return torch.cat(out)


def perplexity(model: Transformer, ids: list[int], dtype: torch.dtype, device: torch.device) -> float:
    return math.exp(-token_logprobs(model, ids, dtype, device).mean().item())
