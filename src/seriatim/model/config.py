"""Architecture hyper-parameters, read from GGUF metadata or an HF config.json.

One `ModelConfig` describes every supported family: the Llama layout, plus
flags for what Qwen2 and Gemma 3 do differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# HF `model_type` -> our architecture name.
_HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}

# Gemma 3 facts that GGUF files leave implicit (llama.cpp hard-codes them too).
GEMMA3_SLIDING_PERIOD = 6  # every 6th layer is global, the other five slide
GEMMA3_LOCAL_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    tie_word_embeddings: bool
    # Where the families differ; the defaults are Llama's.
    qkv_bias: bool = False  # Qwen2: biases on the Q, K and V projections
    qk_norm: bool = False  # Gemma 3: RMSNorm over each query and key head before rotation
    post_norms: bool = False  # Gemma: also normalise the attention and MLP outputs before the residual add
    gemma_norms: bool = False  # Gemma's RMSNorm: scale by (1 + w) in float32, then cast (see checkpoint.py)
    activation: str = "silu"  # gate activation of the MLP: "silu" or "gelu_tanh"
    embed_scale: float | None = None  # Gemma: embeddings are multiplied by sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power (default head_dim)
    # A sliding layer's query sees the last `sliding_window` positions, itself included.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it slide? (empty: none does)
    rope_local_theta: float | None = None  # rotary base of the sliding layers (Gemma 3); None: rope_theta
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        # `** -0.5` as the reference computes it (1 / sqrt can differ in the last bit).
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The layer's sliding window, or None for a layer that attends over everything."""
        return self.sliding_window if self.sliding_layers and self.sliding_layers[layer] else None

    def layer_rope_theta(self, layer: int) -> float:
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta
        return self.rope_theta


def unsupported_architecture(arch: str) -> ValueError:
    return ValueError(
        f"unsupported model architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _family(arch: str, hidden: int) -> dict[str, Any]:
    """The flags that follow from the architecture alone (shared by the GGUF and HF readers)."""
    if arch == "qwen2":
        return dict(qkv_bias=True)
    if arch == "gemma3":
        return dict(qk_norm=True, post_norms=True, gemma_norms=True, activation="gelu_tanh", embed_scale=hidden**0.5)
    return {}


def _periodic_sliding(num_layers: int, period: int) -> tuple[bool, ...]:
    """Gemma's pattern: every `period`-th layer is global, the others slide."""
    return tuple((i + 1) % period != 0 for i in range(num_layers))


def gguf_vocab_size(meta: dict[str, Any]) -> int:
    """The logits' width: the architecture's vocab_size where the file gives one, else the token count."""
    return int(meta.get(f"{meta.get('general.architecture')}.vocab_size") or len(meta["tokenizer.ggml.tokens"]))


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build a config from GGUF metadata (keys are prefixed by the architecture name)."""
    arch = meta.get("general.architecture", "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(arch)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF file lacks required metadata key {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    layers = int(get("block_count"))
    family = _family(arch, hidden)
    window = meta.get(f"{arch}.attention.sliding_window")
    if arch == "gemma3":
        # llama.cpp's rule: scores scale by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): hidden/heads.
        family.update(
            rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        )
        if window:
            family.update(sliding_window=int(window), sliding_layers=_periodic_sliding(layers, GEMMA3_SLIDING_PERIOD))
    return ModelConfig(
        arch=arch,
        vocab_size=gguf_vocab_size(meta),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        context_length=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping"),
        **family,
    )


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build a config from a Hugging Face `config.json` dictionary."""
    model_type = cfg.get("model_type", "?")
    if model_type not in _HF_MODEL_TYPES:
        raise unsupported_architecture(model_type)
    try:
        return _config_from_hf(cfg, model_type)
    except KeyError as e:
        raise ValueError(f"config.json has no {e.args[0]!r}, which a {model_type} model needs") from None


def _config_from_hf(cfg: dict[str, Any], model_type: str) -> ModelConfig:
    arch = _HF_MODEL_TYPES[model_type]
    if cfg.get("attn_logit_softcapping") is not None:
        raise ValueError("unsupported attention logit soft-capping (Gemma 2 style)")
    heads = cfg["num_attention_heads"]
    layers = cfg["num_hidden_layers"]
    global_theta, local_theta = _hf_rope_thetas(cfg)
    sliding = _hf_sliding_layers(cfg, model_type, layers)
    family = _family(arch, cfg["hidden_size"])
    if any(sliding):
        family.update(sliding_window=cfg["sliding_window"], sliding_layers=sliding)
    if arch == "gemma3":
        family.update(rope_local_theta=local_theta, query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256))
    return ModelConfig(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=global_theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        context_length=cfg.get("max_position_embeddings", 2048),
        # Gemma ties by default; the others say so explicitly when they do.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        **family,
    )


def _hf_rope_thetas(cfg: dict[str, Any]) -> tuple[float, float]:
    """(global, sliding-layer) rotary bases. transformers 5 writes `rope_parameters` (per layer type for
    Gemma 3); older files write `rope_theta`, `rope_local_base_freq` and `rope_scaling`."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    per_type = params if "full_attention" in params else {"full_attention": params, "sliding_attention": {}}
    for rope in per_type.values():
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported RoPE scaling {rope!r}; only plain RoPE is supported")
    default_global = 1e6 if cfg.get("model_type") == "gemma3_text" else 10000.0
    global_theta = per_type["full_attention"].get("rope_theta") or cfg.get("rope_theta") or default_global
    local_theta = (per_type["sliding_attention"].get("rope_theta") or cfg.get("rope_local_base_freq")
                   or GEMMA3_LOCAL_ROPE_THETA)
    return float(global_theta), float(local_theta)


def _hf_sliding_layers(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[bool, ...]:
    if cfg.get("layer_types"):
        return tuple(t == "sliding_attention" for t in cfg["layer_types"])
    if model_type == "gemma3_text":
        return _periodic_sliding(num_layers, cfg.get("sliding_window_pattern", GEMMA3_SLIDING_PERIOD))
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        return tuple(i >= cfg.get("max_window_layers", num_layers) for i in range(num_layers))
    return ()
