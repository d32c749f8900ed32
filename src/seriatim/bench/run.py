"""`seriatim bench`: seriatim against llama.cpp and transformers on the same model file, in one run.

Each engine runs in its own worker process (worker.py, so peak memory
is its own) on the same token ids, and reports load time, prefill rate,
time to first token and greedy batch-1 decode rate, each repeated.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..kernels import isa
from .worker import CONCURRENT_TOKENS, ROWS_PROMPT, ROWS_SAMPLES

# seriatim-variant: batch_invariant=False (the fastest product for each pass; a row's results may then depend
# on its batch); seriatim-deterministic: a pass per request; seriatim-ngram: speculation by prompt lookup.
ENGINES = ("seriatim", "seriatim-variant", "llama.cpp", "llama.cpp-fa", "transformers-f32", "transformers-bf16")
CONCURRENCY_ENGINES = ("seriatim", "seriatim-variant", "seriatim-deterministic", "seriatim-ngram", "transformers-bf16",
                       "llama.cpp")
_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
    "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
    "explanation, and prediction of real-world phenomena. "
)


def memory_bandwidth(threads: int, device: str = "cpu") -> float:
    """Read bandwidth in bytes/s: the best of several sums over a buffer much larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(128 * 1024 * 1024, dtype=torch.float32, device=device)  # 512 MiB
    buf.sum().item()
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        buf.sum().item()  # .item() waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best


def peak_dtype(device: str = "cpu") -> str:
    """The dtype whose matmul peak prefill is measured against: bfloat16 where the CPU multiplies it (AVX-512
    BF16, AMX) or on a GPU; float32 on AVX2, which has no bfloat16 arithmetic."""
    return "bfloat16" if device != "cpu" or isa.tier() >= isa.Tier.AVX512 else "float32"


def matmul_peak(threads: int, device: str = "cpu") -> float:
    """Floating-point operations per second of the best of several large dense matmuls in `peak_dtype`."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, device=device).to(getattr(torch, peak_dtype(device)))
    a @ a  # noqa: B018 - warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        (a @ a).sum().item()  # .item() waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def _model_and_ids(model: str) -> tuple[str, list[int]]:
    """The model's file and the benchmark text as its token ids (the same ids for every engine)."""
    from ..text.tokenizer import Tokenizer
    from ..weights.registry import resolve_model

    path = str(resolve_model(model))
    return path, Tokenizer.from_gguf(path).encode(_TEXT * 40, add_special_tokens=False)


def _available(engine: str) -> str | None:
    """None if the engine can run, else why not."""
    import importlib.util

    module = "torch" if engine.startswith("seriatim") else "llama_cpp" if engine.startswith("llama") else "transformers"
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install -e '.[bench]' provides {module})"
    return None


def _run_worker(engine: str, path: str, threads: int, runs: int | str, ids: list[int], device: str,
                env: dict[str, str] | None = None) -> dict:
    # Run by file path, not as part of the package: a peer's process must not import torch
    # through seriatim, or its memory would be charged with ours.
    cmd = [sys.executable, str(Path(__file__).with_name("worker.py")), engine, path, str(threads), str(runs), device]
    proc = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"engine": engine, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_engines(engines: list[str], path: str, threads: int, runs: int | str, ids: list[int], device: str,
                 what: str) -> list[dict]:
    """Each engine's worker in turn, with progress on stderr; a missing peer is reported, not run."""
    results = []
    for i, engine in enumerate(engines, 1):
        print(f"[{i}/{len(engines)}] {engine}{what} ...", file=sys.stderr, flush=True)
        why_not = _available(engine)
        result = {"engine": engine, "error": why_not} if why_not else None
        results.append(result or _run_worker(engine, path, threads, runs, ids, device))
    return results


def _summary(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.1f} [{min(samples):.0f}-{max(samples):.0f}]"


def format_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"model {meta['model']}  device {meta['device']}  threads {meta['threads']}  runs {meta['runs']}  "
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
            f"{_summary(r['ttft_ms']):>20} {r['peak_rss_mb']:12.0f} {r['load_s']:7.2f} "
            f"{r['load_to_first_token_s']:10.2f}"
        )
    lines += [f"  {r['engine']}: peak GPU memory {r['peak_gpu_mb']:.0f} MB" for r in results if r.get("peak_gpu_mb")]
    ours = next((r for r in results if r["engine"] == "seriatim" and "error" not in r), None)
    if ours is None:
        return "\n".join(lines)

    def med(r, k):
        return statistics.median(r[k])

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
    flops = ours["flops_per_token"] * med(ours, "prefill_tok_s")
    lines.append(
        f"matmul peak: {meta['matmul_gflop_s']:.0f} GFLOP/s ({meta['matmul_dtype']}, 2048 x 2048 x 2048); "
        f"seriatim prefill's "
        f"projections run at {flops / 1e9:.0f} GFLOP/s, {100 * flops / (meta['matmul_gflop_s'] * 1e9):.0f}% of it"
    )
    return "\n".join(lines)


def _report(meta: dict, results: list[dict], as_json: bool, formatter) -> None:
    """The results as JSON, or as the formatter's table under a line naming the CPU and the ISA tier."""
    meta = {"cpu": isa.describe(), **meta}
    print(json.dumps({"meta": meta, "results": results}, indent=2) if as_json
          else f"cpu {meta['cpu']}\n{formatter(results, meta)}")


def run_bench(model: str, threads: int, runs: int, engines: list[str], as_json: bool, device: str = "cpu") -> None:
    path, ids = _model_and_ids(model)
    meta = {"model": path, "device": device, "threads": threads, "runs": runs,
            "bandwidth_gb_s": memory_bandwidth(threads, device) / 1e9,
            "matmul_gflop_s": matmul_peak(threads, device) / 1e9, "matmul_dtype": peak_dtype(device)}
    _report(meta, _run_engines(engines, path, threads, runs, ids, device, ""), as_json, format_table)


def format_rows(results: list[dict], meta: dict) -> str:
    """One pass over k new tokens of one sequence against k = 1, a pair of columns per ISA tier."""
    lines = [f"model {meta['model']}  device {meta['device']}  threads {meta['threads']}  one sequence, "
             f"{meta['prompt']}-token prompt; medians of {meta['samples']} passes; ms per pass and against k = 1"]
    lines += [f"tier {r['tier']}: {r['error']}" for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    if not ok:
        return "\n".join(lines)
    lines.append(f"{'k new tokens':>12} " + " ".join(f"{'tier ' + r['tier']:>19}" for r in ok))
    firsts = [next(iter(r["rows"].values()))["ms"] for r in ok]  # each tier's k = 1 (the first k asked)
    for k in ok[0]["rows"]:
        cells = [f"{r['rows'][k]['ms']:>10.2f} {r['rows'][k]['ms'] / first:>7.2f}x" for r, first in zip(ok, firsts)]
        lines.append(f"{k:>12} " + " ".join(f"{c:>19}" for c in cells))
    return "\n".join(lines)


def run_rows_bench(model: str, threads: int, ks: list[int], runs: int, as_json: bool, device: str = "cpu") -> None:
    """`--rows` at the tier in use and every tier below it down to avx2 (SERIATIM_ISA set for each run)."""
    path, ids = _model_and_ids(model)
    meta = {"model": path, "device": device, "threads": threads, "prompt": ROWS_PROMPT,
            "samples": ROWS_SAMPLES * runs}
    spec = f"rows={','.join(map(str, ks))};{runs}"
    tiers = [t for t in reversed(isa.Tier) if isa.Tier.AVX2 <= t <= isa.tier()]
    results = []
    for i, tier in enumerate(tiers, 1):
        print(f"[{i}/{len(tiers)}] seriatim over k new tokens at tier {tier} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "SERIATIM_ISA": str(tier)}
        results.append({**_run_worker("seriatim", path, threads, spec, ids, device, env), "tier": str(tier)})
    _report(meta, results, as_json, format_rows)


def _per_level(engines: list[dict], levels: list[int], key: str, cell, width: int) -> list[str]:
    """A table with a row per level and a column per engine: cell(engine[key][level])."""
    lines = [f"{'requests':>8} " + " ".join(f"{r['engine']:>{width}}" for r in engines)]
    lines += [f"{level:>8} " + " ".join(f"{cell(r[key][level]):>{width}}" for r in engines) for level in levels]
    return lines


def _ratios(ours: dict, levels: list[int], describe) -> list[str]:
    """describe(level, figures at level, figures at the first level) for every level after the first."""
    return [describe(level, ours[level], ours[levels[0]]) for level in levels[1:]]


def format_concurrency(results: list[dict], meta: dict) -> str:
    ok = [r for r in results if "error" not in r]
    levels = list(ok[0]["levels"]) if ok else []
    lines = [f"model {meta['model']}  device {meta['device']}  threads {meta['threads']}  "
             f"{CONCURRENT_TOKENS} new tokens per request, all submitted at once; medians of {meta['runs']} runs "
             "(aggregate tok/s | mean TTFT ms)"]
    lines += _per_level(ok, levels, "levels", lambda f: f"{f['tok_s']:13.1f} | {f['ttft_ms']:9.0f} ms", 28)
    lines += [f"{r['engine']}: skipped: {r['error']}" for r in results if "error" in r]
    ours = next((r for r in ok if r["engine"] == "seriatim"), None)
    if ours:
        lines += _ratios(ours["levels"], levels, lambda level, at, one: (
            f"seriatim at {level}: {at['tok_s'] / one['tok_s']:.1f}x the aggregate rate of {levels[0]}, "
            f"TTFT {at['ttft_ms'] / one['ttft_ms']:.1f}x"))
        lines.append(f"shared 400-token system prompt, 15 requests after the first: prefix hit rate "
                     f"{100 * ours['prefix_hit_rate_after_first']:.0f}%")
    return "\n".join(lines + _format_steady(ok, levels))


def _format_steady(ok: list[dict], levels: list[int]) -> list[str]:
    """The closed-loop table: `level` requests kept in flight (a server's steady state)."""
    steady = [r for r in ok if "steady" in r]
    if not steady:
        return []
    lines = ["", "steady state: N requests kept in flight, the next submitted as one finishes, 4N requests "
             "(at least 16) of 32-96 new tokens (aggregate tok/s | mean, median TTFT ms)"]
    lines += _per_level(steady, levels, "steady",
                        lambda f: f"{f['tok_s']:10.1f} | {f['ttft_ms']:6.0f}, {f['ttft_median_ms']:4.0f} ms", 34)
    ours = next((r for r in steady if r["engine"] == "seriatim"), None)
    if ours:
        lines += _ratios(ours["steady"], levels, lambda level, at, one: (
            f"seriatim at {level} in flight: {at['tok_s'] / one['tok_s']:.1f}x the aggregate rate of {levels[0]}, "
            f"mean TTFT {at['ttft_ms'] / one['ttft_ms']:.1f}x, median TTFT "
            f"{at['ttft_median_ms'] / one['ttft_median_ms']:.1f}x"))
    return lines


def run_concurrency_bench(model: str, threads: int, levels: list[int], runs: int, engines: list[str], as_json: bool,
                          device: str = "cpu") -> None:
    path, ids = _model_and_ids(model)
    meta = {"model": path, "device": device, "threads": threads, "levels": levels, "runs": runs}
    spec = f"concurrency={','.join(map(str, levels))};{runs}"
    results = _run_engines(engines, path, threads, spec, ids, device, f" at {', '.join(map(str, levels))} concurrent")
    _report(meta, results, as_json, format_concurrency)


def run_serve_bench(model: str, threads: int, levels: list[int], as_json: bool, device: str = "cpu") -> None:
    from .serve import format_serve, measure_server

    path, ids = _model_and_ids(model)
    prompt_tokens = 64
    prompts = [ids[7 * i : 7 * i + prompt_tokens] for i in range(64)]  # distinct, so no prefix is reused
    meta = {"cpu": isa.describe(), "model": path, "device": device, "threads": threads, "prompt_tokens": prompt_tokens}
    result = measure_server(path, threads, device, levels, prompts)
    text = f"cpu {meta['cpu']}\n{format_serve(result, meta)}"
    print(json.dumps({"meta": meta, **result}, indent=2) if as_json else text)
