"""Model weights from a GGUF file or a Hugging Face directory, under one naming scheme.

Both loaders yield tensors named per projection (`layers.3.q`, `embed`, ...),
as float32 tensors or, when asked to keep them compact, as GGUF blocks.
Norm weights are stored as the factor they multiply by: Gemma's HF files
hold w for a factor of 1 + w, and the HF loader adds the 1 (GGUF files hold
1 + w already: llama.cpp's converter adds it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.config import ModelConfig, config_from_gguf, config_from_hf
from ..model.quant import COMPACT_TYPES, BlockWeight, Weight

# Tensor types whose dequantization we support and test; names as gguf spells them.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K")

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


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, Weight]  # canonical name -> float32 tensor or GGUF blocks
    gguf_metadata: dict[str, Any] | None  # the GGUF key/value store, None for HF directories


def _canonical(name: str, table: dict[str, str], layer_prefix: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.q' (or None for tensors we don't use)."""
    m = re.fullmatch(rf"{re.escape(layer_prefix)}(\d+)\.(.+)\.(weight|bias)", name)
    stem, layer = (m.group(2), m.group(1)) if m else (name.rsplit(".", 1)[0], None)
    suffix = name.rsplit(".", 1)[1]
    base = table.get(stem)
    if base is None:
        return None
    full = f"layers.{layer}.{base}" if layer is not None else base
    return full if suffix == "weight" else f"{full}.bias"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary permutation of Q/K rows (GGUF 'llama' files only)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor(t, name: str, cfg: ModelConfig, keep_blocks: bool) -> Weight:
    # Copy out of the mapped file so that it can be closed and its pages dropped.
    w = BlockWeight(t.tensor_type, np.array(t.data), int(t.shape[0]))
    if w.data.ndim == 1:  # norms and biases
        return w.dequantize()
    if cfg.arch == "llama" and name.endswith((".q", ".k")):
        w = w.take_rows(_unpermute_rope(np.arange(w.rows), cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads))
    return w if keep_blocks and t.tensor_type in COMPACT_TYPES else w.dequantize()


def load_gguf(path: Path, progress: Progress | None = None, keep_blocks: bool = False) -> Checkpoint:
    """Read a GGUF file; with `keep_blocks`, quantized matrices stay as blocks (see quant.py)."""
    from gguf import GGUFReader

    from .gguf_metadata import read_gguf_metadata

    reader = GGUFReader(str(path))
    meta = read_gguf_metadata(reader)
    cfg = config_from_gguf(meta, {t.name for t in reader.tensors})
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_GGUF_TYPES))
    if unsupported:
        raise ValueError(
            f"{path.name}: unsupported GGUF tensor type(s) {', '.join(unsupported)}; "
            f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        name = _canonical(t.name, _GGUF_NAMES, "blk.")
        if name is not None:
            tensors[name] = _gguf_tensor(t, name, cfg, keep_blocks)
        if progress:
            progress(i + 1, len(reader.tensors))
    return Checkpoint(cfg, tensors, meta)


def load_hf_dir(path: Path, progress: Progress | None = None) -> Checkpoint:
    from safetensors import safe_open

    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    names = _HF_POST_NORM_NAMES if cfg.post_norms else _HF_NAMES
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for i, file in enumerate(files):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                name = _canonical(key, names, "model.layers.")
                if name is not None:
                    tensors[name] = f.get_tensor(key).float()
                    if cfg.gemma_norms and name.endswith("norm"):
                        tensors[name] += 1
        if progress:
            progress(i + 1, len(files))
    return Checkpoint(cfg, tensors, None)
