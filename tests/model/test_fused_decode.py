"""Fused decode layers (fused_decode.py, csrc/decode_layer.cpp): the modules' results bit for bit."""

from __future__ import annotations

import pytest
import torch

from seriatim import LLM
from seriatim.kernels import library
from seriatim.model.fused_decode import FusedDecode
from seriatim.model.quant import Product
from seriatim.sampling import SamplingParams
from support.parity import refeed

needs_kernels = pytest.mark.skipif(library.ops() is None, reason="needs seriatim's kernels (ISA tier avx2 or above)")


def count_passes(monkeypatch) -> list[int]:
    """The batch size of every pass the fused layers ran, from now on."""
    sizes = []
    original = FusedDecode.forward

    def forward(self, tokens, *args):
        sizes.append(len(tokens))
        return original(self, tokens, *args)

    monkeypatch.setattr(FusedDecode, "forward", forward)
    return sizes


def results(outs) -> list:
    return [(o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs]) for o in outs]


def generate(llm: LLM, fused: bool, monkeypatch) -> tuple[list, int]:
    """Greedy generations with logprobs for three prompts, one at a time; and how many fused passes ran."""
    runs = count_passes(monkeypatch)
    llm.engine.runner.fused = FusedDecode.of(llm.model) if fused else None
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = [llm.generate(prompt, params)[0] for prompt in ([5, 9, 11], [40, 41, 42, 43, 44, 45, 46], [7])]
    return results(outs), len(runs)


def generate_batch(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[bool, list]:
    """The prompts generated together, by the modules (False) and by the fused layers (True)."""
    out = {}
    for fused in (False, True):
        llm.engine.runner.fused = FusedDecode.of(llm.model) if fused else None
        out[fused] = results(llm.generate(prompts, params))
    return out


@needs_kernels
@pytest.mark.parametrize("family, source",
                         [("llama", "Q4_1"), ("llama", "BF16"), ("qwen2", "Q4_K"), ("qwen2", "mixed")])
def test_fused_layers_equal_the_modules(family, source, request, monkeypatch):
    """Int4, int8 and dense projections, with and without a QKV bias (Qwen2): the same tokens and the
    same log-probabilities to the last bit, and the fused op did run."""
    root = request.getfixturevalue(f"tiny_{family}")
    root = root[0] if family == "llama" else root  # (root, HF model) for the tiny Llama
    llm = LLM(str(root / f"{source}.gguf"), prefix_caching=False)
    assert llm.model.norm.weight.dtype == torch.bfloat16
    expected, unfused = generate(llm, False, monkeypatch)
    got, fused = generate(llm, True, monkeypatch)
    assert unfused == 0 and fused >= 11 * 3  # every decode after the first token
    assert got == expected


def test_not_for_other_forms(tiny_gemma3, tiny_llm):
    """Gemma's extra norms and sliding layers, and the float32 reference, keep the modules."""
    assert FusedDecode.of(tiny_llm.model) is None
    assert FusedDecode.of(LLM(str(tiny_gemma3 / "Q8_0.gguf")).model) is None


@needs_kernels
def test_batched_decodes_fuse_on_the_products_the_modules_pick(tiny_llama, monkeypatch):
    """Four sequences decoding together (AMX products where the CPU has AMX, without batch invariance):
    the same tokens and log-probabilities as the modules."""
    llm = LLM(str(tiny_llama[0] / "Q4_1.gguf"), prefix_caching=False, batch_invariant=False)
    prompts = [[5, 9, 11], [40, 41, 42, 43, 44, 45, 46], [7], [100, 3]]
    batch_sizes = count_passes(monkeypatch)
    got = generate_batch(llm, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3))
    assert batch_sizes.count(4) >= 8  # most steps decoded all four together
    if library.amx():
        assert set(llm.engine.runner.fused.products(4)) == {Product.AMX}
    assert got[True] == got[False]


@needs_kernels
@pytest.mark.skipif(not library.bf16_matmul(), reason="no dense bfloat16 product where the CPU lacks bfloat16 "
                                                      "arithmetic (below the avx512 tier)")
@pytest.mark.parametrize("source", ["Q4_1", "Q8_0"])
def test_wide_decode_passes_fuse_on_the_dense_product(tiny_llama, source, monkeypatch):
    """512 sequences decoding together without batch invariance (past every crossover to the dense
    product): int4 and int8 projections expanded to dense weights, in C++ as in the modules, with the same
    tokens and log-probabilities."""
    llm = LLM(str(tiny_llama[0] / f"{source}.gguf"), prefix_caching=False, max_running=512,
              max_step_tokens=2048, batch_invariant=False)
    rows = 512
    assert Product.DENSE in llm.engine.runner.fused.products(rows)
    prompts = [[5 + i % 50, 9, 11 + i % 7] for i in range(rows)]
    batch_sizes = count_passes(monkeypatch)
    got = generate_batch(llm, prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2))
    assert rows in batch_sizes
    assert got[True] == got[False]


@needs_kernels
def test_a_short_chunk_after_cached_tokens_fuses_and_equals_the_modules(tiny_llama, monkeypatch):
    """The last four tokens fed again in one pass (as a speculative verification feeds them) run through
    the fused layers, and give what the modules give."""
    llm = LLM(str(tiny_llama[0] / "Q4_1.gguf"), prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    sizes, got = count_passes(monkeypatch), {}
    for fused in (False, True):
        llm.engine.runner.fused = FusedDecode.of(llm.model) if fused else None
        seq = refeed(llm, [5, 9, 11, 40], params, decoded=6, chunk=4)
        got[fused] = (seq.output_ids[:], seq.logprobs[6].logprob, seq.logprobs[6].top)
        llm.engine.abort(seq.request_id)
    assert sizes[-1] == 4  # the chunk's pass was fused
    assert got[True] == got[False]
