"""Malformed model files are refused with a ModelFileError naming the file and the problem, before anything
is allocated from what they claim: GGUF files (layout, metadata, config, tensor table, tokenizer) and HF
directories (config.json, safetensors, tokenizer)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from seriatim.errors import ModelFileError
from seriatim.weights.gguf_file import read_gguf
from seriatim.weights.loader import Precision, load
from support.gguf_bytes import (
    gguf,
    key_value,
    patch_tensor,
    reencode,
    string,
    tensor_info,
    tensor_offset,
    u32,
    u64,
)

FLOAT32 = Precision(torch.float32, compact=False)
LLAMA, GEMMA, LLAMA_Q8 = "llama-F32.gguf", "gemma3-BF16.gguf", "llama-Q8_0.gguf"
ARRAY, UINT8 = GGUFValueType.ARRAY, GGUFValueType.UINT8


def _overlapping(seeds: dict[str, Path]) -> bytes:
    """The Llama seed with its V projection's data moved onto its K projection's (both 4 x 8 float32)."""
    data = seeds[LLAMA].read_bytes()
    return patch_tensor(data, "blk.0.attn_v.weight", offset=tensor_offset(data, "blk.0.attn_k.weight"))


# Each case: the file's bytes from the seeds, and what the error must say.
GGUF_CASES: dict[str, tuple[Callable[[dict[str, Path]], bytes], str]] = {
    "empty file": (lambda s: b"", "0 bytes long, too short for a GGUF header"),
    "not GGUF": (lambda s: b"GGML" + bytes(40), "not a GGUF file"),
    "version 1": (lambda s: gguf(version=1), "GGUF version 1 is not supported"),
    "big-endian": (lambda s: b"GGUF" + (3).to_bytes(4, "big") + bytes(16), "big-endian GGUF file is not supported"),
    "truncated in the metadata": (lambda s: s[LLAMA].read_bytes()[:1000], "truncated|cannot fit"),
    "truncated in the tensor data": (lambda s: s[LLAMA].read_bytes()[:-100], "run past the end of the file"),
    "10^9 metadata keys": (lambda s: gguf(keys=10**9), "1000000000 metadata keys at byte 24 cannot fit"),
    "10^9 tensors": (lambda s: gguf(tensors=10**9), "1000000000 tensors at byte 24 cannot fit"),
    "10^9-element array": (lambda s: gguf([key_value("a", ARRAY, u32(UINT8) + u64(10**9))]),
                           "1000000000 items of 'a' .* cannot fit"),
    "2^63-byte string": (lambda s: gguf([key_value("a", GGUFValueType.STRING, u64(2**63))]),
                         "9223372036854775808 bytes of the value of 'a' .* cannot fit"),
    "unknown value type": (lambda s: gguf([key_value("a", 77, b"")]), "'a' has unknown value type 77"),
    "array of arrays": (lambda s: gguf([key_value("a", ARRAY, u32(ARRAY) + u64(1) + u32(UINT8) + u64(0))]),
                        "'a' is an array of arrays"),
    "duplicate key": (lambda s: gguf([key_value("a", UINT8, b"\0")] * 2), "metadata key 'a' appears twice"),
    "key not UTF-8": (lambda s: gguf([key_value(b"\xff", UINT8, b"\0")]), "a metadata key at byte 32 is not UTF-8"),
    "alignment not a power of two": (
        lambda s: gguf([key_value("general.alignment", GGUFValueType.UINT32, u32(24))]),
        "general.alignment must be a power of two, not 24"),
    "2^40-element tensor": (lambda s: patch_tensor(s[LLAMA].read_bytes(), "token_embd.weight", dims=(2**20, 2**20)),
                            "tensor 'token_embd.weight': 4398046511104 bytes of data at byte \\d+ run past the end"),
    "shape whose size wraps uint64": (
        lambda s: patch_tensor(s[LLAMA].read_bytes(), "token_embd.weight", dims=(2**32, 2**32)),
        "tensor 'token_embd.weight': 73786976294838206464 bytes of data"),
    "offset past the end": (lambda s: patch_tensor(s[LLAMA].read_bytes(), "output_norm.weight", offset=2**40),
                            "tensor 'output_norm.weight': 32 bytes of data at byte 1099511.* run past the end"),
    "unaligned offset": (lambda s: patch_tensor(s[LLAMA].read_bytes(), "output_norm.weight", offset=4),
                         "tensor 'output_norm.weight': data offset 4 is not a multiple of the alignment 32"),
    "overlapping tensors": (_overlapping, "tensor 'blk.0.attn_v.weight': its data at byte \\d+ overlaps the data "
                                          "of tensor 'blk.0.attn_k.weight'"),
    "unknown tensor type": (lambda s: patch_tensor(s[LLAMA].read_bytes(), "output_norm.weight", tensor_type=99),
                            "tensor 'output_norm.weight' has unknown type 99"),
    "rows not whole blocks": (
        lambda s: patch_tensor(s[LLAMA_Q8].read_bytes(), "token_embd.weight", dims=(48, 130)),
        "rows of 48 values, not a whole number of Q8_0 blocks of 32"),
    "five dimensions": (lambda s: gguf(infos=[tensor_info("t", (1,) * 5, 0, 0)]), "'t' has 5 dimensions"),
    "duplicate tensor": (lambda s: gguf(infos=[tensor_info("t", (8,), 0, 0)] * 2, data=bytes(32)),
                         "tensor 't' appears twice"),
    "empty dimension": (  # found by the fuzzer: numpy refuses a zero-sized shape whose other dimensions are huge
        lambda s: patch_tensor(s[LLAMA].read_bytes(), "output_norm.weight", dims=(0,)),
        r"tensor 'output_norm.weight' has dimensions \[0\]: one of them is empty"),
    "tensor name without a dot": (  # found by the fuzzer: the name was split at a dot it did not have
        lambda s: s[LLAMA].read_bytes().replace(string("output_norm.weight"), string("output_norm_weight")),
        "has no tensor for norm, which the config needs"),
    # Metadata the config is made of.
    "heads do not divide the hidden size": (lambda s: reencode(s[LLAMA], {"llama.attention.head_count": 3}),
                                            "3 attention heads do not divide the hidden size 8"),
    "no heads": (lambda s: reencode(s[LLAMA], {"llama.attention.head_count": 0}),
                 "llama.attention.head_count must be a positive integer, not 0"),
    "hidden size as a string": (lambda s: reencode(s[LLAMA], {"llama.embedding_length": "8"}),
                                "llama.embedding_length must be an integer, not '8'"),
    "hidden size as a fraction": (lambda s: reencode(s[LLAMA], {"llama.embedding_length": 8.5}),
                                  "llama.embedding_length must be an integer, not 8.5"),
    "10^9 layers": (lambda s: reencode(s[GEMMA], {"gemma3.block_count": 10**9}),
                    "gemma3.block_count must be a positive integer up to 1024, not 1000000000"),
    "key/value heads not dividing the heads": (
        lambda s: reencode(s[LLAMA], {"llama.attention.head_count_kv": 3}),
        "2 attention heads cannot share 3 key/value heads"),
    "odd head size": (lambda s: reencode(s[LLAMA], {"llama.attention.head_count": 8}), "the head size 1 is odd"),
    "NaN epsilon": (lambda s: reencode(s[LLAMA], {"llama.attention.layer_norm_rms_epsilon": float("nan")}),
                    "llama.attention.layer_norm_rms_epsilon must be a number, not nan"),
    "missing key": (lambda s: reencode(s[LLAMA], {"llama.block_count": None}),
                    "lacks the metadata key llama.block_count"),
    # Tensors against the config.
    "tensor shape against the config": (lambda s: reencode(s[LLAMA], {"llama.feed_forward_length": 32}),
                                        r"tensor 'blk.0.ffn_gate.weight' has shape \(16, 8\) \(rows first\); "
                                        r"the config needs \(32, 8\)"),
    "a layer's tensors missing": (lambda s: reencode(s[LLAMA], {"llama.block_count": 2}),
                                  "has no tensor for layers.1.attn_norm"),
    "vocabulary larger than the embedding": (lambda s: reencode(s[LLAMA], {"llama.vocab_size": 1000}),
                                             r"tensor 'token_embd.weight' has shape \(130, 8\)"),
    # The tokenizer.
    "tokens not strings": (lambda s: reencode(s[LLAMA], {"tokenizer.ggml.tokens": list(range(130))}),
                           "tokenizer.ggml.tokens must be a list of strings, but item 0 is 0"),
    "no tokens": (lambda s: reencode(s[LLAMA], {"tokenizer.ggml.tokens": []}), "has no tokenizer.ggml.tokens"),
    "BOS id outside the tokens": (lambda s: reencode(s[LLAMA], {"tokenizer.ggml.bos_token_id": 5000}),
                                  "tokenizer.ggml.bos_token_id is 5000, outside the 130 tokens"),
    "merge of unknown tokens": (lambda s: reencode(s[LLAMA], {"tokenizer.ggml.merges": ["zz qq"]}),
                                "the merge 'zz qq' does not join two tokens into a third"),
    "merge into no token": (  # tokenizers panics (a BaseException) on this one
        lambda s: reencode(s[LLAMA], {"tokenizer.ggml.merges": ["<|im_start|> <|im_end|>"]}),
        re.escape("the merge '<|im_start|> <|im_end|>' does not join")),
    "no merge separator": (lambda s: reencode(s[LLAMA], {"tokenizer.ggml.merges": ["ab"]}), "the merge 'ab' does not"),
}


def _load_bytes(data: bytes, path: Path):
    path.write_bytes(data)
    return load(path, FLOAT32, None)


@pytest.mark.parametrize("case", GGUF_CASES)
def test_malformed_gguf_is_refused(case, gguf_seeds, tmp_path):
    make, message = GGUF_CASES[case]
    path = tmp_path / "model.gguf"
    with pytest.raises(ModelFileError, match=message) as error:
        _load_bytes(make(gguf_seeds), path)
    assert str(error.value).startswith(f"{path}: ")


def test_the_seeds_load(gguf_seeds, tmp_path):
    """The cases above are made from these files: each loads, and re-encoded unchanged it still does."""
    for path in gguf_seeds.values():
        ckpt, tokenizer = load(path, FLOAT32, None)
        assert tokenizer.encode("The quick brown fox") and ckpt.config.num_layers == 1
    ckpt, _ = _load_bytes(reencode(gguf_seeds[LLAMA]), tmp_path / "same.gguf")
    assert ckpt.config.hidden_size == 8


def test_tensors_the_config_does_not_need_are_not_read(gguf_seeds, tmp_path):
    """A second layer's Q projection in a one-layer file, of no shape the config gives (the loader used to
    unpermute its rows, and numpy could not reshape them)."""
    extra = {"blk.1.attn_q.weight": np.ones((7, 3))}
    ckpt, _ = _load_bytes(reencode(gguf_seeds[LLAMA], extra=extra), tmp_path / "m.gguf")
    assert "layers.0.q" in ckpt.tensors and "layers.1.q" not in ckpt.tensors


def test_a_bos_token_of_any_text_is_added(gguf_seeds, tmp_path):
    """A BOS whose text holds ':', which the post-processor's template syntax used to read as its own."""
    tokens = read_gguf(gguf_seeds[LLAMA]).metadata["tokenizer.ggml.tokens"]
    bos = tokens.index("<|im_start|>")
    changes = {"tokenizer.ggml.tokens": [*tokens[:bos], "<|im:start|>", *tokens[bos + 1:]],
               "tokenizer.ggml.add_bos_token": True}
    _, tokenizer = _load_bytes(reencode(gguf_seeds[LLAMA], changes), tmp_path / "m.gguf")
    assert tokenizer.encode("the")[0] == bos and tokenizer.bos_token == "<|im:start|>"


def test_gguf_tokenizer_ids_past_the_vocabulary(tmp_path):
    """A file whose embedding and vocab_size agree on 100 rows, but whose tokenizer has 130 tokens."""
    from transformers import AutoModelForCausalLM

    from support.tiny_models import FAMILIES, train_tokenizer, write_gguf

    model = AutoModelForCausalLM.from_config(FAMILIES["llama"](100, hidden_size=8, intermediate_size=16,
                                                               num_hidden_layers=1, num_attention_heads=2,
                                                               num_key_value_heads=1))
    path = write_gguf(tmp_path / "m.gguf", model, train_tokenizer(130, byte_alphabet=False))
    message = r"the tokenizer has token id 1\d\d, outside the model's vocabulary of 100"
    with pytest.raises(ModelFileError, match=message):
        load(path, FLOAT32, None)


# HF directories: each case changes a copy of the tiny directory.
def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(data)


def _safetensors_header(edit: Callable[[dict], None], extra: bytes = b"") -> Callable[[Path], None]:
    """Rewrite model.safetensors' JSON header with `edit`, the data unchanged (then `extra` appended)."""
    def rewrite(path: Path) -> None:
        raw = (path / "model.safetensors").read_bytes()
        n = struct.unpack_from("<Q", raw)[0]
        header = json.loads(raw[8:8 + n])
        edit(header)
        encoded = json.dumps(header).encode()
        (path / "model.safetensors").write_bytes(u64(len(encoded)) + encoded + raw[8 + n:] + extra)
    return rewrite


def _tensor(key: str, **fields) -> Callable[[dict], None]:
    return lambda header: header[key].update(fields)


def _smaller_vocabulary(rows: int) -> Callable[[Path], None]:
    """vocab_size and the embedding (and head) cut to `rows`: they agree, but the tokenizer has more ids."""
    def edit(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        _edit_config(vocab_size=rows)(path)
        tensors = load_file(path / "model.safetensors")
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[key] = tensors[key][:rows].contiguous()
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return edit


def _truncate(path: Path) -> None:
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[:-64])


Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"

HF_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "config not JSON": (_write("config.json", b"{\"model_type\": "), "config.json: is not valid JSON"),
    "config nested past recursion": (_write("config.json", b"[" * 100_000), "config.json: is not valid JSON"),
    "config not an object": (_write("config.json", b"[1, 2]"), "config.json: holds a list of 2 items, not a JSON"),
    "heads do not divide the hidden size": (_edit_config(num_attention_heads=3, head_dim=None),
                                            "config.json: 3 attention heads do not divide the hidden size 8"),
    "hidden size as a string": (_edit_config(hidden_size="8"), "hidden_size must be an integer, not '8'"),
    "negative layer count": (_edit_config(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    "infinite rope theta": (_edit_config(rope_theta=1e999, rope_parameters=None),
                            "rope_theta must be a number, not inf"),
    "truncated safetensors": (_truncate, "model.safetensors: is not a valid safetensors file"),
    "safetensors header past the end": (
        lambda path: (path / "model.safetensors").write_bytes(u64(2**40) + b"{}"), "not a valid safetensors file"),
    "safetensors offsets overlapping": (
        _safetensors_header(lambda h: h[K].update(data_offsets=h[Q]["data_offsets"])), "not a valid safetensors"),
    "safetensors 2^40-element tensor": (_safetensors_header(_tensor(Q, shape=[2**20, 2**20])),
                                        "not a valid safetensors"),
    "integer weights": (_safetensors_header(_tensor(Q, dtype="I32")), f"tensor {Q} is I32; weights are one of"),
    "tensor shape against the config": (_safetensors_header(_tensor(Q, shape=[4, 16])),
                                        rf"tensor '{Q}' has shape \(4, 16\) \(rows first\); the config needs \(8, 8\)"),
    "tokenizer ids past the vocabulary": (_smaller_vocabulary(300),
                                          "the tokenizer has token id \\d+, outside the model's vocabulary of 300"),
    "tokenizer.json not a tokenizer": (_write("tokenizer.json", b"{}"), "tokenizer.json: is not a tokenizer"),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_malformed_hf_directory_is_refused(case, tiny_hf_dir, tmp_path):
    edit, message = HF_CASES[case]
    path = shutil.copytree(tiny_hf_dir, tmp_path / "hf")
    edit(path)
    with pytest.raises(ModelFileError, match=message):
        load(path, FLOAT32, None)


def test_the_tiny_hf_directory_loads(tiny_hf_dir):
    ckpt, tokenizer = load(tiny_hf_dir, FLOAT32, None)
    assert ckpt.config.hidden_size == 8 and tokenizer.encode("hello")


def test_model_file_error_without_a_file():
    assert str(ModelFileError("bad")) == "bad" and str(ModelFileError("bad", Path("/m.gguf"))) == "/m.gguf: bad"
    assert isinstance(ModelFileError("bad"), ValueError)
