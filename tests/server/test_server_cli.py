"""`seriatim serve` as a process: prints its URL, serves, ends with exit code 0 on SIGTERM or SIGINT at any moment
(aborting the streams in flight), and comes back after a kill -9."""

from __future__ import annotations

import ctypes.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from seriatim.cli import main


@contextmanager
def serving(model: Path, *args: str, env: dict[str, str | None] | None = None) -> Iterator[subprocess.Popen]:
    """`seriatim serve` on the tiny model in a child process, killed on the way out if it is still running.
    `env` adds to the environment, or with None removes from it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env = {name: value for name, value in env.items() if value is not None}
    proc = subprocess.Popen(
        [sys.executable, "-m", "seriatim.cli", "serve", "--model", str(model), "--dtype", "float32", "--device",
         "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def url_when_listening(proc: subprocess.Popen) -> str:
    assert select.select([proc.stdout], [], [], 60)[0], "serve printed nothing for a minute"
    line = proc.stdout.readline()
    assert line.startswith("seriatim: serving 'hf' at http://127.0.0.1:"), line + proc.stderr.read()
    return line.split(" at ", 1)[1].split()[0]


def wait_until_ready(proc: subprocess.Popen) -> str:
    url = url_when_listening(proc)
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health").status_code != 200:
        assert time.monotonic() < deadline and proc.poll() is None, "the model did not load"
        time.sleep(0.05)
    return url


def test_serve_sigterm_aborts_streams_and_exits_0(tiny_llama):
    with serving(tiny_llama[0] / "hf", "--port", "0") as proc:
        url = wait_until_ready(proc)
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


def cpu_seconds(pid: int) -> float:
    """The CPU time process `pid` has used (Linux: /proc/PID/stat): a measure of how far it got that does not
    depend on how busy the machine is."""
    with open(f"/proc/{pid}/stat") as f:
        utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the child's CPU time from /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("cpu", [0.2, 0.3, 0.8, 1.3, 1.8])
def test_a_signal_during_start_up_exits_0(tiny_llama, cpu, sig):
    """SIGINT or SIGTERM while `serve` imports PyTorch and numpy (~2 CPU seconds), builds the app, starts
    uvicorn or loads the model: the process ends with code 0 and no traceback. 0.2 s is about when it starts
    again on tcmalloc (hardware.exec_with_tcmalloc), if installed. (Its first ~0.1 s, before seriatim's code
    runs, is the interpreter's: there the signals have Python's default effect.)"""
    with serving(tiny_llama[0] / "hf", "--port", "0") as proc:
        deadline = time.monotonic() + 10  # a fast machine may finish starting first: then uvicorn has it
        while cpu_seconds(proc.pid) < cpu and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, (out, err)
    assert "Traceback" not in err, err


def test_serve_comes_back_after_kill_9_while_loading(tiny_llama):
    """kill -9 as soon as the server listens, with the model loading: a new server on the same port starts,
    loads and serves."""
    with serving(tiny_llama[0] / "hf", "--port", "0") as proc:
        url = url_when_listening(proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    with serving(tiny_llama[0] / "hf", "--port", url.rsplit(":", 1)[1]) as proc:
        assert wait_until_ready(proc) == url
        body = {"model": "hf", "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


@pytest.mark.skipif(ctypes.util.find_library("tcmalloc_minimal") is None or not Path("/proc/self/maps").exists(),
                    reason="tcmalloc is not installed (Debian: libtcmalloc-minimal4), or no /proc to see it in")
@pytest.mark.parametrize(("env", "on_tcmalloc"), [
    ({"LD_PRELOAD": None, "SERIATIM_MALLOC": None}, True), ({"LD_PRELOAD": None, "SERIATIM_MALLOC": "system"}, False),
    ({"LD_PRELOAD": "", "SERIATIM_MALLOC": None}, False)], ids=["default", "system", "preload"])
def test_serve_runs_on_tcmalloc_unless_told_otherwise(tiny_llama, env, on_tcmalloc):
    """`serve` starts again on tcmalloc where it is installed, unless SERIATIM_MALLOC=system or LD_PRELOAD
    already says what to preload; either way it serves."""
    with serving(tiny_llama[0] / "hf", "--port", "0", env=env) as proc:
        url = wait_until_ready(proc)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        body = {"model": "hf", "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).json()["usage"]["completion_tokens"] == 4
    assert ("libtcmalloc_minimal" in maps) == on_tcmalloc


def test_serve_unknown_model_is_an_error(capsys):
    assert main(["serve", "--model", "no-such-model", "--port", "0"]) == 2
    assert "unknown model" in capsys.readouterr().err
