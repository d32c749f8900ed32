"""The converted-weights cache: a model read back equals a fresh conversion, tensor for tensor."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from seriatim import LLM, SamplingParams
from seriatim.kernels import isa
from seriatim.model.sequence_cache import BatchAttention, SequenceCache, Span
from seriatim.weights import converted
from seriatim.weights.loader import Precision, build_model, load

COMPACT = Precision(torch.bfloat16, compact=True)


def _forward(model, ids: list[int]) -> torch.Tensor:
    cache = SequenceCache(model.cfg, len(ids), torch.bfloat16, torch.device("cpu"))
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), BatchAttention([Span(cache, 0, len(ids))]))
        return model.logits(hidden)


@pytest.mark.parametrize("family, source", [("llama", "Q4_1"), ("qwen2", "mixed"), ("gemma3", "mixed")])
def test_cached_conversion_equals_a_fresh_one(family, source, tmp_path, monkeypatch, request):
    monkeypatch.setenv("SERIATIM_CACHE", str(tmp_path))
    root = request.getfixturevalue(f"tiny_{family}")
    path = (root[0] if family == "llama" else root) / f"{source}.gguf"
    ckpt, tokenizer = load(path, COMPACT, None)
    model = build_model(ckpt, COMPACT, torch.device("cpu"))
    assert converted.load(path, COMPACT.name, torch.bfloat16) is None
    converted.save(path, COMPACT.name, model, tokenizer)
    again, tok = converted.load(path, COMPACT.name, torch.bfloat16)

    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    assert (again.embed.table is again.lm_head) == (getattr(model.embed, "table", None) is model.lm_head)
    expected = model.state_dict()
    assert again.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in again.state_dict().items())
    assert all(t.data_ptr() % 64 == 0 for t in again.state_dict().values())  # the int4/int8 kernels need it
    text = "Hello world, 123 héllo"
    assert tok.encode(text) == tokenizer.encode(text) and tok.eos_token_ids == tokenizer.eos_token_ids
    assert (tok.bos_token_id, tok.chat_template) == (tokenizer.bos_token_id, tokenizer.chat_template)
    ids = list(range(3, 19))
    assert torch.equal(_forward(again, ids), _forward(model, ids))


def test_a_changed_file_is_converted_again(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SERIATIM_CACHE", str(tmp_path))
    path = tiny_llama[0] / "Q4_0.gguf"
    ckpt, tokenizer = load(path, COMPACT, None)
    converted.save(path, COMPACT.name, build_model(ckpt, COMPACT, torch.device("cpu")), tokenizer)
    assert converted.load(path, COMPACT.name, torch.bfloat16) is not None
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert converted.load(path, COMPACT.name, torch.bfloat16) is None


@pytest.mark.skipif(isa.tier() < isa.Tier.AVX512,
                    reason="the fast mode keeps weights compact only at a tier with bfloat16 arithmetic")
def test_llm_writes_then_reads_the_cache(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SERIATIM_CACHE", str(tmp_path))
    monkeypatch.setattr(converted, "MIN_BYTES", 0)
    path = str(tiny_llama[0] / "Q4_1.gguf")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = LLM(path).generate("hello", params)[0].token_ids
    assert len(list((tmp_path / "converted").iterdir())) == 1
    monkeypatch.setattr("seriatim.llm.build_model", lambda *a: pytest.fail("converted again"))
    assert LLM(path).generate("hello", params)[0].token_ids == first


def test_writing_an_entry_removes_the_stale_ones(tiny_llama, tmp_path, monkeypatch):
    """Entries whose source changed or vanished, and entries without a source record, are removed;
    another precision of an unchanged file stays."""
    monkeypatch.setenv("SERIATIM_CACHE", str(tmp_path / "cache"))
    ckpt, tokenizer = load(tiny_llama[0] / "Q4_0.gguf", COMPACT, None)
    model = build_model(ckpt, COMPACT, torch.device("cpu"))
    kept, changed, gone = (tmp_path / name for name in ("kept.gguf", "changed.gguf", "gone.gguf"))
    for path in (kept, changed, gone):
        path.write_bytes((tiny_llama[0] / "Q4_0.gguf").read_bytes())
    converted.save(kept, "other-precision", model, tokenizer)
    converted.save(changed, COMPACT.name, model, tokenizer)
    converted.save(gone, COMPACT.name, model, tokenizer)
    legacy = tmp_path / "cache" / "converted" / "legacy-0123456789abcdef"
    legacy.mkdir()
    (legacy / "meta.json").write_text("{}")
    old = converted._entry(changed, COMPACT.name)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 1))
    gone.unlink()

    converted.save(changed, COMPACT.name, model, tokenizer)

    entries = set((tmp_path / "cache" / "converted").iterdir())
    assert entries == {converted._entry(kept, "other-precision"), converted._entry(changed, COMPACT.name)}
    assert old not in entries and converted.load(changed, COMPACT.name, torch.bfloat16) is not None


def test_a_write_killed_half_way_is_cleared_away(tiny_llama, tmp_path, monkeypatch):
    """A process killed while writing an entry (kill -9) leaves its temporary folder, half a file in it: the next
    start misses, converts, writes the entry and removes that folder; a live writer's folder stays. A damaged
    entry is converted again and replaced."""
    monkeypatch.setenv("SERIATIM_CACHE", str(tmp_path))
    path = tiny_llama[0] / "Q4_0.gguf"
    ckpt, tokenizer = load(path, COMPACT, None)
    model = build_model(ckpt, COMPACT, torch.device("cpu"))
    entry = converted._entry(path, COMPACT.name)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    killed, live = (entry.with_name(f"{entry.name}.tmp{pid}") for pid in (dead, os.getppid()))
    for tmp in (killed, live):
        tmp.mkdir(parents=True)
        (tmp / "weights.pt").write_bytes(b"PK\x03\x04 half a zip")

    assert converted.load(path, COMPACT.name, torch.bfloat16) is None
    converted.save(path, COMPACT.name, model, tokenizer)
    assert set(entry.parent.iterdir()) == {entry, live}
    assert converted.load(path, COMPACT.name, torch.bfloat16) is not None

    (entry / "weights.pt").write_bytes(b"PK\x03\x04 damaged")
    assert converted.load(path, COMPACT.name, torch.bfloat16) is None
    converted.save(path, COMPACT.name, model, tokenizer)
    assert converted.load(path, COMPACT.name, torch.bfloat16) is not None
