"""A decoding pass's Llama-family layers in one C++ call (csrc/decode_layer.cpp).

model.py runs a layer as ~25 tensor ops and a dozen module calls. For a small model decoding one token
per pass, that Python costs about as much as the arithmetic (SmolLM2: ~4.5 of ~9 ms per token). Where
the model is the plain Llama form (RMSNorm before attention and MLP, rotary, full attention, SwiGLU,
an optional QKV bias: Llama, SmolLM2, Qwen2) and a pass is all decodes on the paged cache's
decode-attention kernel whose products take a vector or an AMX kernel (not the dense path), the engine
runs the pass through `FusedDecode.forward` instead of the model's: every layer in one call of a C++
object that holds the layers' weights. Each layer calls the functions the modules reach, in the same
order with the same arguments, so its output is the modules' bit for bit (tests/test_fused_decode.py).
The model itself stays plain modules."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import library
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
    """Every layer's weights gathered once into decode_layer.cpp's DecodeStack; `forward` takes the place of
    the model's for a pass of decodes."""

    def __init__(self, model: nn.Module, projections: list[list[list[torch.Tensor]]]):
        cfg = model.cfg
        self.model = model
        parts: list[torch.Tensor] = []
        layout: list[int] = []  # per layer: has a QKV bias, tensors of qkv, o, gate_up, down
        for layer, weights in zip(model.layers, projections):
            bias = [] if layer.attn.qkv_bias is None else [layer.attn.qkv_bias]
            parts += [layer.attn_norm.weight, layer.ffn_norm.weight, *bias, *(t for w in weights for t in w)]
            layout += [len(bias), *(len(w) for w in weights)]
        self.stack = torch.classes.seriatim.DecodeStack(parts, layout, cfg.rms_norm_eps, GROUP, cfg.num_heads,
                                                        cfg.attn_scale)
        self.by_rows: dict[int, list[int] | None] = {}  # rows -> paths(rows)

    @classmethod
    def of(cls, model: nn.Module) -> FusedDecode | None:
        """For a model in the plain Llama form, in bfloat16 on a CPU with our kernels; else None."""
        cfg = model.cfg
        plain = not (cfg.qk_norm or cfg.post_norms or cfg.gemma_norms or cfg.embed_scale is not None)
        windowless = all(cfg.layer_window(i) is None for i in range(cfg.num_layers))
        one_rope = len(set(model.rope_of_layer)) == 1
        llama = plain and windowless and one_rope and cfg.activation == "silu"
        if not llama or library.for_tensor(model.norm.weight) is None:
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
        """The model's forward (tokens, positions: [T] -> hidden states [T, D]) by the DecodeStack, or None
        where this pass cannot take it (prompt tokens in it, or products on the dense path)."""
        paths = self.paths(len(tokens))
        batch = backend.decode_kernel_batch() if paths is not None else None
        if batch is None:
            return None
        model = self.model
        x = model.embed_tokens(tokens)
        (cos, sin), = model.rope_tables(positions, x.dtype)
        return model.norm(self.stack.forward(x, paths, cos, sin, *batch))
