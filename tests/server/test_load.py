"""Short versions of the load and soak tests (seriatim.bench.load; scripts/soak runs the long ones): a mix
of requests (short and long prompts, streams, n > 1, constrained output, clients hanging up mid-stream)
open-loop at 1x, 2x and 4x the rate the server saturates at, against `seriatim serve` in a child process on
the tiny model with a small queue: every request is answered (200, or 429 once the queue is full), none
gets a 5xx or a broken connection, and afterwards the gauges and the KV cache are back at 0 and resident
memory where a warm-up left it; then 12 s closed-loop without a failure."""

from __future__ import annotations

import pytest

from seriatim.bench.load import load_test, soak
from seriatim.bench.serve import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_llama):
    process = ServerProcess(str(tiny_llama[0] / "hf"), 2, "cpu", ["--max-queue", "16", "--kv-cache-memory", "4M"])
    yield process
    assert process.stop() == 0


def test_load_at_four_times_saturation_loses_nothing(server, capsys):
    ok = load_test(server.url, server.proc.pid, [1, 2, 4], seconds=3, clients=4)
    report = capsys.readouterr().out
    assert ok, report
    assert "429" in report.splitlines()[-1]  # at 4x the queue of 16 filled: the excess was turned away


def test_a_short_soak_has_no_failure(server):
    result = soak(server.url, server.proc.pid, clients=8, seconds=12, warmup=3, window=3)
    assert result.requests > 20 and result.failures == 0, result.summary()
    assert abs(result.drift) <= 0.05 and abs(result.idle_drift) <= 0.05, result.summary()
