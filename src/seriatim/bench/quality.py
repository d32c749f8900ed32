"""How much the fast mode costs in quality: perplexity and greedy agreement against float32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..llm import LLM
from ..model.scoring import perplexity
from ..sampling import SamplingParams

# A fixed text: prose in several languages, a dialogue, code and numbers. About 1,300 tokens, so that the
# perplexity ratio of two precisions has a standard error near 0.2% (on the first 400 it was 0.5%, too
# coarse for a 1% bound).
TEXT = Path(__file__).with_name("quality.txt").read_text(encoding="utf-8")

PROMPTS = [
    "The three laws of thermodynamics are",
    "def binary_search(items, target):",
    "Paris est la capitale de",
    "Once upon a time, in a small village,",
]


@dataclass
class QualityReport:
    reference_ppl: float
    fast_ppl: float
    greedy_identical_tokens: float  # fraction of greedy tokens equal to the reference's
    greedy_common_prefix: float  # mean tokens generated before the first divergence
    tokens: int

    def __str__(self) -> str:
        return (
            f"perplexity over {self.tokens} multilingual tokens: float32 {self.reference_ppl:.3f}, "
            f"fast {self.fast_ppl:.3f} ({100 * (self.fast_ppl / self.reference_ppl - 1):+.2f}%); "
            f"greedy agreement: {100 * self.greedy_identical_tokens:.0f}% of tokens identical, "
            f"first divergence after {self.greedy_common_prefix:.0f} tokens on average"
        )


def compare(model: str, new_tokens: int = 64) -> QualityReport:
    reference, fast = LLM(model, dtype="float32"), LLM(model)
    ids = reference.tokenizer.encode(TEXT)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ref_out = [o.token_ids for o in reference.generate(PROMPTS, params)]
    fast_out = [o.token_ids for o in fast.generate(PROMPTS, params)]
    same = [sum(a == b for a, b in zip(r, f)) for r, f in zip(ref_out, fast_out)]
    prefix = [next((i for i, (a, b) in enumerate(zip(r, f)) if a != b), len(r)) for r, f in zip(ref_out, fast_out)]
    return QualityReport(
        reference_ppl=perplexity(reference.model, ids, reference.precision.activations, reference.device),
        fast_ppl=perplexity(fast.model, ids, fast.precision.activations, fast.device),
        greedy_identical_tokens=sum(same) / sum(map(len, ref_out)),
        greedy_common_prefix=sum(prefix) / len(prefix),
        tokens=len(ids),
    )
