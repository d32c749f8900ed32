"""`seriatim bench --concurrency` and `--rows`: what they run, and their tables."""

import pytest

from seriatim.bench.run import format_concurrency, format_rows
from seriatim.bench.worker import closed_loop, steady_lengths
from seriatim.llm import LLM
from seriatim.sampling import SamplingParams


def test_steady_lengths_spread_around_64():
    lengths = steady_lengths(64)
    assert min(lengths) == 32 and max(lengths) == 96 and 60 <= sum(lengths) / len(lengths) <= 68
    assert len(set(lengths[:16])) == 16  # requests in flight together finish at different steps


def test_closed_loop_keeps_the_level_in_flight_and_serves_every_request(tiny_llama, monkeypatch):
    llm = LLM(str(tiny_llama[0] / "Q8_0.gguf"), threads=1, prefix_caching=False)
    engine, in_flight, generated = llm.engine, [], []
    step = engine.step

    def counted_step():
        in_flight.append(len(engine.requests))
        results = step()
        generated.extend(delta for delta, _ in results)
        return results

    monkeypatch.setattr(engine, "step", counted_step)
    prompts = [[1 + i, 2 + i, 3 + i, 4 + i] for i in range(7)]
    lengths = [3, 9, 5, 2, 7, 4, 6]
    seconds, ttft = closed_loop(engine, prompts, lengths, level=3)
    assert seconds > 0 and len(ttft) == 7 and all(t > 0 for t in ttft)
    assert max(in_flight) == 3 and in_flight[0] == 3  # never more than the level, and full from the start
    assert len(generated) == sum(lengths) and not engine.has_unfinished()


def _levels(tok_s: dict, ttft: dict) -> dict:
    return {n: {"tok_s": tok_s[n], "ttft_ms": ttft[n]} for n in tok_s}


def test_concurrency_table_shows_burst_and_steady_ratios():
    ours = {
        "engine": "seriatim",
        "levels": _levels({1: 100.0, 16: 600.0}, {1: 30.0, 16: 180.0}),
        "steady": {1: {"tok_s": 100.0, "ttft_ms": 30.0, "ttft_median_ms": 30.0},
                   16: {"tok_s": 500.0, "ttft_ms": 60.0, "ttft_median_ms": 45.0}},
        "prefix_hit_rate_after_first": 0.96,
    }
    peer = {"engine": "llama.cpp", "levels": _levels({1: 50.0, 16: 50.0}, {1: 200.0, 16: 3000.0})}
    text = format_concurrency([ours, peer, {"engine": "transformers-bf16", "error": "not installed"}],
                              {"model": "m", "device": "cpu", "threads": 2, "runs": 3})
    assert "seriatim at 16: 6.0x the aggregate rate of 1, TTFT 6.0x" in text
    assert "seriatim at 16 in flight: 5.0x the aggregate rate of 1, mean TTFT 2.0x, median TTFT 1.5x" in text
    assert "transformers-bf16: skipped: not installed" in text and "prefix hit rate 96%" in text


@pytest.mark.parametrize("level", [1, 4])
def test_closed_loop_with_fewer_requests_than_the_level(tiny_llama, level):
    llm = LLM(str(tiny_llama[0] / "Q8_0.gguf"), threads=1, prefix_caching=False)
    _, ttft = closed_loop(llm.engine, [[5, 6, 7]] * 2, [2, 3], level)
    assert len(ttft) == 2


def test_rows_feeds_k_tokens_of_one_sequence_per_pass(tiny_llama, monkeypatch):
    """`--rows`: each timed step runs one pass over exactly k new tokens of the one sequence."""
    from seriatim.bench import worker
    from seriatim.engine.engine import Engine

    tokens = []
    original = Engine._forward

    def forward(self, chunks):
        tokens.append([c.length for c in chunks])
        return original(self, chunks)

    monkeypatch.setattr(Engine, "_forward", forward)
    monkeypatch.setattr(worker, "ROWS_SAMPLES", 2)
    result = worker.measure_rows(str(tiny_llama[0] / "Q8_0.gguf"), 1, [1, 3, 8], 1, list(range(5, 200)), "cpu")
    assert list(result["rows"]) == [1, 3, 8] and all(r["ms"] > 0 for r in result["rows"].values())
    assert tokens[0] == [worker.ROWS_PROMPT]  # the prefill, then three passes (one warm-up) per k
    assert tokens[1:] == [[1]] * 3 + [[3]] * 3 + [[8]] * 3


def test_rows_table_gives_each_pass_against_one_token_per_tier():
    avx512 = {"engine": "seriatim", "tier": "avx512", "rows": {"1": {"ms": 4.0}, "2": {"ms": 6.0}, "8": {"ms": 10.0}}}
    avx2 = {"engine": "seriatim", "tier": "avx2", "rows": {"1": {"ms": 20.0}, "2": {"ms": 40.0}, "8": {"ms": 160.0}}}
    failed = {"engine": "seriatim", "tier": "amx", "error": "boom"}
    text = format_rows([failed, avx512, avx2], {"model": "m", "device": "cpu", "threads": 2, "prompt": 128,
                                               "samples": 30})
    assert "tier amx: boom" in text
    assert text.splitlines()[-4:] == [
        "k new tokens         tier avx512           tier avx2",
        "           1       4.00    1.00x      20.00    1.00x",
        "           2       6.00    1.50x      40.00    2.00x",
        "           8      10.00    2.50x     160.00    8.00x",
    ]


def test_prefill_fraction_of_the_matmul_peak_is_printed(tiny_llama):
    """The batch-1 table states prefill's projections in GFLOP/s against the measured matmul peak (bfloat16,
    or float32 on AVX2)."""
    from seriatim.bench.run import format_table
    from seriatim.bench.worker import projection_flops_per_token

    llm = LLM(str(tiny_llama[0] / "Q8_0.gguf"), threads=1)
    flops = projection_flops_per_token(llm.model)
    cfg = llm.config
    per_layer = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    assert flops == 2 * cfg.num_layers * per_layer
    ours = {"engine": "seriatim", "decode_tok_s": [100.0], "prefill_tok_s": [1000.0], "ttft_ms": [50.0],
            "peak_rss_mb": 400, "load_s": 1.0, "load_to_first_token_s": 1.1, "bytes_per_token": 10**8,
            "flops_per_token": 2 * 10**8}
    text = format_table([ours], {"model": "m", "device": "cpu", "threads": 2, "runs": 3, "bandwidth_gb_s": 40.0,
                                 "matmul_gflop_s": 800.0, "matmul_dtype": "bfloat16"})
    assert "matmul peak: 800 GFLOP/s (bfloat16, 2048 x 2048 x 2048); seriatim prefill's projections run at " \
           "200 GFLOP/s, 25% of it" in text


def test_structured_bench_checks_every_output_and_times_each_variant(tiny_llm, monkeypatch):
    """bench --structured's parts on the tiny model: every schema of schemas.json compiles; each output is
    valid, cut off, or counted as the constraint's failure; each decode variant is timed."""
    from seriatim.bench import structured

    cases = structured.schemas()
    assert len(cases) == 20
    times = structured.compile_times(tiny_llm, cases)
    assert 0 < times.p50_ms <= times.p99_ms and times.cached_ms < times.p50_ms
    monkeypatch.setattr(structured, "MAX_TOKENS", 120)
    result = structured.validity(tiny_llm, cases[:4], samples=2)
    assert result.total == 8 and len(result.valid) + len(result.unfinished) == 8 and not result.invalid
    assert result.report()[0].startswith(f"parse and validate: {len(result.valid)}/8")
    rates = structured.decode_rates(tiny_llm, batch=2, runs=1)
    assert list(rates) == ["unconstrained", "free text", "fixed keys"] and min(rates.values()) > 0


def test_speculative_bench_compares_on_the_same_prompts(tiny_llama):
    from seriatim.bench.speculative import format_rows, measure

    path = str(tiny_llama[0] / "hf")
    lookup = {"method": "ngram", "min_n": 1}  # the random model repeats no two-token stretch
    plain, spec = LLM(path, dtype="float32"), LLM(path, dtype="float32", speculative=lookup)
    prompts = ["one two one two one two", "a b a b a b"]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    row = measure(plain, spec, "repeats", prompts, greedy, runs=1)
    assert row.identical and row.tokens == 24 and 0 < row.passes <= 24
    assert row.verifications > 0 and sum(row.accepted_at) == row.accepted
    sampled = measure(plain, spec, "sampled", prompts, SamplingParams(temperature=0.8, seed=0, max_tokens=12), runs=1)
    assert sampled.identical is None and sampled.spec_s > 0
    table = format_rows([row, sampled], 5)
    assert "| repeats | 24 |" in table and "| yes |" in table and "| n/a (sampled) |" in table
