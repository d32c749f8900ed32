"""Model weights from a GGUF file or a Hugging Face directory, under one naming scheme.

Both loaders yield tensors named per projection (`layers.3.q`, `embed`, ...),
as float32 tensors or, when asked to keep them compact, as GGUF blocks.
Norm weights are stored as the factor they multiply by: Gemma's HF files
hold w for a factor of 1 + w, and the HF loader adds the 1 (GGUF files hold
1 + w already: llama.cpp's converter adds it).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError, in_file
from ..model.config import ModelConfig, config_from_gguf, config_from_hf
from ..model.quant import COMPACT_TYPES, BlockWeight, Weight
from .fields import read_json
from .gguf_file import GGUFTensor, read_gguf

# Tensor types whose dequantization we support and test; names as gguf spells them.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
# safetensors dtypes read as weights (an integer or 8-bit float tensor is not one without its scales).
HF_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")

_GGUF_NAMES = {
    "token_embd": "embed",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "attn_output": "o",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "post_ffw_norm": "post_ffn_norm",
}
_HF_NAMES = {
    "model.embed_tokens": "embed",
    "model.norm": "norm",
    "lm_head": "lm_head",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
    "self_attn.o_proj": "o",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
# Gemma's HF names: its "post_attention_layernorm" follows the attention; the MLP's input norm is "pre_feedforward".
_HF_POST_NORM_NAMES = {
    **_HF_NAMES,
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
}

Progress = Callable[[int, int], None]
Shapes = Mapping[str, tuple[str, tuple[int, ...]]]  # canonical name -> (name in the file, shape with rows first)


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, Weight]  # canonical name -> float32 tensor or GGUF blocks
    gguf_metadata: dict[str, Any] | None  # the GGUF key/value store, None for HF directories


def _canonical(name: str, table: dict[str, str], layer_prefix: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.q' (or None for tensors we don't use)."""
    m = re.fullmatch(rf"(?:{re.escape(layer_prefix)}(\d+)\.)?(.+)\.(weight|bias)", name)
    base = table.get(m.group(2)) if m else None
    if base is None:
        return None
    layer, suffix = m.group(1, 3)
    full = f"layers.{layer}.{base}" if layer is not None else base
    return full if suffix == "weight" else f"{full}.bias"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary permutation of Q/K rows (GGUF 'llama' files only)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Each tensor the model is built from (see loader.build_model), with the shape the config gives it, rows
    first; layer by layer, so that a check stops at the first missing layer whatever count the config claims."""
    h, vocab = cfg.hidden_size, cfg.vocab_size
    yield "embed", (vocab, h)
    if not cfg.tie_word_embeddings:
        yield "lm_head", (vocab, h)
    yield "norm", (h,)
    layer = _layer_shapes(cfg)
    for i in range(cfg.num_layers):
        for name, shape in layer:
            yield f"layers.{i}.{name}", shape


def _layer_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    h, q, kv, ffn = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes = [("attn_norm", (h,)), ("q", (q, h)), ("k", (kv, h)), ("v", (kv, h)), ("o", (h, q)),
              ("ffn_norm", (h,)), ("gate", (ffn, h)), ("up", (ffn, h)), ("down", (h, ffn))]
    if cfg.qkv_bias:
        shapes += [("q.bias", (q,)), ("k.bias", (kv,)), ("v.bias", (kv,))]
    if cfg.qk_norm:
        shapes += [("q_norm", (cfg.head_dim,)), ("k_norm", (cfg.head_dim,))]
    if cfg.post_norms:
        shapes += [("post_attn_norm", (h,)), ("post_ffn_norm", (h,))]
    return shapes


def _needed(cfg: ModelConfig, shapes: Shapes) -> list[str]:
    """The tensors the model is built from, each checked to be there with the shape the config gives it,
    before any is read or dequantized. Others (a layer past the count, a bias Llama has no use for) are
    never read."""
    needed = []
    for name, want in _expected_shapes(cfg):
        if name not in shapes:
            raise ModelFileError(f"has no tensor for {name}, which the config needs")
        stored, got = shapes[name]
        if got != want:
            raise ModelFileError(f"tensor {stored!r} has shape {got} (rows first); the config needs {want}")
        needed.append(name)
    return needed


def _gguf_tensor(t: GGUFTensor, name: str, cfg: ModelConfig, keep_blocks: bool) -> Weight:
    # Copy out of the mapped file so that it can be closed and its pages dropped.
    w = BlockWeight(t.tensor_type, np.array(t.data), t.shape[0])
    if w.data.ndim == 1:  # norms and biases
        return w.dequantize()
    if cfg.arch == "llama" and name.endswith((".q", ".k")):
        w = w.take_rows(_unpermute_rope(np.arange(w.rows), cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads))
    return w if keep_blocks and t.tensor_type in COMPACT_TYPES else w.dequantize()


def load_gguf(path: Path, progress: Progress | None = None, keep_blocks: bool = False) -> Checkpoint:
    """Read a GGUF file; with `keep_blocks`, quantized matrices stay as blocks (see quant.py)."""
    file = read_gguf(path)
    with in_file(path):
        cfg = config_from_gguf(file.metadata, {t.name for t in file.tensors})
        unsupported = sorted({t.tensor_type.name for t in file.tensors} - set(SUPPORTED_GGUF_TYPES))
        if unsupported:
            raise ModelFileError(
                f"unsupported GGUF tensor type(s) {', '.join(unsupported)}; "
                f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}"
            )
        named = {name: t for t in file.tensors if (name := _canonical(t.name, _GGUF_NAMES, "blk.")) is not None}
        needed = _needed(cfg, {name: (t.name, tuple(reversed(t.shape))) for name, t in named.items()})
    tensors: dict[str, Weight] = {}
    for i, name in enumerate(needed):
        tensors[name] = _gguf_tensor(named[name], name, cfg, keep_blocks)
        if progress:
            progress(i + 1, len(needed))
    return Checkpoint(cfg, tensors, file.metadata)


@dataclass(frozen=True)
class _Stored:
    """Where an HF directory keeps a tensor."""

    file: Path
    key: str
    shape: tuple[int, ...]


def load_hf_dir(path: Path, progress: Progress | None = None) -> Checkpoint:
    config = path / "config.json"
    if not config.is_file():
        raise ModelFileError("has no config.json", path)
    with in_file(config):
        cfg = config_from_hf(read_json(config))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError("has no *.safetensors files", path)
    stored = _hf_index(files, _HF_POST_NORM_NAMES if cfg.post_norms else _HF_NAMES)
    with in_file(path):
        needed = _needed(cfg, {name: (s.key, s.shape) for name, s in stored.items()})
    by_file: dict[Path, dict[str, str]] = defaultdict(dict)
    for name in needed:
        by_file[stored[name].file][name] = stored[name].key
    tensors: dict[str, Weight] = {}
    for i, file in enumerate(files):
        with _safetensors(file) as f:
            for name, key in by_file[file].items():
                tensors[name] = f.get_tensor(key).float()
                if cfg.gemma_norms and name.endswith("norm"):
                    tensors[name] += 1
        if progress:
            progress(i + 1, len(files))
    return Checkpoint(cfg, tensors, None)


def _hf_index(files: list[Path], names: dict[str, str]) -> dict[str, _Stored]:
    """The tensors the model uses, by canonical name, from the files' headers (no data read yet)."""
    stored: dict[str, _Stored] = {}
    for file in files:
        with _safetensors(file) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                name = _canonical(key, names, "model.layers.")
                if name is None:
                    continue
                view = f.get_slice(key)
                if view.get_dtype() not in HF_FLOAT_TYPES:
                    raise ModelFileError(f"tensor {key} is {view.get_dtype()}; weights are one of "
                                         f"{', '.join(HF_FLOAT_TYPES)}", file)
                if name in stored:
                    raise ModelFileError(f"tensor {key} is also in {stored[name].file.name}", file)
                stored[name] = _Stored(file, key, tuple(view.get_shape()))
    return stored


@contextmanager
def _safetensors(file: Path) -> Iterator[Any]:
    """safe_open, whose errors (a header longer than the file, data offsets past its end or overlapping,
    a shape that does not match its bytes) become the file's ModelFileError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ModelFileError(f"is not a valid safetensors file: {e}", file) from None
