"""Structured output on a real model (`seriatim bench --structured`): how long the 20 real-world schemas of
schemas.json take to compile, whether outputs sampled at temperature 1 parse and validate, and what a
constraint costs decoding, alone and with 16 requests at once (jump-forward included)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ..grammar.compiler import GrammarCompiler
from ..grammar.constraint import Constraint
from ..kernels import isa
from ..llm import LLM
from ..sampling import SamplingParams

SCHEMAS = Path(__file__).with_name("schemas.json")
MAX_TOKENS = 400
# A constraint that forces little: after `{"text": "` every token is sampled, each under the JSON lexer's mask;
# the string's minimum length keeps every request going to max_tokens, as the unconstrained ones do.
FREE_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000, "maxLength": 4000}},
             "required": ["text"]}
# One that forces much: long fixed keys, which jump-forward appends without sampling.
FIXED_KEYS = {"type": "object", "additionalProperties": False, "properties": {
    f"{name}_measurement_recorded_by_the_station": {"type": "integer", "minimum": 0, "maximum": 99}
    for name in ("temperature", "humidity", "pressure", "wind_speed", "visibility", "precipitation")},
    "required": [f"{name}_measurement_recorded_by_the_station" for name in
                 ("temperature", "humidity", "pressure", "wind_speed", "visibility", "precipitation")]}


@dataclass
class Compilation:
    vocabulary_ms: float  # llguidance's view of the vocabulary, once per model
    p50_ms: float
    p99_ms: float
    cached_ms: float  # a request's copy of a compiled schema


def schemas() -> list[dict]:
    return json.loads(SCHEMAS.read_text())


def compile_times(llm: LLM, cases: list[dict]) -> Compilation:
    compiler = GrammarCompiler(llm.tokenizer, llm.config.vocab_size)  # a fresh one: nothing cached
    start = time.perf_counter()
    compiler.compile(Constraint.of("regex", "a"))
    vocabulary = time.perf_counter() - start
    times = []
    for case in cases:
        start = time.perf_counter()
        compiler.compile(Constraint.of("json_schema", case["schema"]))
        times.append(time.perf_counter() - start)
    constraint = Constraint.of("json_schema", cases[0]["schema"])
    cached = []
    for _ in range(20):
        start = time.perf_counter()
        compiler.state(constraint)
        cached.append(time.perf_counter() - start)
    times.sort()
    p99 = times[round(0.99 * (len(times) - 1))]  # nearest rank: with 20 schemas, the slowest
    return Compilation(1e3 * vocabulary, 1e3 * statistics.median(times), 1e3 * p99, 1e3 * statistics.median(cached))


@dataclass
class Validity:
    total: int
    valid: list[str]  # schema-valid outputs (by schema name)
    unfinished: list[str]  # outputs cut off at MAX_TOKENS: what they end with
    invalid: list[str]  # finished outputs that do not parse or validate: the constraint failed

    def report(self) -> list[str]:
        lines = [f"parse and validate: {len(self.valid)}/{self.total} ({100 * len(self.valid) / self.total:.1f}%); "
                 f"of the {self.total - len(self.unfinished)} that finished: {len(self.invalid)} invalid"]
        lines += [f"  cut off at {MAX_TOKENS} tokens: {u}" for u in self.unfinished]
        return lines + [f"  INVALID: {i}" for i in self.invalid]


def validity(llm: LLM, cases: list[dict], samples: int) -> Validity:
    """`samples` outputs per schema, sampled at temperature 1, checked with jsonschema. Numbers are read as
    decimals, as JSON writes them: a float would fail 2.28 against multipleOf 0.01."""
    import jsonschema

    prompts, params = [], []
    for case in cases:
        ask = f"Write one JSON object describing a {case['name'].replace('_', ' ')}."
        prompts += [llm.chat_prompt([{"role": "user", "content": ask}])] * samples
        params += [SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS, json_schema=case["schema"])
                   for s in range(samples)]
    result = Validity(len(prompts), [], [], [])
    for i, out in enumerate(llm.generate(prompts, params)):
        case = cases[i // samples]
        name = f"{case['name']} (seed {i % samples})"
        schema = json.loads(json.dumps(case["schema"]), parse_float=Decimal)
        try:
            instance = json.loads(out.text, parse_float=Decimal)
            jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())
            result.valid.append(name)
        except (ValueError, jsonschema.ValidationError) as e:
            if out.finish_reason == "length":
                result.unfinished.append(f"{name}: ...{out.text[-40:]!r}")
            else:
                result.invalid.append(f"{name}: {str(e).splitlines()[0]}")
    return result


VARIANTS = {"unconstrained": None, "free text": FREE_TEXT, "fixed keys": FIXED_KEYS}


def decode_rates(llm: LLM, batch: int, runs: int) -> dict[str, float]:
    """Output tokens per second of each variant, median of `runs` taken in turn (A/B/C, A/B/C, ...) so that
    the machine's drift falls on all alike: one request's decode rate, or for a batch the aggregate (all
    tokens over the wall time)."""
    prompt = llm.chat_prompt([{"role": "user", "content": "Describe today's weather at the station as JSON."}])
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for run in range(runs):
        for name, schema in VARIANTS.items():
            constraint = {"json_schema": schema} if schema is not None else {"ignore_eos": True}
            params = [SamplingParams(temperature=1.0, seed=run * batch + i, max_tokens=200, **constraint)
                      for i in range(batch)]
            start = time.perf_counter()
            outs = llm.generate([prompt] * batch, params)
            wall = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outs)
            rates[name].append(outs[0].metrics.decode_tokens_per_s if batch == 1 else tokens / wall)
    return {name: statistics.median(r) for name, r in rates.items()}


def run_structured_bench(model: str, threads: int, samples: int, runs: int) -> None:
    llm = LLM(model, threads=threads)
    cases = schemas()
    print(f"seriatim structured output: {model}, {threads} threads, {isa.describe()}")
    c = compile_times(llm, cases)
    print(f"\ncompile, {len(cases)} schemas: p50 {c.p50_ms:.1f} ms, p99 {c.p99_ms:.1f} ms; "
          f"cached {c.cached_ms:.3f} ms; vocabulary (once per model) {c.vocabulary_ms:.0f} ms")
    print(f"[validity: {len(cases)} schemas x {samples} samples at temperature 1 ...]", file=sys.stderr, flush=True)
    print("\n".join(validity(llm, cases, samples).report()))
    print("\n| decode tok/s | unconstrained | JSON, free text (masks only) | JSON, fixed keys (jump-forward) |")
    print("|---|---|---|---|")
    for batch in (1, 16):
        print(f"[decode at batch {batch} ...]", file=sys.stderr, flush=True)
        plain, free, fixed = decode_rates(llm, batch, runs).values()
        print(f"| batch {batch}{' (aggregate)' if batch > 1 else ''} | {plain:.1f} | {free:.1f} "
              f"({100 * (free / plain - 1):+.0f}%) | {fixed:.1f} ({100 * (fixed / plain - 1):+.0f}%) |")
