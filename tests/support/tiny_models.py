"""Tiny random-weight models built by the tests (Llama, Qwen2, Gemma 3): HF directories and GGUF files of the
same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]  # the tiny Llama's rows (64) fit no K-quant
K_QUANT_TYPES = ["Q5_0", "Q4_K", "Q5_K", "Q6_K"]  # need rows of a multiple of 256
NEW_FAMILY_TYPES = ["F32", "Q8_0", *K_QUANT_TYPES, "mixed"]  # the tiny Qwen2 and Gemma 3 files
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The Qwen2.5 template's tool parts, shortened to fit the tiny context: tools offered (by name) in a system turn,
# calls and responses rendered back.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool.function.name }}{% endfor %}"
    "\n</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{% for call in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Once upon a time there was a little model that predicted one token at a time.",
    "你好，世界！今天天气很好。 Emoji: 😀🎉👍",
    "Numbers 0123456789 and punctuation !?.,;:()[]{}",
]


def train_tokenizer(vocab_size: int = 384, byte_alphabet: bool = True):
    """A byte-level BPE trained on a small corpus: deterministic, a few hundred tokens. Without
    `byte_alphabet`, only the bytes the corpus uses are tokens: smaller, but not every text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return LlamaConfig(**{**kw, **overrides})


def qwen2_config(vocab_size: int, **overrides):
    """Rows of 256 and 512 weights, so that every GGUF type (K-quants: 256 per block) can store them."""
    from transformers import Qwen2Config

    kw = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=20000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return Qwen2Config(**{**kw, **overrides})


def gemma3_config(vocab_size: int, **overrides):
    """Gemma 3 270M's shape in miniature: one KV head of 256, five sliding layers (window 8) then a global one.
    head_dim = query_pre_attn_scalar = 256, as in the small Gemma 3 models, where GGUF readers agree on the scale."""
    from transformers import Gemma3TextConfig

    kw = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=8, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    return Gemma3TextConfig(**{**kw, **overrides})


FAMILIES = {"llama": llama_config, "qwen2": qwen2_config, "gemma3": gemma3_config}


def make_hf_model(path: Path, family: str = "llama", seed: int = 0, **config_overrides):
    """Save a random tiny model with its tokenizer as a Hugging Face directory; return the HF model."""
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer()
    torch.manual_seed(seed)
    cfg = FAMILIES[family](config_overrides.pop("vocab_size", tok.get_vocab_size()), **config_overrides)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    gemma = family == "gemma3"
    with torch.no_grad():  # HF initialises tiny weights near zero: widen them so that logits differ.
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, (2.4 if family == "llama" else 1.2) / p.shape[1] ** 0.5)
            else:  # norm factors near 1 (Gemma stores w for a factor of 1 + w), biases near 0
                p.normal_(1.0 if "norm" in name and not gemma else 0.0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return model


def with_chat_template(source: Path, path: Path, template: str) -> Path:
    """A copy of the HF directory `source` at `path` whose tokenizer has another chat template."""
    import shutil

    shutil.copytree(source, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return path


def make_hf_llama(path: Path, seed: int = 0, **config_overrides):
    return make_hf_model(path, "llama", seed, **config_overrides)


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
_GGUF_GEMMA_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# A Q4_K_M-like mix: fused projections whose parts need different compact forms, a 5-bit output projection.
MIXED_TYPES = {
    "token_embd": "Q8_0", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K",
    "attn_output": "Q5_0", "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K",
}


def _gguf_name(hf_name: str, gemma: bool) -> str:
    if hf_name in _GGUF_TENSOR_NAMES:
        return _GGUF_TENSOR_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    stem, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{(_GGUF_GEMMA_LAYER_NAMES if gemma else _GGUF_LAYER_NAMES)[stem]}.{suffix}"


def _quantize(a: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    import gguf

    from support.kquants import quantize_k

    qt = gguf.GGMLQuantizationType[qtype]
    if qt in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K):
        return quantize_k(a, qt), qt
    return gguf.quants.quantize(a, qt), qt


def write_gguf(path: Path, model, tokenizer, qtype: str = "F32", tokenizer_model: str = "gpt2") -> Path:
    """Write `model` (an HF Llama, Qwen2 or Gemma 3) as llama.cpp would; 2-D weights stored as `qtype`,
    or "mixed" for the per-tensor types of MIXED_TYPES. `tokenizer_model` "llama" labels the vocabulary
    SentencePiece (for Gemma files), without merges."""
    import gguf

    cfg = model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[cfg.model_type]
    gemma = arch == "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters["full_attention"] if gemma else cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if gemma:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    _add_tokenizer(w, tokenizer, tokenizer_model)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gguf_name = _gguf_name(name, gemma)
        a = tensor.detach().float().numpy()
        if gemma and name.endswith("norm.weight"):
            a = a + 1  # llama.cpp's converter stores Gemma's norm factor 1 + w
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = _permute_rope(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = _permute_rope(a, cfg.num_key_value_heads)
        tensor_type = MIXED_TYPES.get(gguf_name.split(".")[-2], "F32") if qtype == "mixed" else qtype
        if a.ndim == 2 and tensor_type != "F32":
            data, qt = _quantize(a, tensor_type)
            w.add_tensor(gguf_name, data, raw_dtype=qt)
        else:
            w.add_tensor(gguf_name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


write_gguf_llama = write_gguf  # the name the older tests import


def build_tiny(root: Path, family: str, gguf_types: list[str], **config_overrides) -> Path:
    """`root/"hf"` and `root/f"{type}.gguf"` for each type, all of the same random weights."""
    hf = make_hf_model(root / "hf", family, **config_overrides)
    tok = train_tokenizer()
    for q in gguf_types:
        write_gguf(root / f"{q}.gguf", hf, tok, q)
    return root


# The fuzzing seeds: (family, weight type, hidden size, GGUF tokenizer model); hidden 8 for the float types,
# 32 (a block) for the others.
FUZZ_SEEDS = [("llama", "F32", 8, "gpt2"), ("qwen2", "F16", 8, "gpt2"), ("gemma3", "BF16", 8, "llama"),
              ("llama", "Q8_0", 32, "gpt2"), ("qwen2", "Q4_0", 32, "gpt2"), ("gemma3", "Q4_1", 32, "gpt2")]


def write_fuzz_seeds(root: Path) -> list[Path]:
    """Valid GGUF files of a few KB, one per FUZZ_SEEDS entry: one layer, two heads, a ~130-token vocabulary.
    Their smallness keeps the fuzzer's mutations in the header, metadata and tensor table, not in weights."""
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(130, byte_alphabet=False)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for family, qtype, hidden, tokenizer_model in FUZZ_SEEDS:
        torch.manual_seed(0)
        cfg = FAMILIES[family](tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=hidden // 2, max_position_embeddings=64)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        paths.append(write_gguf(root / f"{family}-{qtype}.gguf", model, tok, qtype, tokenizer_model))
    return paths


def _add_tokenizer(w, tokenizer, model: str) -> None:
    spec = json.loads(tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model(model)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIAL else 1 for t, _ in vocab])
    if model == "gpt2":
        w.add_tokenizer_pre("gpt2")
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokenizer.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tokenizer.token_to_id("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
