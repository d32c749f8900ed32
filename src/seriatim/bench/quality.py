"""How much the fast mode costs in quality: perplexity and greedy agreement against float32."""

from __future__ import annotations

from dataclasses import dataclass

from ..llm import LLM
from ..model.scoring import perplexity
from ..sampling import SamplingParams

# A fixed multilingual text: prose in several languages, code and numbers.
TEXT = """The history of science covers the development of science from ancient times to the present. It encompasses all three major branches of science: natural, social, and formal. Protoscience, early sciences, and natural philosophies such as alchemy and astrology existed during the Bronze Age, Iron Age, classical antiquity and the Middle Ages.
La Révolution française est une période de bouleversements politiques et sociaux en France, qui commence en 1789 et se termine en 1799. Elle met fin à l'Ancien Régime en remplaçant la monarchie absolue par une monarchie constitutionnelle, puis par la Première République.
Die Geschichte der Mathematik reicht mehrere Jahrtausende zurück. Die ältesten erhaltenen mathematischen Texte stammen aus Mesopotamien und Ägypten; sie behandeln Arithmetik, Algebra und Geometrie für praktische Zwecke wie Handel, Landvermessung und Astronomie.
La inteligencia artificial es un campo de la informática que se ocupa de crear sistemas capaces de realizar tareas que normalmente requieren inteligencia humana, como el reconocimiento de voz, la toma de decisiones y la traducción entre idiomas.
人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。
def quicksort(items):
    if len(items) <= 1:
        return items
    pivot, *rest = items
    return quicksort([x for x in rest if x < pivot]) + [pivot] + quicksort([x for x in rest if x >= pivot])
In 2023, the population of Tokyo was about 14.1 million people, while the Greater Tokyo Area had roughly 37 million inhabitants, making it the most populous metropolitan area in the world.
"""

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
