"""The GGUF reader under coverage-guided fuzzing (support/gguf_fuzz.py): a short run from the seed corpus, and
a replay of every input a fuzzing run has found (tests/weights/fuzz_regressions/; scripts/fuzz adds to it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.gguf_fuzz import load_bytes

TESTS = Path(__file__).parents[1]
REGRESSIONS = sorted((Path(__file__).parent / "fuzz_regressions").glob("*"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzz_finding_is_a_clear_error(path, tmp_path):
    load_bytes(path.read_bytes(), tmp_path / "input.gguf")  # loads or raises ModelFileError, nothing else


def test_short_fuzz_run(gguf_seeds, tmp_path):
    """A few thousand mutated files (seconds): any exception but ModelFileError, or an allocation that takes the
    process past 2 GB, fails the run, and libFuzzer leaves the input in tmp_path."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in gguf_seeds.values():
        shutil.copy(seed, corpus)
    # The peak libFuzzer reads would be this test process's (see gguf_fuzz.py): the target checks its own.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "SERIATIM_FUZZ_PEAK_MB": "2048"}
    run = subprocess.run(
        [sys.executable, str(TESTS / "support" / "gguf_fuzz.py"), "fuzz", str(corpus), "-runs=3000", "-seed=1",
         "-rss_limit_mb=0", "-timeout=30", f"-artifact_prefix={tmp_path}/"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done 3000 runs" in run.stderr
