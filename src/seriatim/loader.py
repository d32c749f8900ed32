"""From a model reference to a ready `Transformer` + `Tokenizer`, in the chosen numeric mode.

Modes: "float32" (every weight dequantized: the exact reference path),
"bfloat16"/"float16" (dequantized to that type), and "auto", the fast mode:
on a CPU with bfloat16 arithmetic, quantized weights stay compact and
activations are bfloat16; elsewhere it falls back to dense float weights
(bfloat16 on CUDA, float32 on CPUs without bfloat16 support).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, Weight, load_gguf, load_hf_dir
from .hardware import cpu_has_bf16
from .model import Transformer
from .quant import BlockWeight, Int8Embedding, Int8Linear, compact_linear
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("auto", *DTYPES)


@dataclass(frozen=True)
class Precision:
    """How weights are stored and in which dtype activations flow."""

    activations: torch.dtype
    compact: bool  # keep quantized weights as packed integers

    @property
    def name(self) -> str:
        dtype = str(self.activations).removeprefix("torch.")
        return f"{dtype}, compact quantized weights" if self.compact else dtype


def choose_precision(mode: str, device: torch.device) -> Precision:
    if mode not in MODES:
        raise ValueError(f"unsupported dtype {mode!r}; choose one of: {', '.join(MODES)}")
    if mode != "auto":
        return Precision(DTYPES[mode], compact=False)
    if device.type == "cuda":
        return Precision(torch.bfloat16, compact=False)
    if cpu_has_bf16():
        return Precision(torch.bfloat16, compact=True)
    return Precision(torch.float32, compact=False)


def load(path: Path, precision: Precision, progress: Callable[[int, int], None] | None):
    """Read weights and tokenizer from a .gguf file or an HF directory."""
    if path.is_dir():
        return load_hf_dir(path, progress), Tokenizer.from_pretrained_dir(path)
    ckpt = load_gguf(path, progress, keep_blocks=precision.compact)
    return ckpt, Tokenizer.from_gguf_metadata(ckpt.gguf_metadata)


def build_model(ckpt: Checkpoint, precision: Precision, device: torch.device) -> Transformer:
    """Assemble the modules from per-projection weights: fuse QKV and gate/up, pick compact kernels."""
    cfg, t, dtype = ckpt.config, ckpt.tensors, precision.activations
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        for i, layer in enumerate(model.layers):
            p = f"layers.{i}"
            layer.attn_norm.weight = _param(t[f"{p}.attn_norm"], dtype)
            layer.ffn_norm.weight = _param(t[f"{p}.ffn_norm"], dtype)
            layer.attn.qkv = _linear([t[f"{p}.q"], t[f"{p}.k"], t[f"{p}.v"]], precision)
            layer.attn.o = _linear([t[f"{p}.o"]], precision)
            layer.mlp.gate_up = _linear([t[f"{p}.gate"], t[f"{p}.up"]], precision)
            layer.mlp.down = _linear([t[f"{p}.down"]], precision)
        model.norm.weight = _param(t["norm"], dtype)
        model.lm_head = _linear([t["embed" if cfg.tie_word_embeddings else "lm_head"]], precision)
        model.embed = _embedding(t["embed"], model.lm_head if cfg.tie_word_embeddings else None, dtype)
    except KeyError as e:
        raise ValueError(f"checkpoint is missing tensor {e.args[0]!r}") from None
    model.rotary.to(dtype)  # tables in the activation dtype, as the reference computes them
    return model.to(device).eval()


def _param(w: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(w.to(dtype), requires_grad=False)


def _linear(parts: list[Weight], precision: Precision) -> nn.Module:
    """One linear layer over the row-wise concatenation of `parts` (fused projections)."""
    blocks = [w for w in parts if isinstance(w, BlockWeight)]
    fused = BlockWeight.cat(blocks) if len(blocks) == len(parts) else None
    if fused is None:  # float weights, or blocks of different types: one dense matrix
        fused = torch.cat([_dense(w) for w in parts])
    return compact_linear(fused, precision.activations)


def _dense(w: Weight) -> torch.Tensor:
    return w.dequantize() if isinstance(w, BlockWeight) else w


def _embedding(w: Weight, tied_head: nn.Module | None, dtype: torch.dtype) -> nn.Module:
    if isinstance(tied_head, Int8Linear):
        return Int8Embedding(tied_head)  # share the head's int8 rows instead of a second copy
    dense = _dense(w)
    emb = nn.Embedding(dense.shape[0], dense.shape[1], device="meta")
    emb.weight = _param(dense, dtype)
    return emb
