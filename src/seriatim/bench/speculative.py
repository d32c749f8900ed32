"""`seriatim bench --speculative`: plain decoding and each speculation method (prompt lookup, lookahead, and
with `--draft` a draft model) on the same prompts, in one run: target passes per token, drafts kept per
verification and by position, the speedup in time per token, and whether the greedy outputs were identical."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

from ..kernels import isa
from ..llm import LLM
from ..sampling import SamplingParams

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
PASSAGE = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses "
           "seven million square kilometres, of which five and a half million square kilometres are covered "
           "by the rainforest. The region includes territory belonging to nine nations; the majority of the "
           "forest, 60%, is contained within Brazil, followed by Peru with 13%, and Colombia with 10%.")
PROMPTS = {
    "input-grounded": [
        f"Rename the function to rolling_mean and the variable total to running_sum. Return the full code.\n\n{CODE}",
        f"Add a docstring to this function and return the whole function.\n\n{CODE}",
        f"Quote the sentences of this passage that mention percentages, word for word.\n\n{PASSAGE}",
    ],
    "code": ["Write a Python class for a stack with push, pop, peek and is_empty methods.",
             "Write a Python function that parses a CSV line with quoted fields."],
    "chat": ["What should I pack for a week of hiking in the mountains?",
             "Explain why the sky is blue to a ten-year-old."],
}


@dataclass
class Row:
    prompts: str
    tokens: int
    passes: int
    verifications: int
    accepted: int
    accepted_at: list[int]
    plain_s: float  # seconds per token
    spec_s: float
    identical: bool | None  # None: sampled, where the draws differ by design
    draft_share: float  # of the speculating engine's time, in a draft model's passes


def measure(plain: LLM, spec: LLM, name: str, prompts: list[str], params: SamplingParams, runs: int) -> Row:
    ids = [plain.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    stats = spec.engine.stats
    before = (stats.steps, stats.verifications, stats.accepted, list(stats.accepted_at), stats.generated_tokens,
              stats.draft_seconds)
    plain_s, spec_s, identical, spec_total = [], [], True, 0.0
    for _ in range(runs):  # one prompt at a time, plain and speculative in turn
        for p in ids:
            start = time.perf_counter()
            a = plain.generate(p, params)[0]
            plain_s.append((time.perf_counter() - start) / len(a.token_ids))
            start = time.perf_counter()
            b = spec.generate(p, params)[0]
            spec_total += time.perf_counter() - start
            spec_s.append((time.perf_counter() - start) / len(b.token_ids))
            identical &= a.token_ids == b.token_ids
    at = [n - (before[3][i] if i < len(before[3]) else 0) for i, n in enumerate(stats.accepted_at)]
    return Row(name, (stats.generated_tokens - before[4]) // runs, (stats.steps - before[0]) // runs,
               (stats.verifications - before[1]) // runs, (stats.accepted - before[2]) // runs, [n // runs for n in at],
               statistics.median(plain_s), statistics.median(spec_s), identical if params.greedy else None,
               (stats.draft_seconds - before[5]) / spec_total)


def format_rows(rows: list[Row], k: int) -> str:
    lines = ["| prompts | tokens | target passes per token | drafts kept per verification | kept by position "
             f"(1..{k}) | drafting's share of time | speedup (time per token) | greedy output identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by_position = " / ".join(f"{n / max(r.verifications, 1):.2f}" for n in (r.accepted_at + [0] * k)[:k])
        same = "n/a (sampled)" if r.identical is None else "yes" if r.identical else "NO"
        lines.append(f"| {r.prompts} | {r.tokens} | {r.passes / r.tokens:.2f} | "
                     f"{r.accepted / max(r.verifications, 1):.2f} | {by_position} | {r.draft_share:.0%} | "
                     f"{r.plain_s / r.spec_s:.2f}x | "
                     f"{same} |")
    return "\n".join(lines)


METHODS = {"lookup": "ngram", "lookahead": "lookahead", "lookup, fixed k": {"method": "ngram", "adaptive": False}}


def run_speculative_bench(model: str, threads: int, runs: int, draft: str | None = None, temperature: float = 0.0,
                          max_tokens: int = 128) -> None:
    """`draft`: also a draft model's speculation; `temperature` > 0: sampled requests (seeded), timed per token."""
    drafting = {"draft model": {"method": "draft", "model": draft},
                "draft model, first 64k ids": {"method": "draft", "model": draft, "draft_vocab": 65536}}
    methods = dict(METHODS) | (drafting if draft else {})
    # No prefix caching: every run computes its prompt, so plain and speculative passes compare like with like.
    plain = LLM(model, threads=threads, prefix_caching=False)
    llms = {name: LLM(model, threads=threads, prefix_caching=False, speculative=spec) for name, spec in methods.items()}
    k = next(iter(llms.values())).engine.speculation.k
    params = SamplingParams(temperature=temperature, seed=0, max_tokens=max_tokens)
    print(f"seriatim speculative decoding: {model}, {', '.join(methods)} (k up to {k}"
          f"{f'; draft model {draft}' if draft else ''}), temperature {temperature}, {max_tokens} tokens per "
          f"prompt, {threads} threads, medians of {runs}; {isa.describe()}")
    rows = []
    for name, prompts in PROMPTS.items():
        for method, spec in llms.items():
            print(f"[{name}, {method} ...]", file=sys.stderr, flush=True)
            rows.append(measure(plain, spec, f"{name} ({method})", prompts, params, runs))
    print(format_rows(rows, k))
