"""Model weights from a GGUF file or a Hugging Face directory, under one naming scheme.

Both loaders yield tensors named per projection (`layers.3.q`, `embed`, ...);
`to_state_dict` then fuses them into the modules of `model.Transformer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig, config_from_gguf, config_from_hf

# Tensor types whose dequantization we support and test; names as gguf spells them.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_GGUF_NAMES = {
    "token_embd": "embed",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
_HF_NAMES = {
    "model.embed_tokens": "embed",
    "model.norm": "norm",
    "lm_head": "lm_head",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}

Progress = Callable[[int, int], None]


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # canonical name -> float32 weight
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


def load_gguf(path: Path, progress: Progress | None = None) -> Checkpoint:
    from gguf import GGUFReader
    from gguf.quants import dequantize

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
            # F32 tensors come back as read-only views of the mapped file: always copy.
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if cfg.arch == "llama" and name.endswith((".q", ".k")):
                w = _unpermute_rope(w, cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads)
            tensors[name] = torch.from_numpy(w)
        if progress:
            progress(i + 1, len(reader.tensors))
    return Checkpoint(cfg, tensors, meta)


def load_hf_dir(path: Path, progress: Progress | None = None) -> Checkpoint:
    from safetensors import safe_open

    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for i, file in enumerate(files):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _canonical(key, _HF_NAMES, "model.layers.")
                if name is not None:
                    tensors[name] = f.get_tensor(key).float()
        if progress:
            progress(i + 1, len(files))
    return Checkpoint(cfg, tensors, None)


def _layer_items(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        yield f"{p}.attn_norm.weight", t[f"{p}.attn_norm"]
        yield f"{p}.attn.qkv.weight", torch.cat([t[f"{p}.q"], t[f"{p}.k"], t[f"{p}.v"]])
        yield f"{p}.attn.o.weight", t[f"{p}.o"]
        yield f"{p}.ffn_norm.weight", t[f"{p}.ffn_norm"]
        yield f"{p}.mlp.gate_up.weight", torch.cat([t[f"{p}.gate"], t[f"{p}.up"]])
        yield f"{p}.mlp.down.weight", t[f"{p}.down"]


def to_state_dict(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Canonical per-projection tensors -> `Transformer.state_dict()` layout (fused QKV, gate/up)."""
    cfg, t = ckpt.config, ckpt.tensors
    try:
        items = dict(_layer_items(cfg, t))
        items["embed.weight"] = t["embed"]
        items["norm.weight"] = t["norm"]
        items["lm_head.weight"] = t["embed"] if cfg.tie_word_embeddings else t["lm_head"]
    except KeyError as e:
        raise ValueError(f"checkpoint is missing tensor {e.args[0]!r}") from None
    return {k: v.to(dtype) for k, v in items.items()}
