"""A decoding pass's Llama-family layers in one C++ call (csrc/decode_layer.cpp).

transformer.py runs a layer as ~25 tensor ops and a dozen module calls. For a small model decoding one
token per pass, that Python costs about as much as the arithmetic. Where the model is the plain Llama
form (RMSNorm before attention and MLP, rotary, full attention, SwiGLU, an optional QKV bias: Llama,
SmolLM2, Qwen2) with bfloat16 activations on a CPU with our kernels, the engine (engine/runner.py) runs
its passes of decodes (and of short chunks after cached tokens, which attend as decodes) through
`FusedDecode.forward` instead: every layer in one call of a C++ object that
holds the layers' weights. Each layer calls the functions the modules reach, in the same order with the
same arguments and the same products (`quant.Product`, chosen per projection by the module itself), so
its output is the modules' bit for bit (tests/model/test_fused_decode.py). The model stays plain modules.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import library
from .paged_kv import DecodeBatch
from .quant import GROUP, Float32Linear, Int4Linear, Int8Linear, Product


def _tensors(module: nn.Module) -> list[torch.Tensor] | None:
    """A projection's tensors as decode_layer.cpp reads them, or None for a form it does not take."""
    if isinstance(module, Int4Linear):
        return [module.weight, module.scales_zeros]
    if isinstance(module, Int8Linear):
        return [module.weight, module.scale]
    if type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.bfloat16:
        return [module.weight]
    if type(module) is Float32Linear and module.bias is None:
        return [module.weight]
    return None


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    return layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down


def _product(module: nn.Module, rows: int) -> Product:
    """The module's product for `rows` rows (a dense bfloat16 weight's is always DENSE)."""
    return module.product(rows) if isinstance(module, (Int4Linear, Int8Linear)) else Product.DENSE


class FusedDecode:
    """Every layer's weights gathered once into decode_layer.cpp's DecodeStack; `forward` takes the place of
    the model's for a pass of decodes."""

    def __init__(self, model: nn.Module, tensors: list[list[list[torch.Tensor]]]):
        cfg = model.cfg
        self.model = model
        parts: list[torch.Tensor] = []
        layout: list[int] = []  # per layer: has a QKV bias, tensors of qkv, o, gate_up, down
        for layer, weights in zip(model.layers, tensors):
            bias = [] if layer.attn.qkv_bias is None else [layer.attn.qkv_bias]
            parts += [layer.attn_norm.weight, layer.ffn_norm.weight, *bias, *(t for w in weights for t in w)]
            layout += [len(bias), *(len(w) for w in weights)]
        self.stack = library.decode_stack()(parts, layout, cfg.rms_norm_eps, GROUP, cfg.num_heads,
                                                        cfg.attn_scale)
        self.by_rows: dict[int, list[int]] = {}  # rows -> products(rows)

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
        tensors = [[_tensors(m) for m in _projections(layer)] for layer in model.layers]
        if any(t is None for layer in tensors for t in layer):
            return None
        return cls(model, tensors)

    def products(self, rows: int) -> list[int]:
        """Each layer's products of qkv, o, gate_up and down for `rows` rows, as the modules pick them."""
        if rows not in self.by_rows:
            self.by_rows[rows] = [int(_product(m, rows)) for layer in self.model.layers for m in _projections(layer)]
        return self.by_rows[rows]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                decodes: DecodeBatch) -> torch.Tensor:
        """The model's forward (tokens, positions: [T] -> hidden states [T, D]) for a pass whose every token
        attends as one query of the decode-attention kernel (`decodes` covers all T rows, in order), over the
        paged cache's pools [layers, Hkv, S, Dh]."""
        model = self.model
        x = model.embed_tokens(tokens)
        (cos, sin), = model.rope_tables(positions, x.dtype)
        products = self.products(len(tokens))
        return model.norm(self.stack.forward(x, products, cos, sin, cache_k, cache_v, decodes.rows, decodes.write,
                                             decodes.read, decodes.lengths))
