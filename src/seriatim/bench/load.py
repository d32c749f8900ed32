"""Load and soak tests of `seriatim serve`, as hostile traffic looks: a mix of short and long prompts, streams,
several choices, constrained output and clients that hang up, sent open-loop at multiples of the rate the
server saturates at, then a closed loop for minutes. What must hold: every request gets an answer (200, or
429 beyond `--max-queue`), never a 5xx or a dropped connection; afterwards the running and waiting gauges
and the KV cache go back to idle and resident memory to what it was; over a soak, memory does not drift
and time to first token does not degrade.

`python -m seriatim.bench.load --model M` (scripts/soak) runs the whole program; the test suite runs a short
one. Clients are httpx's (the test extra); the server is a child process on a free 127.0.0.1 port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.async_engine import RELEASE_AFTER_IDLE_S
from .serve import ServerProcess

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}}, "required": ["name", "age"]}
WORDS = ["the", "model", "reads", "a", "prompt", "and", "writes", "one", "token", "after", "another", "until",
         "it", "stops"]


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status; 0: the connection failed or the stream broke
    ttft: float | None = None  # seconds to the first streamed text, for streams
    error: str = ""


@dataclass
class Tally:
    """Outcomes of a phase: statuses by request kind, and what went wrong."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failures(self) -> list[Outcome]:
        """Anything but an answer or a full queue's 429: a 5xx, a broken connection, a malformed stream."""
        return [o for o in self.outcomes if o.status not in (200, 429)]

    def ttfts(self) -> list[float]:
        return sorted(o.ttft for o in self.outcomes if o.ttft is not None)

    def summary(self) -> str:
        statuses = Counter(o.status for o in self.outcomes)
        ttfts = self.ttfts()
        p99 = f", TTFT p50 {1000 * _pct(ttfts, 0.5):.0f} ms p99 {1000 * _pct(ttfts, 0.99):.0f} ms" if ttfts else ""
        first = f"; first failure: {self.failures[0]}" if self.failures else ""
        return f"{len(self.outcomes)} requests, statuses {dict(statuses)}{p99}{first}"


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass(frozen=True)
class Served:
    model: str  # the id clients send
    context: int  # tokens

    @classmethod
    def at(cls, url: str) -> Served:
        import httpx

        entry = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        return cls(entry["id"], entry["max_model_len"])


def request_mix(rng: random.Random, served: Served) -> tuple[str, str, dict]:
    """One request of the mix: (kind, path, body). A long prompt takes about a quarter of the context (a
    word is one to four tokens), at most 300 words."""
    kind = rng.choice(["short", "long", "stream", "chat", "choices", "abort", "constrained"])
    model = served.model
    completion = {"model": model, "prompt": _prompt(rng, 8), "max_tokens": 16, "temperature": 0.8}
    if kind == "long":
        completion |= {"prompt": _prompt(rng, min(300, served.context // 16)), "max_tokens": 8}
    if kind in ("stream", "abort"):
        completion |= {"stream": True, "max_tokens": 32}
    if kind == "choices":
        completion |= {"n": 3}
    if kind in ("chat", "constrained"):
        chat = {"model": model, "messages": [{"role": "user", "content": _prompt(rng, 12)}], "max_tokens": 24,
                "stream": True}
        if kind == "constrained":
            chat |= {"stream": False, "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "p", "schema": SCHEMA}}}
        return kind, "/v1/chat/completions", chat
    return kind, "/v1/completions", completion


async def send(client, kind: str, path: str, body: dict) -> Outcome:
    start = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await client.post(path, json=body)
            return Outcome(kind, r.status_code, error="" if r.status_code in (200, 429) else r.text[:200])
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return Outcome(kind, r.status_code, error=(await r.aread())[:200].decode(errors="replace"))
            ttft = None
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: {") and _has_text(json.loads(line[6:])):
                    ttft = time.perf_counter() - start
                    if kind == "abort":
                        return Outcome(kind, 200, ttft)  # hang up mid-stream: the server must abort it
                if line == "data: [DONE]":
                    return Outcome(kind, 200, ttft)
            return Outcome(kind, 0, ttft, "the stream ended without [DONE]")
    except Exception as e:  # noqa: BLE001 - every client-side failure is an outcome to report
        return Outcome(kind, 0, error=f"{type(e).__name__}: {e}")


def _has_text(chunk: dict) -> bool:
    choice = (chunk.get("choices") or [{}])[0]
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def open_loop(url: str, rate: float, seconds: float, seed: int) -> Tally:
    """Requests arriving at `rate` per second (Poisson), whatever the server's pace, for `seconds`."""
    import httpx

    rng, tally, tasks, served = random.Random(seed), Tally(), [], Served.at(url)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(send(client, *request_mix(rng, served))))
            await asyncio.sleep(rng.expovariate(rate))
        tally.outcomes = list(await asyncio.gather(*tasks))
    return tally


async def closed_loop(url: str, clients: int, seconds: float, seed: int, windows: float = 60.0) -> list[Tally]:
    """`clients` each sending the mix back to back for `seconds`; one tally per `windows` seconds."""
    import httpx

    start, served = time.perf_counter(), Served.at(url)
    tallies = [Tally() for _ in range(max(1, int(seconds // windows)))]

    async def client_loop(c: int, client) -> None:
        rng = random.Random(seed * 1000 + c)
        while (now := time.perf_counter() - start) < seconds:
            outcome = await send(client, *request_mix(rng, served))
            tallies[min(int(now // windows), len(tallies) - 1)].outcomes.append(outcome)

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
    return tallies


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def gauges(url: str) -> dict[str, float]:
    """The server's idle-relevant /metrics values."""
    import httpx

    wanted = ("seriatim_requests_running", "seriatim_requests_waiting", "seriatim_kv_cache_usage_ratio")
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def wait_idle(url: str, timeout: float = 120.0) -> dict[str, float]:
    """The gauges once every request has left the engine (or at `timeout`), and a moment more: an idle
    engine hands freed memory back after a second (async_engine.RELEASE_AFTER_IDLE_S)."""
    end = time.perf_counter() + timeout
    while True:
        values = gauges(url)
        if not any(values.values()) or time.perf_counter() > end:
            time.sleep(2 * RELEASE_AFTER_IDLE_S)
            return values
        time.sleep(0.2)


def saturating_rate(url: str, clients: int, seconds: float) -> float:
    """Requests per second the server completes with `clients` sending back to back."""
    tally = asyncio.run(closed_loop(url, clients, seconds, seed=0, windows=seconds))[0]
    return len(tally.outcomes) / seconds


def load_test(url: str, pid: int, multiples: list[float], seconds: float, clients: int) -> bool:
    """Open-loop load at each multiple of the saturating rate; True when nothing failed and the server went
    back to idle after each: gauges at 0, resident memory within 10% of its value after a warm-up at the
    highest multiple (freed memory stays with the process, and the KV pool's pages are touched as first used,
    so "idle" is the high-water mark of that load, and growth beyond it is a leak)."""
    rate = saturating_rate(url, clients, seconds)
    asyncio.run(open_loop(url, max(multiples) * rate, seconds, seed=1))
    wait_idle(url)
    idle_rss = rss_mb(pid)
    print(f"saturating rate: {rate:.2f} requests/s ({clients} closed-loop clients); RSS after a warm-up at "
          f"{max(multiples):g}x: {idle_rss:.0f} MB", flush=True)
    ok = True
    for multiple in multiples:
        tally = asyncio.run(open_loop(url, multiple * rate, seconds, seed=int(multiple * 10)))
        idle = wait_idle(url)
        rss = rss_mb(pid)
        clean = not tally.failures and not any(idle.values()) and rss <= 1.1 * idle_rss
        print(f"{multiple:g}x ({multiple * rate:.2f}/s for {seconds:g} s): {tally.summary()}; after: gauges "
              f"{idle}, RSS {rss:.0f} MB -> {'ok' if clean else 'FAILED'}", flush=True)
        ok &= clean
    return ok


@dataclass
class Soak:
    requests: int
    failures: int
    rss_mb: tuple[float, float]  # under load, medians: the first window after the warm-up, the last window
    idle_rss_mb: tuple[float, float]  # idle (freed memory handed back): before the soak, after it
    p99_ttft: list[float]  # seconds, by window after the warm-up

    @property
    def drift(self) -> float:
        """Resident memory under load in the last window against the first after the warm-up."""
        return _change(self.rss_mb)

    @property
    def idle_drift(self) -> float:
        """Idle resident memory (freed memory handed back) after the soak against before it: what the soak
        left behind, which a leak would raise."""
        return _change(self.idle_rss_mb)

    @property
    def passed(self) -> bool:
        """No failure, resident memory within 5% under load and idle, and the last window's p99 time to first
        token within 1.5x of the first's."""
        stable = bool(self.p99_ttft) and self.p99_ttft[-1] <= 1.5 * self.p99_ttft[0]
        return self.failures == 0 and abs(self.drift) <= 0.05 and abs(self.idle_drift) <= 0.05 and stable

    def summary(self) -> str:
        return (f"soak: {self.requests} requests, {self.failures} failures; RSS under load (window medians) "
                f"{self.rss_mb[0]:.0f} -> {self.rss_mb[1]:.0f} MB ({self.drift:+.1%}); idle RSS before "
                f"{self.idle_rss_mb[0]:.0f} -> after {self.idle_rss_mb[1]:.0f} MB ({self.idle_drift:+.1%}); "
                f"p99 TTFT by window after warm-up (ms): {', '.join(f'{1000 * v:.0f}' for v in self.p99_ttft)}")


def _change(pair: tuple[float, float]) -> float:
    return (pair[1] - pair[0]) / pair[0]


def soak(url: str, pid: int, clients: int, seconds: float, warmup: float, window: float = 60.0) -> Soak:
    """`clients` closed-loop for `seconds`, in windows of `window` seconds; memory sampled every few seconds,
    and idle before and after."""
    wait_idle(url)
    idle_before = rss_mb(pid)
    rss: list[tuple[float, float]] = []

    async def sample_rss(stop: asyncio.Event) -> None:
        start = time.perf_counter()
        while not stop.is_set():
            rss.append((time.perf_counter() - start, rss_mb(pid)))
            await asyncio.sleep(min(10.0, window / 4))

    async def run() -> list[Tally]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop))
        tallies = await closed_loop(url, clients, seconds, seed=7, windows=window)
        stop.set()
        await sampler
        return tallies

    tallies = asyncio.run(run())
    wait_idle(url)
    idle_after = rss_mb(pid)
    for i, t in enumerate(tallies):
        held = [mb for at, mb in rss if at < (i + 1) * window] or [rss[0][1]]
        print(f"window {i + 1} ({window:g} s): {t.summary()}; RSS {held[-1]:.0f} MB", flush=True)
    # Resident memory under load rises and falls with what is in flight: a window's median, not one sample.
    first = [mb for at, mb in rss if warmup <= at < warmup + window] or [rss[-1][1]]
    last = [mb for at, mb in rss if at >= seconds - window] or [rss[-1][1]]
    measured = tallies[int(warmup // window):] or tallies
    return Soak(sum(len(t.outcomes) for t in tallies), sum(len(t.failures) for t in tallies),
                (statistics.median(first), statistics.median(last)), (idle_before, idle_after),
                [_pct(t.ttfts(), 0.99) for t in measured if t.ttfts()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30, help="per load level")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default="256M", help="the server's KV pool (filled in the warm-up)")
    parser.add_argument("--soak-minutes", type=float, default=20)
    parser.add_argument("--warmup-minutes", type=float, default=2)
    args = parser.parse_args()
    server = ServerProcess(args.model, args.threads, "cpu", ["--max-queue", str(args.max_queue),
                                                              "--kv-cache-memory", args.kv_cache_memory])
    try:
        ok = load_test(server.url, server.proc.pid, [1, 2, 4], args.seconds, args.clients)
        if args.soak_minutes:
            result = soak(server.url, server.proc.pid, args.clients, 60 * args.soak_minutes, 60 * args.warmup_minutes)
            print(result.summary())
            ok &= result.passed
    finally:
        code = server.stop()
    print(f"server exit code {code}; {'PASSED' if ok and code == 0 else 'FAILED'}")
    raise SystemExit(0 if ok and code == 0 else 1)


if __name__ == "__main__":
    main()
