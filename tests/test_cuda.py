"""The same modules on a CUDA GPU (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch

from seriatim import LLM, SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_float32_cuda_matches_cpu(tiny_llama):
    path = str(tiny_llama[0] / "Q8_0.gguf")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    cpu = LLM(path, dtype="float32", device="cpu").generate("The quick brown fox", params)[0]
    gpu = LLM(path, dtype="float32", device="cuda").generate("The quick brown fox", params)[0]
    assert gpu.token_ids == cpu.token_ids
    for a, b in zip(gpu.logprobs, cpu.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_auto_mode_on_cuda_generates_and_samples_reproducibly(tiny_llama):
    llm = LLM(str(tiny_llama[0] / "Q4_1.gguf"))
    assert llm.device.type == "cuda"
    for top_k in (0, 20):  # the full sort, and the top-k candidates only
        params = SamplingParams(temperature=0.9, top_p=0.9, top_k=top_k, seed=5, max_tokens=16, ignore_eos=True)
        assert llm.generate("hello", params)[0].token_ids == llm.generate("hello", params)[0].token_ids


@pytest.mark.real_model
def test_smollm2_greedy_on_cuda_matches_cpu(smollm2_gguf_path):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    cpu = LLM(str(smollm2_gguf_path), dtype="float32", device="cpu").generate("The history of", params)[0]
    gpu = LLM(str(smollm2_gguf_path), dtype="float32", device="cuda").generate("The history of", params)[0]
    assert gpu.token_ids == cpu.token_ids


@pytest.mark.parametrize("deterministic", [False, True])
def test_float32_batch_on_cuda_equals_each_prompt_alone(tiny_llama, deterministic):
    llm = LLM(str(tiny_llama[0] / "Q8_0.gguf"), dtype="float32", device="cuda", deterministic=deterministic)
    prompts = ["a", "The quick brown fox", "hello world, hello again and again"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == [llm.generate(p, params)[0].token_ids for p in prompts]


def test_cuda_kv_cache_is_sized_from_gpu_memory(tiny_llama):
    llm = LLM(str(tiny_llama[0] / "Q4_1.gguf"), device="cuda")
    assert llm.engine.cache.k.device.type == "cuda"
    assert llm.engine.scheduler.config.kv_capacity_tokens > 0
    assert llm.engine.scheduler.config.max_step_tokens == 4096  # a GPU step takes 64 prompts of 64 tokens
