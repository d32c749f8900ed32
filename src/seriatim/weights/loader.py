"""From a model reference to a ready `Transformer` + `Tokenizer`, in the chosen numeric mode.

Modes: "float32" (every weight dequantized: the exact reference path),
"bfloat16"/"float16" (dequantized to that type), and "auto", the fast mode:
at an ISA tier with bfloat16 arithmetic (avx512 or amx, kernels/isa.py),
quantized weights stay compact and activations are bfloat16; elsewhere it
falls back to dense float weights (bfloat16 on CUDA, float32 on CPUs below
that tier, or restricted below it by SERIATIM_ISA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelFileError, in_file
from ..kernels import isa, library
from ..model.config import ModelConfig
from ..model.quant import BlockWeight, compact_embedding, compact_linear, conversion_notice
from ..model.transformer import RMSNorm, Transformer
from ..text.tokenizer import Tokenizer
from .checkpoint import Checkpoint, load_gguf, load_hf_dir

log = logging.getLogger(__name__)

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
    if isa.tier() >= isa.Tier.AVX2:
        return Precision(torch.bfloat16, compact=True)
    return Precision(torch.float32, compact=False)


def load(path: Path, precision: Precision, progress: Callable[[int, int], None] | None):
    """Read weights and tokenizer from a .gguf file or an HF directory."""
    if path.is_dir():
        ckpt, tokenizer = load_hf_dir(path, progress), Tokenizer.from_pretrained_dir(path)
    else:
        ckpt = load_gguf(path, progress, keep_blocks=precision.compact)
        with in_file(path):
            tokenizer = Tokenizer.from_gguf_metadata(ckpt.gguf_metadata)
    with in_file(path):
        _check_vocabulary(ckpt.config, tokenizer)
    return ckpt, tokenizer


def _check_vocabulary(cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    """Token ids index the embedding's rows: the tokenizer's must all be below the model's vocabulary size."""
    ids = [*tokenizer.hf.get_vocab(with_added_tokens=True).values(), *tokenizer.eos_token_ids]
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    outside = next((i for i in ids if not 0 <= i < cfg.vocab_size), None)
    if outside is not None:
        raise ModelFileError(f"the tokenizer has token id {outside}, outside the model's vocabulary of "
                             f"{cfg.vocab_size}")


def build_model(ckpt: Checkpoint, precision: Precision, device: torch.device) -> Transformer:
    """Assemble the modules from per-projection weights: fuse QKV and gate/up, pick compact kernels."""
    cfg, t, dtype = ckpt.config, ckpt.tensors, precision.activations
    # The CPU fast mode below the avx512 tier has no bfloat16 arithmetic: dense weights stay float32 there.
    f32 = precision.compact and not library.bf16_matmul()
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        for i, layer in enumerate(model.layers):
            p = f"layers.{i}"
            norms = [(layer.attn_norm, "attn_norm"), (layer.ffn_norm, "ffn_norm")]
            if cfg.post_norms:
                norms += [(layer.post_attn_norm, "post_attn_norm"), (layer.post_ffn_norm, "post_ffn_norm")]
            for norm, name in norms:
                _set_norm(norm, t[f"{p}.{name}"], dtype)
            attn = layer.attn
            attn.qkv = compact_linear([t[f"{p}.q"], t[f"{p}.k"], t[f"{p}.v"]], dtype, f32)
            if cfg.qkv_bias:
                attn.qkv_bias = _param(torch.cat([t[f"{p}.q.bias"], t[f"{p}.k.bias"], t[f"{p}.v.bias"]]), dtype)
            if cfg.qk_norm:  # one weight row per fused head: the query norm's, then the key norm's
                heads = [t[f"{p}.q_norm"].expand(cfg.num_heads, -1), t[f"{p}.k_norm"].expand(cfg.num_kv_heads, -1)]
                _set_norm(attn.qk_norm, torch.cat(heads), dtype)
            attn.o = compact_linear([t[f"{p}.o"]], dtype, f32)
            layer.mlp.gate_up = compact_linear([t[f"{p}.gate"], t[f"{p}.up"]], dtype, f32)
            layer.mlp.down = compact_linear([t[f"{p}.down"]], dtype, f32)
        _set_norm(model.norm, t["norm"], dtype)
        model.lm_head = compact_linear([t["embed" if cfg.tie_word_embeddings else "lm_head"]], dtype, f32)
        model.embed = compact_embedding(t["embed"], model.lm_head if cfg.tie_word_embeddings else None, dtype)
    except KeyError as e:
        raise ValueError(f"checkpoint is missing tensor {e.args[0]!r}") from None
    notice = conversion_notice({w.qtype for w in t.values() if isinstance(w, BlockWeight)})
    if notice:
        log.info(notice)
    return model.to(device).eval()


def _param(w: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(w.to(dtype), requires_grad=False)


def _set_norm(norm: RMSNorm, w: torch.Tensor, dtype: torch.dtype) -> None:
    # Gemma's norms scale in float32, so their weight stays float32 (as the reference keeps it).
    norm.weight = _param(w, torch.float32 if norm.scale_in_float32 else dtype)
