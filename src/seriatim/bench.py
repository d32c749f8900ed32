"""`seriatim bench`: seriatim against llama.cpp and transformers on the same model file, in one run.

Each engine runs in its own worker process (so peak memory is its own) and
reports load time, prefill rate (512-token prompt), time to first token
(128-token prompt) and greedy batch-1 decode rate (256 tokens), each repeated.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

PREFILL_TOKENS, TTFT_TOKENS, DECODE_TOKENS = 512, 128, 256
ENGINES = ("seriatim", "llama.cpp", "llama.cpp-fa", "transformers-f32", "transformers-bf16")
_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
    "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
    "explanation, and prediction of real-world phenomena. "
)


@dataclass
class Runner:
    """One engine, loaded: `first_token(ids)` and `decode(ids, n)` return seconds."""

    first_token: Callable[[list[int]], float]
    decode: Callable[[list[int], int], float]
    bytes_per_token: int | None = None


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _seriatim(path: str, threads: int) -> Runner:
    from .llm import LLM
    from .sampling import SamplingParams

    llm = LLM(path, threads=threads)

    def decode(ids: list[int], n: int) -> float:
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
        return out.metrics.finished - out.metrics.first_token

    first = lambda ids: llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))[0].metrics.time_to_first_token
    return Runner(first, decode, weight_bytes_read_per_token(llm.model))


def _llama_cpp(path: str, threads: int, flash: bool) -> Runner:
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                flash_attn=flash, verbose=False)

    def run(ids: list[int], n: int) -> tuple[float, float]:
        start = time.perf_counter()
        first = 0.0
        for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == n:
                break
        return first - start, time.perf_counter() - first

    return Runner(lambda ids: run(ids, 1)[0], lambda ids, n: run(ids, n)[1])


def _transformers(path: str, threads: int, dtype: str) -> Runner:
    import os

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype)
    ).eval()
    model.generation_config.eos_token_id = None

    def generate(ids: list[int], n: int) -> float:
        with torch.inference_mode():
            return _timed(lambda: model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                                 pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long)))

    return Runner(lambda ids: generate(ids, 1), lambda ids, n: generate(ids, n) - generate(ids, 1))


def weight_bytes_read_per_token(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row) and rope tables."""
    skip = {id(t) for t in model.rotary.buffers()}
    embed = getattr(model.embed, "weight", None)
    if embed is not None:
        skip.add(id(embed))
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def memory_bandwidth(threads: int) -> float:
    """Read bandwidth in bytes/s: the best of several sums over a buffer much larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MiB
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(8))
    return buf.numel() * 4 / best


def _make_runner(engine: str, path: str, threads: int) -> Runner:
    if engine == "seriatim":
        return _seriatim(path, threads)
    if engine.startswith("llama.cpp"):
        return _llama_cpp(path, threads, flash=engine.endswith("-fa"))
    return _transformers(path, threads, "float32" if engine.endswith("f32") else "bfloat16")


def worker(engine: str, path: str, threads: int, runs: int) -> dict:
    """Measure one engine in this process; returns the raw samples."""
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(path)
    ids = tok.encode(_TEXT * 40, add_special_tokens=False)
    start = time.perf_counter()
    runner = _make_runner(engine, path, threads)
    load = time.perf_counter() - start
    load_to_first = load + runner.first_token(ids[:8])
    result = {"engine": engine, "load_s": load, "load_to_first_token_s": load_to_first,
              "prefill_tok_s": [], "ttft_ms": [], "decode_tok_s": [], "bytes_per_token": runner.bytes_per_token}
    runner.decode(ids[:16], 8)  # warm-up
    for _ in range(runs):
        result["prefill_tok_s"].append(PREFILL_TOKENS / runner.first_token(ids[:PREFILL_TOKENS]))
        result["ttft_ms"].append(1000 * runner.first_token(ids[:TTFT_TOKENS]))
        result["decode_tok_s"].append((DECODE_TOKENS - 1) / runner.decode(ids[:16], DECODE_TOKENS))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _available(engine: str) -> str | None:
    """None if the engine can run, else why not."""
    import importlib.util

    module = {"seriatim": "torch", "llama.cpp": "llama_cpp", "llama.cpp-fa": "llama_cpp"}.get(engine, "transformers")
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install -e '.[bench]' provides {module})"
    return None


def _run_worker(engine: str, path: str, threads: int, runs: int) -> dict:
    cmd = [sys.executable, "-m", "seriatim.bench", "--worker", engine, path, str(threads), str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"engine": engine, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.1f} [{min(samples):.0f}-{max(samples):.0f}]"


def format_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"model {meta['model']}  threads {meta['threads']}  runs {meta['runs']}  "
        f"memory read bandwidth {meta['bandwidth_gb_s']:.1f} GB/s",
        f"{'engine':18} {'decode tok/s':>20} {'prefill tok/s (512)':>22} {'TTFT ms (128)':>20} "
        f"{'peak RSS MB':>12} {'load s':>7} {'load+1st s':>10}",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['engine']:18} skipped: {r['error']}")
            continue
        lines.append(
            f"{r['engine']:18} {_summary(r['decode_tok_s']):>20} {_summary(r['prefill_tok_s']):>22} "
            f"{_summary(r['ttft_ms']):>20} {r['peak_rss_mb']:12.0f} {r['load_s']:7.2f} {r['load_to_first_token_s']:10.2f}"
        )
    ours = next((r for r in results if r["engine"] == "seriatim" and "error" not in r), None)
    if ours is None:
        return "\n".join(lines)
    med = lambda r, k: statistics.median(r[k])
    lines.append("seriatim / peer (higher is better for rates, lower for TTFT and memory):")
    for r in results:
        if r is ours or "error" in r:
            continue
        lines.append(
            f"  vs {r['engine']:16} decode {med(ours, 'decode_tok_s') / med(r, 'decode_tok_s'):5.2f}x  "
            f"prefill {med(ours, 'prefill_tok_s') / med(r, 'prefill_tok_s'):5.2f}x  "
            f"TTFT {med(ours, 'ttft_ms') / med(r, 'ttft_ms'):5.2f}x  RSS {ours['peak_rss_mb'] / r['peak_rss_mb']:5.2f}x"
        )
    floor = meta["bandwidth_gb_s"] * 1e9 / ours["bytes_per_token"]
    lines.append(
        f"bandwidth floor: {ours['bytes_per_token'] / 1e6:.1f} MB of weights per token -> {floor:.0f} tok/s; "
        f"seriatim decode reaches {100 * med(ours, 'decode_tok_s') / floor:.0f}% of it"
    )
    return "\n".join(lines)


def run_bench(model: str, threads: int, runs: int, engines: list[str], as_json: bool) -> None:
    from .registry import resolve_model

    path = str(resolve_model(model))
    meta = {"model": path, "threads": threads, "runs": runs, "bandwidth_gb_s": memory_bandwidth(threads) / 1e9}
    results = []
    for i, engine in enumerate(engines, 1):
        print(f"[{i}/{len(engines)}] {engine} ...", file=sys.stderr, flush=True)
        why_not = _available(engine)
        results.append({"engine": engine, "error": why_not} if why_not else _run_worker(engine, path, threads, runs))
    print(json.dumps({"meta": meta, "results": results}, indent=2) if as_json else format_table(results, meta))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("ENGINE", "PATH", "THREADS", "RUNS"), required=True)
    engine, path, threads, runs = parser.parse_args().worker
    print(json.dumps(worker(engine, path, int(threads), int(runs))))
