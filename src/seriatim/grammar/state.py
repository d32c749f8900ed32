"""One request's place in its grammar, and the batched masks of allowed next tokens."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..kernels import library


class GrammarError(ValueError):
    """llguidance gave up on a request's grammar part-way (one of its limits on the work a token may take):
    the fault of that request's constraint, which ends it alone."""


@dataclass
class GrammarState:
    matcher: object  # llguidance.LLMatcher, advanced by every token the request takes
    width: int  # tokens its masks cover: the model's logits width (or the tokenizer's, if larger)

    def accept(self, token: int) -> None:
        """Advance past `token`, which the last mask allowed."""
        if not self.matcher.consume_token(token):
            problem = self.matcher.get_error().strip().splitlines()[0]
            raise GrammarError(f"llguidance gave up on it at token {token}: {problem}")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, taken in order from here, the grammar allows (a speculation's drafts)."""
        return self.matcher.validate_tokens(tokens)

    def copy(self) -> GrammarState:
        """An independent state at the same place (a speculation's drafts advance it, then leave it)."""
        return GrammarState(self.matcher.deep_copy(), self.width)

    def finished(self) -> bool:
        """Whether the grammar has ended (taken its EOS): no token can follow."""
        return self.matcher.is_stopped()

    def rollback(self, count: int) -> None:
        """Undo the last `count` accepted tokens."""
        if count and not self.matcher.rollback(count):
            raise RuntimeError(f"cannot roll the grammar back {count} tokens: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        """The tokens the grammar allows as the only continuation from here (jump-forward), possibly none."""
        return list(self.matcher.compute_ff_tokens())


def mask_logits(logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> torch.Tensor:
    """A copy of float32 `logits` [B, V] with -inf where row rows[i]'s grammar (states[i]) forbids the token.
    On the CPU by seriatim's kernel where built, else by tensor ops: the same values."""
    bits = token_bitmask(states)
    if logits.device.type == "cpu" and (ops := library.ops()) is not None:
        return ops.apply_bitmask(logits, bits, torch.tensor(rows))
    allowed = unpack(bits, logits.shape[-1]).to(logits.device)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed, -math.inf)
    return logits


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool [R, vocab] from token bitmasks [R, W]: which tokens each allows."""
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(len(bits), -1)[:, :vocab]


def token_bitmask(states: list[GrammarState]) -> torch.Tensor:
    """Int32 [len(states), W]: bit t of word w says whether token 32 w + t is allowed next. Several states fill
    their masks in parallel on llguidance's thread pool. (llguidance.torch would do this too, but importing it
    loads torch.compile's machinery: 1.5 s.)"""
    width = max(s.width for s in states)
    bits = torch.zeros(len(states), (width + 31) // 32, dtype=torch.int32)
    row_bytes = bits.shape[1] * bits.element_size()
    if len(states) == 1:
        states[0].matcher.unsafe_compute_mask_ptr(bits.data_ptr(), row_bytes)
    else:
        _executor().unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)], bits.data_ptr(),
                                            row_bytes, len(states))
    return bits


@functools.cache
def _executor():
    from llguidance import LLExecutor

    return LLExecutor()
