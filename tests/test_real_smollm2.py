"""The real SmolLM2-135M-Instruct: greedy output equals transformers' token for token (float32)."""

from __future__ import annotations

import pytest
import torch

from seriatim import LLM, SamplingParams
from support.tiers import KERNEL_TIERS, skip_above_machine

pytestmark = pytest.mark.real_model
N_TOKENS = 64
PROMPTS = [
    "The history of the printing press",
    "def fibonacci(n):",
    "Les chats sont",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return LLM(str(smollm2_gguf_path), dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    ).eval()
    ref.generation_config.eos_token_id = None  # compare all N_TOKENS, even past an end token
    return ref


def reference_greedy(ref, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=0,
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers(smollm2, reference):
    params = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)
    prompts = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    prompts.append(smollm2.chat_prompt([{"role": "user", "content": "Name three colours of the rainbow."}]))
    for ids, out in zip(prompts, smollm2.generate(prompts, params)):
        assert out.token_ids == reference_greedy(reference, ids)


def test_chat_reply_stops_at_end_of_turn(smollm2):
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=128))
    assert out.finish_reason == "stop"
    assert "Paris" in out.text
    assert smollm2.tokenizer.decode(out.token_ids[-1:]) == "<|im_end|>"


def test_stream_is_valid_utf8_on_multilingual_output(smollm2):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=48, ignore_eos=True)
    prompt = smollm2.chat_prompt([{"role": "user", "content": "用中文写一句话，并加上表情符号 😀"}])
    deltas = list(smollm2.stream(prompt, params))
    assert "".join(d.text for d in deltas) == smollm2.generate(prompt, params)[0].text
    assert not any("\ufffd" in d.text for d in deltas)


@pytest.mark.parametrize("tier_name", KERNEL_TIERS)
def test_fast_mode_quality_within_one_percent_perplexity(smollm2_gguf_path, tier_name, tier):
    """At every ISA tier with kernels of its own (each has its own products), run where the machine has it."""
    from seriatim.bench.quality import TEXT
    from seriatim.model.scoring import perplexity

    skip_above_machine(tier_name)
    ppl = {}
    for dtype in ("float32", "auto"):
        tier(tier_name if dtype == "auto" else None)
        llm = LLM(str(smollm2_gguf_path), dtype=dtype)
        ppl[dtype] = perplexity(llm.model, llm.tokenizer.encode(TEXT), llm.precision.activations, llm.device)
    assert abs(ppl["auto"] / ppl["float32"] - 1) < 0.01
