"""Tokenizer: GGUF and HF-directory construction, checked against transformers on the same files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from seriatim.gguf_metadata import read_gguf_metadata
from seriatim.tokenizer import Tokenizer

CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see it's fine, don't worry. HE'S HERE; they'd've",
    "Hello , world . It 's n't ?",  # transformers' cleanup_tokenization_spaces would change this
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs\t",
    "multiple    spaces  between     words",
    "new\nlines\n\n\nand\r\nCRLF\r\n",
    " \n \t \u3000 ",
    "你好，世界！这是一个测试。",
    "こんにちは世界。안녕하세요!",
    "Мы говорим по-русски. Ελληνικά. مرحبا بالعالم",
    "I ❤️ 🦀 and 👩‍👩‍👧‍👦 and 🇫🇷🏳️‍🌈 👍🏽",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2.5, null], "emoji": "\\ud83e\\udd80"}',
    "3.14159 and 1,000,000 and 2024-01-01 and 0x1F and v2",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|> <repo_name>x<file_sep>",
    "<|im_start|<|im_end",  # not quite special tokens
    "Ｆｕｌｌｗｉｄｔｈ and ﬁ ligature and e\u0301 vs \u00e9",
    "zero\u200bwidth\u200d joiner\ufeffbom \u00a0nbsp\u2003em",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 \U0010ffff \U0001f9ff",
    "nul\x00 and del\x7f and bell\x07 and esc\x1b[0m",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗ and replacement \ufffd char",
]

# SmolLM's pre-tokenizer splits digits one by one *before* the GPT-2 regex (llama.cpp's "smollm" and the
# model's own tokenizer.json). transformers' GGUF loader skips that step, so on whitespace runs or a
# numeric sign before a number it differs; these are checked against llama.cpp's pieces instead.
DIGITS_SPLIT_FIRST = {
    "x   12": ["x", "ĠĠĠ", "1", "2"],
    "a\t\t3": ["a", "ĉĉ", "3"],
    "\n\n1": ["ĊĊ", "1"],
    "  ²": ["ĠĠ", "Â²"],
}


@pytest.fixture(scope="module")
def ours(smollm2_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name)


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(ours: Tokenizer, reference: Any, text: str) -> None:
    assert ours.encode(text) == reference(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_decode_matches_transformers_and_round_trips(ours: Tokenizer, reference: Any, text: str) -> None:
    ids = ours.encode(text)
    assert ours.decode(ids) == reference.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.real_model
def test_decode_arbitrary_ids_matches_transformers(ours: Tokenizer, reference: Any) -> None:
    # Random ids cut characters anywhere and mix in special tokens: the U+FFFD placement must agree too.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))] + [rng.randrange(17)]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.real_model
@pytest.mark.parametrize(("text", "pieces"), DIGITS_SPLIT_FIRST.items())
def test_smollm_splits_digits_first_like_llama_cpp(ours: Tokenizer, text: str, pieces: list[str]) -> None:
    ids = ours.encode(text)
    assert [ours.id_to_token(i) for i in ids] == pieces
    assert ours.decode(ids) == text


@pytest.mark.real_model
def test_special_tokens(ours: Tokenizer, reference: Any) -> None:
    # The file says bos=1, eos=2, which are <|im_start|> and <|im_end|>, as transformers reports.
    # Generation must also stop at <|endoftext|> (0), the base model's end of text.
    assert (ours.bos_token_id, ours.bos_token) == (reference.bos_token_id, reference.bos_token) == (1, "<|im_start|>")
    assert (ours.eos_token_id, ours.eos_token) == (reference.eos_token_id, reference.eos_token) == (2, "<|im_end|>")
    assert ours.eos_token_ids == {0, 2}
    assert ours.encode("hi") == reference("hi")["input_ids"] == [6004]  # no BOS: add_bos_token is false
    assert ours.vocab_size == len(reference) == 49152
    assert ours.chat_template == reference.chat_template
    assert ours.id_to_token(2) == "<|im_end|>"
    with pytest.raises(IndexError):
        ours.id_to_token(ours.vocab_size)


@pytest.mark.real_model
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompt_matches_transformers(ours: Tokenizer, reference: Any, add_generation_prompt: bool) -> None:
    messages = [{"role": "user", "content": "Hi 🦀"}, {"role": "assistant", "content": "Hello!"}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert prompt == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # A rendered prompt is encoded without adding special tokens, as transformers does.
    assert ours.encode(prompt, add_special_tokens=False) == reference(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.real_model
def test_from_pretrained_dir_matches_saved_reference(ours: Tokenizer, reference: Any, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    for text in CORPUS:
        assert loaded.encode(text) == reference(text)["input_ids"]
        assert loaded.decode(ours.encode(text)) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.eos_token_ids) == (1, 2, ours.eos_token_ids)
    assert loaded.chat_template == ours.chat_template


@pytest.mark.real_model
def test_read_gguf_metadata_gives_plain_values(smollm2_gguf_path: Path) -> None:
    meta = read_gguf_metadata(smollm2_gguf_path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 8192 and type(meta["llama.context_length"]) is int
    assert type(meta["llama.rope.freq_base"]) is float
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert type(meta["tokenizer.ggml.token_type"][0]) is int
    assert meta["tokenizer.ggml.merges"][0] == "Ġ t"


# A tiny byte-level vocabulary: the 256 byte symbols, a few merges, and some added tokens.
_BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
_MERGED = ["Ġt", "he", "Ġthe"]
_ADDED = {"<s>": 3, "</s>": 3, "<|im_end|>": 3, "<think>": 4}


def tiny_metadata(**overrides: Any) -> dict[str, Any]:
    tokens = _BYTES + _MERGED + list(_ADDED)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(_BYTES) + len(_MERGED)) + list(_ADDED.values()),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.bos_token_id": tokens.index("<s>"),
        "tokenizer.ggml.eos_token_id": tokens.index("</s>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}",
        **overrides,
    }


def test_tiny_gguf_tokenizer() -> None:
    tok = Tokenizer.from_gguf_metadata(tiny_metadata())
    ids = tok.encode("the the<think><|im_end|>")
    assert [tok.id_to_token(i) for i in ids] == ["t", "he", "Ġthe", "<think>", "<|im_end|>"]
    assert tok.decode(ids) == "the the<think><|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "the the<think>"  # <think> is user-defined, not special
    assert tok.eos_token_ids == {tok.eos_token_id, tok.encode("<|im_end|>")[0]}
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    assert tok.vocab_size == 256 + 3 + 4


def test_tiny_gguf_tokenizer_adds_bos_when_asked() -> None:
    tok = Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("he") == [tok.bos_token_id, tok.encode("he", add_special_tokens=False)[0]]


def test_gguf_tokenizer_rejects_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.chat_template": None})).apply_chat_template(
            [{"role": "user", "content": "hi"}]
        )


def test_from_pretrained_dir_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    vocab = {t: i for i, t in enumerate(_BYTES + _MERGED)}
    hf = HFTokenizer(BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ("<s>", "</s>", "<|im_end|>", "<eot>")
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 259)])
    hf.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},  # serialized AddedToken
        "eos_token": "</s>",
        "chat_template": template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [260, 262]}))

    tok = Tokenizer.from_pretrained_dir(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["the the", " the<|im_end|>x", "héllo 🦀", ""]:
        assert tok.encode(text) == reference(text)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<|im_end|>", "")
    assert tok.encode("")[0] == tok.bos_token_id == 259
    assert tok.eos_token_ids == {260, 261, 262}  # </s>, <|im_end|> by its text, <eot> from generation_config
    assert tok.chat_template == template
