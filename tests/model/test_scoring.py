"""Scoring given text: token log-probabilities equal transformers' (float32), across chunk borders."""

from __future__ import annotations

import math

import pytest
import torch

from seriatim.model import scoring


def test_token_logprobs_match_transformers(tiny_llama, tiny_llm, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK", 16)  # several chunks, each attending over the cached ones
    _, hf = tiny_llama
    ids = torch.randint(0, tiny_llm.config.vocab_size, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], -1)
        ref = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = scoring.token_logprobs(tiny_llm.model, ids, torch.float32, tiny_llm.device)
    assert torch.allclose(got, ref, atol=1e-4)
    assert scoring.perplexity(tiny_llm.model, ids, torch.float32, tiny_llm.device) == pytest.approx(
        math.exp(-ref.mean().item()), rel=1e-4)


@pytest.mark.parametrize("n", [1, 10_000])
def test_scoring_rejects_bad_lengths(tiny_llm, n):
    with pytest.raises(ValueError, match="scoring needs"):
        scoring.token_logprobs(tiny_llm.model, [5] * n, torch.float32, tiny_llm.device)
