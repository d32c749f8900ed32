"""Tiny random-weight models built by the tests: HF directories and GGUF files of the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Once upon a time there was a little model that predicted one token at a time.",
    "你好，世界！今天天气很好。 Emoji: 😀🎉👍",
    "Numbers 0123456789 and punctuation !?.,;:()[]{}",
]


def train_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained on a small corpus: deterministic, a few hundred tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_hf_llama(path: Path, seed: int = 0, **config_overrides):
    """Save a random tiny Llama with its tokenizer as a Hugging Face directory; return the HF model."""
    from transformers import LlamaForCausalLM

    tok = train_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tok.get_vocab_size(), **config_overrides)).eval()
    with torch.no_grad():  # HF initialises tiny weights near zero: widen them so logits differ.
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return model


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert step: interleave the rotary halves of each Q/K head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_TENSOR_NAMES:
        return _GGUF_TENSOR_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    stem, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[stem]}.{suffix}"


def write_gguf_llama(path: Path, model, tokenizer, qtype: str = "F32") -> Path:
    """Write `model` (an HF Llama) as a llama.cpp-style GGUF; 2-D weights stored as `qtype`."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(w, tokenizer)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, tensor in model.state_dict().items():
        a = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute_rope(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute_rope(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w, tokenizer) -> None:
    spec = json.loads(tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIAL else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tokenizer.token_to_id("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
