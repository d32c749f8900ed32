"""Decoder-only transformer (Llama, Qwen2, Gemma 3) as plain PyTorch modules.

One set of modules serves every family; `ModelConfig` flags switch on what a
family adds: Q/K/V biases (Qwen2), per-head Q/K norms, norms after attention
and MLP, Gemma's RMSNorm, GELU gates, scaled embeddings, sliding-window
layers with their own rotary base, and soft-capped logits (Gemma).

The model sees one flat batch: the new tokens of every sequence concatenated
([T] ids and [T] positions). Where each sequence's keys and values live is the
business of the attention backend passed in (`AttentionBackend`), so a
scheduler can mix prefills and decodes of different lengths in one pass
without the model knowing.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import library
from .config import ModelConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, 1, Dh]
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class AttentionBackend(Protocol):
    """Stores new keys/values for layer `layer` and attends the queries over each sequence's cache."""

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: [T, H, Dh], k/v: [T, Hkv, Dh] -> [T, H, Dh]. Scores are scaled by `scale`; with a `window`,
        a query at position p sees only the keys at positions (p - window, p]."""
        ...


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, normalised in float32 whatever the activation dtype.

    Llama scales after casting back to the activation dtype; Gemma (`scale_in_float32`) scales in
    float32 and casts after, its weight kept in float32 by the loader. `shape` may cover several
    trailing dimensions (a per-head weight for the fused query/key norm).
    """

    def __init__(self, shape: int | tuple[int, ...], eps: float, scale_in_float32: bool = False):
        super().__init__()
        self.eps = eps
        self.scale_in_float32 = scale_in_float32
        self.weight = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := library.for_tensor(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps, self.scale_in_float32)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_float32:
            return (h * self.weight).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding in the "rotate half" (NeoX / HF) layout."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Computed, not loaded: an explicit device keeps it real when the rest of the model is
        # built on the meta device. Float32 whatever the activation dtype, as the reference keeps it.
        dims = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
        self.register_buffer("inv_freq", 1.0 / (theta ** (dims / head_dim)), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, Dh] in `dtype`, computed once per pass and shared by the layers.
        Computed rather than looked up in a table: as cheap, and no [context, Dh] table in memory."""
        freqs = positions[:, None].float() * self.inv_freq  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, Dh]"""
    if (ops := library.for_tensor(x)) is not None:
        return ops.rotary(x, cos, sin)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale, self.window = cfg.attn_scale, cfg.layer_window(layer)
        # One fused projection: one matmul per step instead of three. Its bias (Qwen2) is a separate
        # parameter because the compact int4/int8 modules have none.
        self.qkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=False)
        self.qkv_bias = nn.Parameter(torch.zeros(cfg.q_size + 2 * cfg.kv_size)) if cfg.qkv_bias else None
        # Gemma 3 normalises each query and key head; one norm over the fused heads does both, with the
        # query weight repeated over the query heads and the key weight over the key heads.
        heads = cfg.num_heads + cfg.num_kv_heads
        self.qk_norm = RMSNorm((heads, cfg.head_dim), cfg.rms_norm_eps, cfg.gemma_norms) if cfg.qk_norm else None
        self.o = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        """x: [T, D] -> [T, D]"""
        qkv = self.qkv(x)  # [T, (H + 2 Hkv) Dh]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        # Rotate queries and keys in one go: they sit side by side in the fused output.
        q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, Dh], [T, Hkv, Dh]
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        out = backend.attend(self.layer, q, k, v, self.scale, self.window)  # [T, H, Dh]
        return self.o(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """Gated feed-forward (SwiGLU, or GELU-tanh for Gemma) with the gate and up projections fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] -> [T, D]"""
        gate_up = self.gate_up(x)  # [T, 2I]
        if self.act is F.silu and (ops := library.for_tensor(gate_up)) is not None:
            return self.down(ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return self.down(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)

        self.attn_norm, self.attn, self.ffn_norm, self.mlp = norm(), Attention(cfg, layer), norm(), MLP(cfg)
        # Gemma also normalises each block's output before adding it to the residual stream.
        self.post_attn_norm = norm() if cfg.post_norms else nn.Identity()
        self.post_ffn_norm = norm() if cfg.post_norms else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        """x: [T, D] -> [T, D]"""
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), rope, backend))
        return x + self.post_ffn_norm(self.mlp(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Not randomly initialised: weights are always loaded, and normal_ on the meta device, where
        # the model is built, imports ~800 modules of PyTorch's decompositions (~70 MB).
        self.embed = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # One rotary per distinct base (Gemma 3: global and sliding layers differ), computed once per pass.
        thetas = sorted({cfg.layer_rope_theta(i) for i in range(cfg.num_layers)})
        self.rotary = nn.ModuleList(Rotary(cfg.head_dim, theta) for theta in thetas)
        self.rope_of_layer = [thetas.index(cfg.layer_rope_theta(i)) for i in range(cfg.num_layers)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """tokens, positions: [T] -> final hidden states [T, D]"""
        x = self.embed_tokens(tokens)  # [T, D]
        ropes = self.rope_tables(positions, x.dtype)
        for layer, rope in zip(self.layers, self.rope_of_layer):
            x = layer(x, ropes[rope], backend)
        return self.norm(x)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [T] -> embeddings [T, D]"""
        x = self.embed(tokens)
        if self.cfg.embed_scale is not None:
            # Scaled in the activation dtype, as the reference does (sqrt(D) rounds to bfloat16 first).
            x = x * torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(x.dtype)
        return x

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each rotary base's (cos, sin) [T, 1, Dh] for `positions` [T]; layer i uses rope_of_layer[i]."""
        return [rotary(positions, dtype) for rotary in self.rotary]

    def bytes_per_token(self, head: nn.Module | None = None) -> int:
        """Weight bytes one decode pass reads, with `head` (a part of the head's rows) for the model's own: all
        but the embedding table, of which it reads a row (a table tied to the head counts as the head), and
        the rotary tables."""
        modules = [m for name, m in self.named_children() if name not in ("embed", "rotary", "lm_head")]
        modules.append(self.lm_head if head is None else head)
        tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def logits(self, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """hidden: [N, D] -> float32 logits [N, V], or over the first V' ids by `head`, a part of the head's rows"""
        head = self.lm_head if head is None else head
        # A compact int8 head writes float32 itself: no rounding of the logits to bfloat16 and no copy.
        logits = head(hidden, float_out=True) if getattr(head, "writes_float", False) else head(hidden).float()
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
