"""Prompts for the speculative-decoding tests: ones whose lookups hit, and random ones whose mostly miss."""

from __future__ import annotations

import torch

REPEAT = "one two three four five one two three four five one two three four five one two"


def prompts(llm, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    out = [llm.tokenizer.encode(REPEAT)]
    for n in range(count - 1):  # random prompts of repeated random phrases: lookups that hit and miss
        phrase = torch.randint(3, llm.config.vocab_size, (3 + n % 4,), generator=g).tolist()
        out.append(phrase * (1 + n % 3))
    return out
