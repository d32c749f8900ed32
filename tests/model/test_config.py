"""ModelConfig from GGUF metadata (keys as the real Gemma 3 / Qwen2 files have them) and from config.json styles."""

from __future__ import annotations

import pytest

from seriatim.model.config import config_from_gguf, config_from_hf


def gemma3_meta(layers: int = 18) -> dict:
    """The metadata of gemma3-270m's GGUF (what matters here)."""
    g = "gemma3."
    return {
        "general.architecture": "gemma3", g + "context_length": 32768, g + "embedding_length": 640,
        g + "block_count": layers, g + "feed_forward_length": 2048, g + "attention.head_count": 4,
        g + "attention.head_count_kv": 1, g + "attention.key_length": 256, g + "attention.value_length": 256,
        g + "rope.freq_base": 1e6, g + "attention.sliding_window": 512,
        g + "attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.tokens": ["a"] * 262144,
    }


def test_gemma3_from_gguf():
    cfg = config_from_gguf(gemma3_meta(), {"token_embd.weight"})
    assert cfg.tie_word_embeddings and cfg.qk_norm and cfg.post_norms and cfg.gemma_norms
    assert cfg.activation == "gelu_tanh" and cfg.embed_scale == 640**0.5
    assert [cfg.layer_window(i) for i in range(7)] == [512] * 5 + [None, 512]
    assert [cfg.layer_rope_theta(i) for i in (0, 5)] == [10000.0, 1e6]
    assert cfg.attn_scale == 256**-0.5  # head_dim, not hidden / heads = 160


def test_gemma3_27b_scales_by_hidden_over_heads():
    assert config_from_gguf(gemma3_meta(layers=62), set()).attn_scale == 160**-0.5  # llama.cpp's 27B rule


def test_qwen2_from_gguf():
    q = "qwen2."
    meta = {
        "general.architecture": "qwen2", q + "context_length": 32768, q + "embedding_length": 896,
        q + "block_count": 24, q + "feed_forward_length": 4864, q + "attention.head_count": 14,
        q + "attention.head_count_kv": 2, q + "rope.freq_base": 1e6, q + "attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.tokens": ["a"] * 151936,
    }
    cfg = config_from_gguf(meta, {"output.weight"})
    assert cfg.qkv_bias and not cfg.tie_word_embeddings and not cfg.qk_norm and cfg.head_dim == 64
    assert cfg.layer_window(0) is None and cfg.attn_scale == 64**-0.5


def test_qwen2_config_json_without_sliding():
    """Qwen2.5's config.json names a window but leaves use_sliding_window off."""
    cfg = config_from_hf({
        "model_type": "qwen2", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6,
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": True,
    })
    assert cfg.sliding_window is None and cfg.layer_window(1) is None
    assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.rope_theta == 1e6


def test_gemma3_config_json_before_transformers_5():
    """Older files: rope_theta, rope_local_base_freq and sliding_window_pattern instead of per-type parameters."""
    cfg = config_from_hf({
        "model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "sliding_window": 512, "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 24, "rope_scaling": None,
    })
    assert [cfg.layer_window(i) for i in range(4)] == [512, None, 512, None]
    assert [cfg.layer_rope_theta(i) for i in range(2)] == [10000.0, 1e6]
    assert cfg.tie_word_embeddings and cfg.attn_scale == 24**-0.5


def test_scaled_rope_is_refused():
    with pytest.raises(ValueError, match="unsupported RoPE scaling"):
        config_from_hf({
            "model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        })
