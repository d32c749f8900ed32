"""`seriatim serve` as a process: prints its URL, serves, and on SIGTERM aborts in-flight work and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from seriatim.cli import main


def test_serve_sigterm_aborts_streams_and_exits_0(tiny_llama):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "seriatim.cli", "serve", "--model", str(tiny_llama[0] / "hf"), "--dtype", "float32",
         "--device", "cpu", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("seriatim: serving 'hf' at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        if "ready" not in line:
            assert "ready" in proc.stdout.readline()
        assert httpx.get(url + "/health").json()["status"] == "ok"

        body = {"model": "hf", "prompt": "hi", "n": 16, "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            rest = [x[len("data: "):] for x in lines if x.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert "shutting down" in last["error"]["message"], last
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_unknown_model_is_an_error(capsys):
    assert main(["serve", "--model", "no-such-model", "--port", "0"]) == 2
    assert "unknown model" in capsys.readouterr().err
