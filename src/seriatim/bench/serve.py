"""`seriatim bench --serve 1,8,32`: load on the served endpoint, as clients see it.

Starts `seriatim serve` in a process of its own on a free 127.0.0.1 port, then for each level runs
that many client threads, each sending streamed `/v1/completions` requests one after another, and
reports requests/s, generated tokens/s and time to first token. Clients use only the standard
library, so what is measured is the server, not a client library.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .worker import peak_rss_mb


@dataclass
class Reply:
    """One streamed request: seconds from sending it to its first text, and the tokens it generated."""

    ttft: float
    tokens: int


@dataclass
class Level:
    clients: int
    seconds: float
    replies: list[Reply] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        ttfts = sorted(r.ttft for r in self.replies) or [float("nan")]
        tokens = sum(r.tokens for r in self.replies)
        return {
            "clients": self.clients, "requests": len(self.replies), "errors": len(self.errors), "tokens": tokens,
            "requests_per_s": len(self.replies) / self.seconds, "tokens_per_s": tokens / self.seconds,
            "ttft_ms_median": 1000 * statistics.median(ttfts), "ttft_ms_p90": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))],
            "first_error": self.errors[0] if self.errors else None,
        }


class ServerProcess:
    """`seriatim serve --port 0` in a child process; `url` once it says it is ready."""

    def __init__(self, model: str, threads: int, device: str, options: list[str] | None = None):
        cmd = [sys.executable, "-m", "seriatim.cli", "serve", "--model", model, "--port", "0",
               "--threads", str(threads), "--device", device, *(options or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = ""
        for line in self.proc.stdout:
            found = re.search(r" at (http://\S+) ", line)
            self.url = found.group(1) if found else self.url
            if self.url and "ready" in line:
                break
        else:
            raise RuntimeError(f"the server exited with code {self.proc.wait()} before it was ready")
        # Keep draining its output so a chatty server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code (0 is a clean shutdown)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def stream_completion(url: str, prompt: list[int], max_tokens: int) -> Reply:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        first, tokens = None, 0
        for line in resp:
            data = line.removeprefix(b"data: ").strip()
            if not line.startswith(b"data: ") or data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
        return Reply((first or time.perf_counter()) - start, tokens)
    finally:
        conn.close()


def run_level(url: str, prompts: list[list[int]], clients: int, per_client: int, max_tokens: int) -> Level:
    """`clients` threads, each sending `per_client` requests back to back."""
    level = Level(clients, 0.0)
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            prompt = prompts[(c * per_client + r) % len(prompts)]
            try:
                reply = stream_completion(url, prompt, max_tokens)
            except (OSError, RuntimeError, ValueError) as e:
                with lock:
                    level.errors.append(str(e))
                continue
            with lock:
                level.replies.append(reply)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    level.seconds = time.perf_counter() - start
    return level


def measure_server(model: str, threads: int, device: str, levels: list[int], prompts: list[list[int]],
                   max_tokens: int = 64) -> dict:
    """Start the server, warm it up, load it at each level; returns the summaries and the server's memory."""
    print("starting seriatim serve ...", file=sys.stderr, flush=True)
    server = ServerProcess(model, threads, device)
    try:
        run_level(server.url, prompts[:2], 2, 1, 4)  # warm-up
        results = []
        for clients in levels:
            per_client = max(2, 8 // clients)
            print(f"{clients} client(s), {clients * per_client} requests ...", file=sys.stderr, flush=True)
            results.append(run_level(server.url, prompts, clients, per_client, max_tokens).summary())
        peak = peak_rss_mb(server.proc.pid)
    finally:
        code = server.stop()
    return {"levels": results, "server_peak_rss_mb": peak, "exit_code": code, "max_tokens": max_tokens}


def format_serve(result: dict, meta: dict) -> str:
    lines = [f"model {meta['model']}  device {meta['device']}  threads {meta['threads']}  streamed /v1/completions, "
             f"{result['max_tokens']} tokens each (greedy, ignore_eos), prompts of {meta['prompt_tokens']} tokens",
             f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'TTFT median ms':>15} "
             f"{'TTFT p90 ms':>12}"]
    for r in result["levels"]:
        lines.append(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:7.2f} "
                     f"{r['tokens_per_s']:8.1f} {r['ttft_ms_median']:15.0f} {r['ttft_ms_p90']:12.0f}")
        if r["first_error"]:
            lines.append(f"        first error: {r['first_error']}")
    lines.append(f"server peak RSS {result['server_peak_rss_mb']:.0f} MB; "
                 f"exit code after SIGTERM {result['exit_code']}")
    return "\n".join(lines)
