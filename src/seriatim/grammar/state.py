"""One request's place in its grammar, and the batched masks of allowed next tokens."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class GrammarState:
    matcher: object  # llguidance.LLMatcher, advanced by every token the request takes
    width: int  # tokens its masks cover: the model's logits width (or the tokenizer's, if larger)

    def accept(self, token: int) -> None:
        """Advance past `token`, which the last mask allowed."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} breaks the request's grammar: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        """The tokens the grammar allows as the only continuation from here (jump-forward), possibly none."""
        return list(self.matcher.compute_ff_tokens())


def allowed_tokens(states: list[GrammarState], vocab: int) -> torch.Tensor:
    """Bool [len(states), vocab] on the CPU: which tokens each state allows next. Several states fill their
    masks in parallel on llguidance's thread pool. (llguidance.torch would do this too, but importing it
    loads torch.compile's machinery: 1.5 s.)"""
    width = max(s.width for s in states)
    bits = torch.zeros(len(states), (width + 31) // 32, dtype=torch.int32)
    row_bytes = bits.shape[1] * bits.element_size()
    if len(states) == 1:
        states[0].matcher.unsafe_compute_mask_ptr(bits.data_ptr(), row_bytes)
    else:
        _executor().unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)], bits.data_ptr(),
                                            row_bytes, len(states))
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(len(states), -1)[:, :vocab]


@functools.cache
def _executor():
    from llguidance import LLExecutor

    return LLExecutor()
