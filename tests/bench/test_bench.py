"""`seriatim bench --concurrency`: the closed loop it measures a server's steady state with, and its tables."""

import pytest

from seriatim.bench.run import format_concurrency
from seriatim.bench.worker import closed_loop, steady_lengths
from seriatim.llm import LLM


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
