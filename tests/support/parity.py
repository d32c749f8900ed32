"""Reference runs shared by the parity tests: transformers' logits on the same weights, and seriatim's
model fed chunk by chunk through a per-sequence cache."""

from __future__ import annotations

import torch

from seriatim import LLM
from seriatim.model.sequence_cache import BatchAttention, SequenceCache, Span

REL_TOL = 1e-4
# Prefill under the window, a chunk across the point where the sliding layers' rings wrap, a chunk
# longer than the window, a short chunk, then single-token decodes: 40 positions, window 8.
CHUNKS = [5, 6, 12, 3] + [1] * 14



def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference(root, source: str):
    """transformers' model on the same file (its GGUF loader dequantizes to float32)."""
    from transformers import AutoModelForCausalLM

    if source == "hf":
        return AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(root, gguf_file=f"{source}.gguf", dtype=torch.float32).eval()


def run_chunks(llm: LLM, ids: list[int], chunks: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Feed `ids` through seriatim in chunks (first = prefill, then cached steps); logits at every position."""
    cache = SequenceCache(llm.config, len(ids), dtype, llm.device)
    out, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            backend = BatchAttention([Span(cache, start, n)])
            hidden = llm.model(torch.tensor(ids[start : start + n]), torch.arange(start, start + n), backend)
            out.append(llm.model.logits(hidden))
            start += n
    return torch.cat(out)


def random_ids(llm: LLM, n: int = 40, seed: int = 1) -> list[int]:
    return torch.randint(0, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_logits_match(root, source: str, chunks: list[int] = CHUNKS):
    llm = LLM(str(root / "hf") if source == "hf" else str(root / f"{source}.gguf"), dtype="float32")
    ids = random_ids(llm)
    with torch.no_grad():
        expected = reference(root, source)(torch.tensor([ids])).logits[0]
    got = run_chunks(llm, ids, chunks)
    for pos in range(len(ids)):
        assert rel_err(got[pos], expected[pos]) <= REL_TOL, f"position {pos}"


def refeed(llm: LLM, prompt: list[int], params, decoded: int, chunk: int):
    """A request decoded one token at a time until it has `decoded` tokens, then its last `chunk` tokens fed
    again in one pass (as a speculative verification feeds them), which samples one more: its Sequence.
    The caller aborts it."""
    engine = llm.engine
    seq = engine.requests[engine.add_request(prompt, params)]
    while len(seq.output_ids) < decoded:
        engine.step()
    engine.scheduler.truncate(seq, seq.length - chunk)
    engine.step()
    return seq
