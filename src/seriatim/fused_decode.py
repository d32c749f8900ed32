"""A decoding pass's Llama-family layers as one C++ op each (csrc/decode_layer.cpp).

model.py runs a layer as ~25 tensor ops and a dozen module calls. For a small model decoding one token
per pass, that Python costs about as much as the arithmetic (SmolLM2: ~4.5 of ~9 ms per token). Where
the model is the plain Llama form (RMSNorm before attention and MLP, rotary, full attention, SwiGLU,
an optional QKV bias: Llama, SmolLM2, Qwen2) and a pass is all decodes on the paged cache's
decode-attention kernel whose products take a vector or an AMX kernel (not the dense path), the engine
runs the pass through `FusedDecode.forward` instead of the model's: each layer as one op. The op calls
the functions the modules reach, in the same order with the same arguments, so its output is the
modules' bit for bit (tests/test_fused_decode.py). The model itself stays plain modules."""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .paged_kv import PagedAttention
from .quant import GROUP, Int4Linear, Int8Linear


def _projection(module: nn.Module) -> list[torch.Tensor] | None:
    """A projection's tensors as decode_layer.cpp reads them, or None for a form it does not take."""
    if isinstance(module, Int4Linear):
        return [module.weight, module.scales_zeros]
    if isinstance(module, Int8Linear):
        return [module.weight, module.scale]
    if type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.bfloat16:
        return [module.weight]
    return None


PATH_CODES = {"kernel": 0, "amx": 1}  # decode_layer.cpp's Path


def _path(module: nn.Module, rows: int) -> int | None:
    """A projection's product for `rows` rows as the op's code; None for the dense path."""
    return PATH_CODES.get(module.path(rows)) if hasattr(module, "path") else PATH_CODES["kernel"]


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    return layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down


class FusedDecode:
    """Each layer's arguments for the op, gathered once; `run` takes the place of `DecoderLayer.forward`."""

    def __init__(self, model: nn.Module, projections: list[list[list[torch.Tensor]]]):
        cfg = model.cfg
        self.model = model
        # Per layer, the op's arguments before the rotary tables: the norms and projections.
        self.weights = [
            (layer.attn_norm.weight, layer.ffn_norm.weight, cfg.rms_norm_eps, qkv, layer.attn.qkv_bias, o, gate_up,
             down, GROUP)
            for layer, (qkv, o, gate_up, down) in zip(model.layers, projections)
        ]
        self.heads, self.scale = cfg.num_heads, cfg.attn_scale
        self.op = cpu_kernels.ops().decode_layer
        self.by_rows: dict[int, list[int] | None] = {}  # rows -> paths(rows)

    @classmethod
    def of(cls, model: nn.Module) -> FusedDecode | None:
        """For a model in the plain Llama form, in bfloat16 on a CPU with our kernels; else None."""
        cfg = model.cfg
        plain = not (cfg.qk_norm or cfg.post_norms or cfg.gemma_norms or cfg.embed_scale is not None)
        windowless = all(cfg.layer_window(i) is None for i in range(cfg.num_layers))
        if not (plain and windowless and cfg.activation == "silu") or cpu_kernels.for_tensor(model.norm.weight) is None:
            return None
        projections = []
        for layer in model.layers:
            parts = [_projection(m) for m in _projections(layer)]
            if any(p is None for p in parts):
                return None
            projections.append(parts)
        return cls(model, projections)

    def paths(self, rows: int) -> list[int] | None:
        """The op's product codes for qkv, o, gate_up and down (0: vector kernel, 1: AMX) at `rows` rows, as
        the modules choose them; None where a module would take another path (a dense chunk)."""
        if rows not in self.by_rows:
            per_layer = {tuple(_path(m, rows) for m in _projections(layer)) for layer in self.model.layers}
            codes = per_layer.pop() if len(per_layer) == 1 else (None,)
            self.by_rows[rows] = None if None in codes else list(codes)
        return self.by_rows[rows]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, backend: PagedAttention) -> torch.Tensor | None:
        """The model's forward (tokens, positions: [T] -> hidden states [T, D]) with each layer as one op, or
        None where this pass cannot take it (prompt tokens in it, or products on the dense path)."""
        paths = self.paths(len(tokens))
        attention = [backend.decode_kernel_args(i) for i in range(len(self.weights))] if paths is not None else []
        if paths is None or any(a is None for a in attention):
            return None
        model = self.model
        x = model.embed_tokens(tokens)
        ropes = model.rope_tables(positions, x.dtype)
        for i, rope in enumerate(model.rope_of_layer):
            x = self.run(i, x, ropes[rope], paths, attention[i])
        return model.norm(x)

    def run(self, index: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], paths: list[int],
            attention: tuple) -> torch.Tensor:
        """Layer `index` on x [T, D] -> [T, D]; `attention` is the decode-attention kernel's cache and batch
        arguments (paged_kv.PagedAttention.decode_kernel_args)."""
        return self.op(x, *self.weights[index], paths, *rope, self.heads, *attention, self.scale)
