"""Real Qwen2.5-Coder-0.5B and Gemma 3 270M (K-quant mixes: Q5_0, Q8_0, Q4_K, Q6_K): float32 greedy output
equals transformers' on the same GGUF file, and the fast mode keeps perplexity within 1% of float32.

transformers' greedy tokens are memoised in pytest's cache (keyed by file, transformers version, prompt and
length): loading its reference from GGUF takes about a minute per model on a small CPU, so only the first
run pays for it (`pytest --cache-clear` recomputes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from seriatim import LLM, SamplingParams
from seriatim.bench.quality import TEXT
from seriatim.model.scoring import perplexity
from seriatim.weights.registry import resolve_model
from support.tiers import KERNEL_TIERS, skip_above_machine

pytestmark = pytest.mark.real_model


def installed(name: str) -> Path:
    try:
        return resolve_model(name)
    except ValueError as e:
        pytest.skip(str(e))


def transformers_greedy(request, path: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids` (float32, the same GGUF file), through pytest's cache."""
    import transformers

    digest = hashlib.sha256(repr(ids).encode()).hexdigest()[:16]
    key = f"seriatim/greedy/{path.name}-{path.stat().st_size}/{transformers.__version__}/{digest}-{n}"
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None and (hit := cache.get(key, None)) is not None:
        return hit
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        out = ref.eval().generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    if cache is not None:
        cache.set(key, tokens)
    return tokens


def assert_greedy_equals_transformers(request, path: Path, llm: LLM, ids: list[int], n: int) -> None:
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    assert out.token_ids == transformers_greedy(request, path, ids, n)


def assert_fast_perplexity_within_one_percent(path: Path, reference: LLM, tier, tier_name: str) -> None:
    skip_above_machine(tier_name)
    ids = reference.tokenizer.encode(TEXT)
    tier(tier_name)
    fast = LLM(str(path))  # dtype="auto"
    ppl_fast = perplexity(fast.model, ids, fast.precision.activations, fast.device)
    ppl_ref = perplexity(reference.model, ids, torch.float32, reference.device)
    assert abs(ppl_fast / ppl_ref - 1) < 0.01


@pytest.fixture(scope="module")
def qwen2_path() -> Path:
    return installed("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def qwen2(qwen2_path) -> LLM:
    return LLM(str(qwen2_path), dtype="float32")


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    return installed("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3(gemma3_path) -> LLM:
    return LLM(str(gemma3_path), dtype="float32")


def test_qwen2_greedy_equals_transformers(request, qwen2_path, qwen2):
    ids = qwen2.tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    assert_greedy_equals_transformers(request, qwen2_path, qwen2, ids, 64)


def test_gemma3_greedy_equals_transformers_past_the_window(request, gemma3_path, gemma3):
    """A prompt longer than the 512-token window of the sliding layers, then 32 tokens."""
    ids = gemma3.tokenizer.encode(TEXT + "\n" + TEXT + "\nIn summary,")
    assert len(ids) > gemma3.config.sliding_window
    assert_greedy_equals_transformers(request, gemma3_path, gemma3, ids, 32)


@pytest.mark.parametrize("tier_name", KERNEL_TIERS)
def test_qwen2_fast_mode_perplexity(qwen2_path, qwen2, tier, tier_name):
    assert_fast_perplexity_within_one_percent(qwen2_path, qwen2, tier, tier_name)


@pytest.mark.parametrize("tier_name", KERNEL_TIERS)
def test_gemma3_fast_mode_perplexity(gemma3_path, gemma3, tier, tier_name):
    assert_fast_perplexity_within_one_percent(gemma3_path, gemma3, tier, tier_name)
