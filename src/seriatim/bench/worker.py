"""One engine's measurements, in a process of its own: `python worker.py ENGINE PATH THREADS RUNS DEVICE`.

Token ids arrive as JSON on stdin; results leave as JSON on stdout. Only the
measured engine is imported, so peak memory is that engine's alone.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

PREFILL_TOKENS, TTFT_TOKENS, DECODE_TOKENS = 512, 128, 256
CONCURRENT_PROMPT, CONCURRENT_TOKENS = 64, 64  # per request, in the concurrency benchmark
STEADY_REQUESTS_PER_SLOT = 4  # the closed loop serves this many requests per slot in flight
ROWS_PROMPT, ROWS_SAMPLES = 128, 10  # `--rows`: the sequence's prompt, and passes timed per k and run


@dataclass
class Runner:
    """One engine, loaded: `first_token(ids)` and `decode(ids, n)` return seconds."""

    first_token: Callable[[list[int]], float]
    decode: Callable[[list[int], int], float]
    bytes_per_token: int | None = None
    flops_per_token: int | None = None  # of a prompt token's projections
    # All prompts submitted at once, `n` tokens each: (seconds until all are done, mean time to first token).
    batch: Callable[[list[list[int]], int], tuple[float, float]] | None = None
    # A closed loop: `level` requests in flight, prompt i generating lengths[i] tokens, the next prompt
    # submitted as one finishes -> (seconds until all are done, each request's time to first token).
    steady: Callable[[list[list[int]], list[int], int], tuple[float, list[float]]] | None = None


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _seriatim(path: str, threads: int, device: str, deterministic: bool, batch_invariant: bool,
              speculative: str | None = None) -> Runner:
    from seriatim.llm import LLM
    from seriatim.sampling import SamplingParams

    # No prefix caching: every run must compute its prompt.
    llm = LLM(path, threads=threads, device=device, prefix_caching=False, deterministic=deterministic,
              batch_invariant=batch_invariant, speculative=speculative)

    def decode(ids: list[int], n: int) -> float:
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
        return out.metrics.finished - out.metrics.first_token

    def batch(prompts: list[list[int]], n: int) -> tuple[float, float]:
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - start, sum(o.metrics.first_token - start for o in outs) / len(outs)

    def first(ids):
        return llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))[0].metrics.time_to_first_token

    # The steady state is measured for the default mode only: at 64 in flight it would take minutes serialised.
    steady = None if deterministic else functools.partial(closed_loop, llm.engine)
    return Runner(first, decode, llm.model.bytes_per_token(), projection_flops_per_token(llm.model),
                  batch, steady)


def closed_loop(engine, prompts: list[list[int]], lengths: list[int], level: int) -> tuple[float, list[float]]:
    """Greedy requests through `engine`, `level` in flight: prompt i generates lengths[i] tokens, and the
    next prompt is submitted as soon as a request finishes -> (seconds, each request's time to first token)."""
    from seriatim.sampling import SamplingParams

    queue, submitted, ttft = list(zip(prompts, lengths)), {}, {}

    def submit() -> None:
        ids, n = queue.pop(0)
        rid = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        submitted[rid] = time.perf_counter()

    start = time.perf_counter()
    for _ in range(min(level, len(queue))):
        submit()
    while engine.has_unfinished():
        for _, seq in engine.step():
            ttft.setdefault(seq.request_id, time.perf_counter() - submitted[seq.request_id])
            if seq.finished and queue:
                submit()
    return time.perf_counter() - start, list(ttft.values())


def _llama_cpp(path: str, threads: int, device: str, flash: bool) -> Runner:
    from llama_cpp import Llama, llama_supports_gpu_offload

    if device == "cuda" and not llama_supports_gpu_offload():
        raise SystemExit("this llama-cpp-python is a CPU-only build")
    llm = Llama(path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                flash_attn=flash, n_gpu_layers=-1 if device == "cuda" else 0, verbose=False)

    def run(ids: list[int], n: int) -> tuple[float, float]:
        llm.reset()  # otherwise llama-cpp-python reuses a cached prompt prefix and skips the prefill
        start = time.perf_counter()
        first = 0.0
        for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == n:
                break
        return first - start, time.perf_counter() - first

    def batch(prompts: list[list[int]], n: int) -> tuple[float, float]:
        """llama-cpp-python serves one request at a time: the queue is worked through in order."""
        start, firsts = time.perf_counter(), []
        for ids in prompts:
            queued = time.perf_counter() - start
            firsts.append(queued + run(ids, n)[0])
        return time.perf_counter() - start, sum(firsts) / len(firsts)

    return Runner(lambda ids: run(ids, 1)[0], lambda ids, n: run(ids, n)[1], batch=batch)


def _transformers(path: str, threads: int, device: str, dtype: str) -> Runner:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype)
    ).to(device).eval()
    model.generation_config.eos_token_id = None

    def generate_timed(ids: torch.Tensor, mask: torch.Tensor, n: int) -> float:
        # `.tolist()` waits for the GPU, so the time covers the work, not just its launch.
        return _timed(lambda: model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                                             do_sample=False, pad_token_id=0).tolist())

    def generate(ids: list[int], n: int) -> float:
        with torch.inference_mode():
            return generate_timed(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), n)

    def batch(prompts: list[list[int]], n: int) -> tuple[float, float]:
        """One padded batch (left padding), as `generate` serves several prompts."""
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def run(k):
            return generate_timed(ids, mask, k)

        with torch.inference_mode():
            return run(n), run(1)

    return Runner(lambda ids: generate(ids, 1), lambda ids, n: generate(ids, n) - generate(ids, 1), batch=batch)


def projection_flops_per_token(model) -> int:
    """Floating-point operations of one prompt token's projections (2 per multiply-add of qkv, o, gate_up
    and down in every layer); attention and the head, which a prefill computes for one token, left out."""
    projections = [m for layer in model.layers for m in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up,
                                                           layer.mlp.down)]
    return sum(2 * m.in_features * m.out_features for m in projections)


def _make_runner(engine: str, path: str, threads: int, device: str) -> Runner:
    if engine.startswith("seriatim"):
        return _seriatim(path, threads, device, deterministic=engine.endswith("-deterministic"),
                         batch_invariant=not engine.endswith("-variant"),
                         speculative="ngram" if engine.endswith("-ngram") else None)
    if engine.startswith("llama.cpp"):
        return _llama_cpp(path, threads, device, flash=engine.endswith("-fa"))
    return _transformers(path, threads, device, "float32" if engine.endswith("f32") else "bfloat16")


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (this one's by default). Not getrusage: Linux carries ru_maxrss
    across exec, so a worker would inherit the parent's peak; VmHWM belongs to the new address space alone."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def peak_gpu_mb() -> float | None:
    """Peak GPU memory held by PyTorch's allocator in this process, if it used CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_reserved() / 2**20


def measure(engine: str, path: str, threads: int, runs: int, ids: list[int], device: str) -> dict:
    """Load `engine` and time it on `ids`; returns the raw samples."""
    start = time.perf_counter()
    runner = _make_runner(engine, path, threads, device)
    load = time.perf_counter() - start
    load_to_first = load + runner.first_token(ids[:8])
    result = {"engine": engine, "load_s": load, "load_to_first_token_s": load_to_first,
              "prefill_tok_s": [], "ttft_ms": [], "decode_tok_s": [], "bytes_per_token": runner.bytes_per_token,
              "flops_per_token": runner.flops_per_token}
    runner.decode(ids[:16], 8)  # warm-up
    for _ in range(runs):
        result["prefill_tok_s"].append(PREFILL_TOKENS / runner.first_token(ids[:PREFILL_TOKENS]))
        result["ttft_ms"].append(1000 * runner.first_token(ids[:TTFT_TOKENS]))
        result["decode_tok_s"].append((DECODE_TOKENS - 1) / runner.decode(ids[:16], DECODE_TOKENS))
    result["peak_rss_mb"], result["peak_gpu_mb"] = peak_rss_mb(), peak_gpu_mb()
    return result


def measure_concurrency(engine: str, path: str, threads: int, levels: list[int], runs: int, ids: list[int],
                        device: str) -> dict:
    """Aggregate decode rate and mean time to first token with `level` requests submitted at once, and
    (engines that serve a queue) with `level` kept in flight: the medians of `runs` repetitions, with
    the samples."""
    runner = _make_runner(engine, path, threads, device)
    prompts = [ids[7 * i : 7 * i + CONCURRENT_PROMPT] for i in range(STEADY_REQUESTS_PER_SLOT * max(levels))]
    runner.batch(prompts[:2], 4)  # warm-up
    result = {"engine": engine, "levels": {}}
    for level in levels:
        samples = [runner.batch(prompts[:level], CONCURRENT_TOKENS) for _ in range(runs)]
        tok_s = [level * CONCURRENT_TOKENS / seconds for seconds, _ in samples]
        ttft_ms = [1000 * ttft for _, ttft in samples]
        result["levels"][level] = {"tok_s": statistics.median(tok_s), "ttft_ms": statistics.median(ttft_ms),
                                   "tok_s_samples": tok_s, "ttft_ms_samples": ttft_ms}
    if runner.steady is not None:
        result["steady"] = {level: _steady(runner.steady, prompts, level, runs) for level in levels}
    if engine == "seriatim":
        result.update(_shared_prefix(path, threads, ids, device))
    return result


def measure_rows(path: str, threads: int, ks: list[int], runs: int, ids: list[int], device: str) -> dict:
    """Milliseconds of one engine step that feeds k new tokens of one sequence, for each k: its cache rolled
    back k - 1 positions first, as a speculative verification pass is fed (k = 1: a plain decode). The
    step's logits are the last position's only. Medians of ROWS_SAMPLES x `runs` passes."""
    from seriatim.llm import LLM
    from seriatim.sampling import SamplingParams

    llm = LLM(path, threads=threads, device=device, prefix_caching=False)
    engine = llm.engine
    rid = engine.add_request(ids[:ROWS_PROMPT], SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True))
    seq = engine.requests[rid]
    while not seq.output_ids:  # the prefill
        engine.step()
    result = {"engine": "seriatim", "rows": {}}
    for k in ks:
        samples = []
        for _ in range(1 + ROWS_SAMPLES * runs):  # the first is a warm-up
            engine.scheduler.truncate(seq, seq.length - k)
            samples.append(_timed(engine.step))
        result["rows"][k] = {"ms": 1000 * statistics.median(samples[1:]), "samples_ms": [1000 * t for t in samples[1:]]}
    engine.abort(rid)
    return result


def steady_lengths(count: int) -> list[int]:
    """New tokens per request in the closed loop: 32 to 96 (mean ~64), spread so that requests finish at
    different steps and new ones arrive while others decode, as in a server's steady state."""
    return [32 + (37 * i) % 65 for i in range(count)]


def _steady(steady: Callable, prompts: list[list[int]], level: int, runs: int) -> dict:
    """`level` requests in flight through STEADY_REQUESTS_PER_SLOT x level requests (at least 16)."""
    count = max(16, STEADY_REQUESTS_PER_SLOT * level)
    lengths = steady_lengths(count)
    samples = [steady(prompts[:count], lengths, level) for _ in range(runs)]
    tok_s = [sum(lengths) / seconds for seconds, _ in samples]
    mean_ms = [1000 * statistics.fmean(t) for _, t in samples]
    median_ms = [1000 * statistics.median(t) for _, t in samples]
    return {"requests": count, "tok_s": statistics.median(tok_s), "ttft_ms": statistics.median(mean_ms),
            "ttft_median_ms": statistics.median(median_ms), "tok_s_samples": tok_s, "ttft_ms_samples": mean_ms}


def _shared_prefix(path: str, threads: int, ids: list[int], device: str) -> dict:
    """16 requests sharing a 400-token system prompt: how much prefill the prefix cache saves."""
    from seriatim.llm import LLM
    from seriatim.sampling import SamplingParams

    llm = LLM(path, threads=threads, device=device)
    system, params = ids[:400], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(system + ids[1000:1016], params)
    stats = llm.engine.scheduler.blocks.stats
    queried, hits = stats.queried_tokens, stats.hit_tokens
    llm.generate([system + ids[1016 + 16 * i : 1032 + 16 * i] for i in range(15)], params)
    return {"prefix_hit_rate_after_first": (stats.hit_tokens - hits) / (stats.queried_tokens - queried)}


if __name__ == "__main__":
    engine, path, threads, runs, device = sys.argv[1:6]
    stdin = json.load(sys.stdin)
    if runs.startswith("concurrency="):  # concurrency=LEVELS;REPEATS
        levels, repeats = runs.removeprefix("concurrency=").split(";")
        print(json.dumps(measure_concurrency(engine, path, int(threads), [int(x) for x in levels.split(",")],
                                             int(repeats), stdin, device)))
    elif runs.startswith("rows="):  # rows=KS;REPEATS
        ks, repeats = runs.removeprefix("rows=").split(";")
        print(json.dumps(measure_rows(path, int(threads), [int(x) for x in ks.split(",")], int(repeats), stdin,
                                      device)))
    else:
        print(json.dumps(measure(engine, path, int(threads), int(runs), stdin, device)))
