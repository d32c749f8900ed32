"""Log-probabilities of given text under the model: perplexity (`bench --quality`), and the prompt's
logprobs for the server's `echo`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from ..sampling import TokenLogprobs
from .sequence_cache import BatchAttention, SequenceCache, Span
from .transformer import Transformer

CHUNK = 512  # tokens per forward pass, to bound activation memory on long texts


def _chunks(model: Transformer, ids: list[int], dtype: torch.dtype, device: torch.device,
            chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probabilities [n, V] of the next token at n consecutive positions, those next tokens [n]), chunk
    by chunk over every position but the last, through a cache of the text's own (not the engine's)."""
    if not 2 <= len(ids) <= model.cfg.context_length:
        raise ValueError(f"scoring needs 2 to {model.cfg.context_length} tokens, got {len(ids)}")
    cache = SequenceCache(model.cfg, len(ids), dtype, device)
    tokens = torch.tensor(ids, device=device)
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)
        backend = BatchAttention([Span(cache, start, end - start)])
        hidden = model(tokens[start:end], torch.arange(start, end, device=device), backend)
        yield torch.log_softmax(model.logits(hidden), dim=-1), tokens[start + 1 : end + 1]


@torch.inference_mode()
def token_logprobs(model: Transformer, ids: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, as float32 [len(ids) - 1]."""
    return torch.cat([logp.gather(1, nxt[:, None])[:, 0] for logp, nxt in _chunks(model, ids, dtype, device, CHUNK)])


@torch.inference_mode()
def prompt_logprobs(model: Transformer, prompt_ids: Seq[int], top_n: int, dtype: torch.dtype, device: torch.device,
                    chunk: int = CHUNK) -> list[TokenLogprobs | None]:
    """Each prompt token's raw log-probability given the ones before it, with the top `top_n` alternatives;
    the first token has none (None). Runs outside the engine's KV cache: call it in the engine thread."""
    ids = [int(t) for t in prompt_ids]
    out: list[TokenLogprobs | None] = [None]
    if len(ids) < 2:
        return out
    for logp, nxt in _chunks(model, ids, dtype, device, chunk):
        chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()
        top_lp, top_ids = (t.tolist() for t in logp.topk(min(top_n, logp.shape[-1]) or 1, dim=-1))
        for j, tok in enumerate(nxt.tolist()):
            out.append(TokenLogprobs(tok, chosen[j], list(zip(top_ids[j], top_lp[j]))[:top_n]))
    return out


def perplexity(model: Transformer, ids: list[int], dtype: torch.dtype, device: torch.device) -> float:
    return math.exp(-token_logprobs(model, ids, dtype, device).mean().item())
