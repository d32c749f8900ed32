"""Architecture hyper-parameters, read from GGUF metadata or an HF config.json.

One `ModelConfig` describes every supported family: the Llama layout, plus
flags for what Qwen2 and Gemma 3 do differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ModelFileError
from ..weights.fields import REQUIRED, positive, value

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# HF `model_type` -> our architecture name.
_HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}

# Gemma 3 facts that GGUF files leave implicit (llama.cpp hard-codes them too).
GEMMA3_SLIDING_PERIOD = 6  # every 6th layer is global, the other five slide
GEMMA3_LOCAL_ROPE_THETA = 10000.0

# Far above any model's (the largest have ~130) and low enough for the per-layer tuples built from it before
# the tensors are seen.
MAX_LAYERS = 1024


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

    def __post_init__(self) -> None:
        """What no model can be, whichever file the values came from (each was checked where it was read)."""
        if self.num_heads % self.num_kv_heads:
            raise ModelFileError(f"{self.num_heads} attention heads cannot share {self.num_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise ModelFileError(f"the head size {self.head_dim} is odd: rotary embeddings turn pairs of values")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ModelFileError(f"{len(self.sliding_layers)} layer types for {self.num_layers} layers")
        if any(self.sliding_layers) and self.sliding_window is None:
            raise ModelFileError("sliding-window layers without a window size")

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


def unsupported_architecture(arch: str) -> ModelFileError:
    return ModelFileError(
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


def _head_dim(given: int | None, hidden: int, heads: int) -> int:
    """The file's head size, or hidden / heads where it gives none (then the heads must divide the hidden size)."""
    if given is not None:
        return given
    if hidden % heads:
        raise ModelFileError(f"{heads} attention heads do not divide the hidden size {hidden}")
    return hidden // heads


def gguf_vocab_size(meta: dict[str, Any]) -> int:
    """The logits' width: the architecture's vocab_size where the file gives one, else the token count."""
    arch = meta.get("general.architecture")
    count = positive(meta, f"{arch}.vocab_size", int, None) or len(value(meta, "tokenizer.ggml.tokens", list, []))
    if not count:
        raise ModelFileError(f"gives neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    return count


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build a config from GGUF metadata (keys are prefixed by the architecture name)."""
    arch = value(meta, "general.architecture", str, "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(arch)

    def get(key: str, kind: type = int, default: Any = REQUIRED, limit: int | None = None) -> Any:
        try:
            return positive(meta, f"{arch}.{key}", kind, default, limit)
        except KeyError:
            raise ModelFileError(f"lacks the metadata key {arch}.{key}") from None

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    head_dim = _head_dim(get("attention.key_length", default=None), hidden, heads)
    layers = get("block_count", limit=MAX_LAYERS)
    family = _family(arch, hidden)
    window = get("attention.sliding_window", default=None)
    if arch == "gemma3":
        # llama.cpp's rule: scores scale by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): hidden/heads.
        family.update(
            rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        )
        if window:
            family.update(sliding_window=window, sliding_layers=_periodic_sliding(layers, GEMMA3_SLIDING_PERIOD))
    return ModelConfig(
        arch=arch,
        vocab_size=gguf_vocab_size(meta),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", default=heads),
        head_dim=head_dim,
        rope_theta=get("rope.freq_base", float, 10000.0),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
        context_length=get("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        final_logit_softcap=get("final_logit_softcapping", float, None),
        **family,
    )


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build a config from a Hugging Face `config.json` dictionary."""
    model_type = value(cfg, "model_type", str, "?")
    if model_type not in _HF_MODEL_TYPES:
        raise unsupported_architecture(model_type)
    try:
        return _config_from_hf(cfg, model_type)
    except KeyError as e:
        raise ModelFileError(f"has no {e.args[0]!r}, which a {model_type} model needs") from None


def _config_from_hf(cfg: dict[str, Any], model_type: str) -> ModelConfig:
    arch = _HF_MODEL_TYPES[model_type]
    if cfg.get("attn_logit_softcapping") is not None:
        raise ModelFileError("unsupported attention logit soft-capping (Gemma 2 style)")
    heads = positive(cfg, "num_attention_heads")
    layers = positive(cfg, "num_hidden_layers", limit=MAX_LAYERS)
    hidden = positive(cfg, "hidden_size")
    global_theta, local_theta = _hf_rope_thetas(cfg)
    sliding = _hf_sliding_layers(cfg, model_type, layers)
    family = _family(arch, hidden)
    if any(sliding):
        family.update(sliding_window=positive(cfg, "sliding_window"), sliding_layers=sliding)
    if arch == "gemma3":
        family.update(rope_local_theta=local_theta, query_pre_attn_scalar=positive(cfg, "query_pre_attn_scalar",
                                                                                   float, 256.0))
    return ModelConfig(
        arch=arch,
        vocab_size=positive(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=positive(cfg, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=positive(cfg, "num_key_value_heads", default=heads),
        head_dim=_head_dim(positive(cfg, "head_dim", default=None), hidden, heads),
        rope_theta=global_theta,
        rms_norm_eps=positive(cfg, "rms_norm_eps", float, 1e-6),
        context_length=positive(cfg, "max_position_embeddings", default=2048),
        # Gemma ties by default; the others say so explicitly when they do.
        tie_word_embeddings=value(cfg, "tie_word_embeddings", bool, arch == "gemma3"),
        final_logit_softcap=positive(cfg, "final_logit_softcapping", float, None),
        **family,
    )


def _hf_rope_thetas(cfg: dict[str, Any]) -> tuple[float, float]:
    """(global, sliding-layer) rotary bases. transformers 5 writes `rope_parameters` (per layer type for
    Gemma 3); older files write `rope_theta`, `rope_local_base_freq` and `rope_scaling`."""
    params = value(cfg, "rope_parameters", dict, None) or value(cfg, "rope_scaling", dict, {})
    per_type = params if "full_attention" in params else {"full_attention": params}
    ropes = {name: value(per_type, name, dict, {}) for name in {*per_type, "sliding_attention"}}
    for rope in ropes.values():
        if (value(rope, "rope_type", str, None) or value(rope, "type", str, "default")) != "default":
            raise ModelFileError(f"unsupported RoPE scaling {rope!r}; only plain RoPE is supported")
    default_global = 1e6 if cfg.get("model_type") == "gemma3_text" else 10000.0
    global_theta = positive(ropes["full_attention"], "rope_theta", float, None) or positive(
        cfg, "rope_theta", float, default_global)
    local_theta = positive(ropes["sliding_attention"], "rope_theta", float, None) or positive(
        cfg, "rope_local_base_freq", float, GEMMA3_LOCAL_ROPE_THETA)
    return global_theta, local_theta


def _hf_sliding_layers(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[bool, ...]:
    if layer_types := value(cfg, "layer_types", list[str], None):
        return tuple(t == "sliding_attention" for t in layer_types)
    if model_type == "gemma3_text":
        return _periodic_sliding(num_layers, positive(cfg, "sliding_window_pattern", default=GEMMA3_SLIDING_PERIOD))
    if model_type == "qwen2" and value(cfg, "use_sliding_window", bool, False):
        return tuple(i >= value(cfg, "max_window_layers", int, num_layers) for i in range(num_layers))
    return ()
