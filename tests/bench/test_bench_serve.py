"""`seriatim bench --serve`: a real server process under bounded load from streaming clients."""

from __future__ import annotations

from seriatim.bench.serve import format_serve, measure_server


def test_serve_bench_completes_every_request_and_shuts_down_cleanly(tiny_llama):
    path = str(tiny_llama[0] / "Q8_0.gguf")
    prompts = [[5 + i, 17, 23 + i, 40] for i in range(8)]
    result = measure_server(path, 1, "cpu", [1, 3], prompts, max_tokens=5)
    one, three = result["levels"]
    assert (one["clients"], one["requests"], three["requests"]) == (1, 8, 6)
    assert one["errors"] == three["errors"] == 0
    assert one["tokens"] == 8 * 5 and three["tokens"] == 6 * 5  # usage counts every generated token
    assert one["tokens_per_s"] > 0 and one["ttft_ms_median"] > 0
    assert result["exit_code"] == 0
    table = format_serve(result, {"model": path, "device": "cpu", "threads": 1, "prompt_tokens": 4})
    assert "req/s" in table and "exit code after SIGTERM 0" in table
