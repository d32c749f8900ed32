"""Tokenizer: GGUF and HF-directory construction, checked against transformers on the same files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from seriatim.text.tokenizer import Tokenizer
from seriatim.weights.gguf_file import read_gguf_metadata
from seriatim.weights.registry import REGISTRY, missing_packages, model_file

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


MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"]


@dataclass(frozen=True)
class Expected:
    bos: tuple[int, str]
    eos: tuple[int, str]
    stop: set[int]  # every id that ends a generation
    hi: list[int]  # `encode("hi")`: shows whether BOS is added
    vocab_size: int


EXPECTED = {
    # The file says bos=1, eos=2, which are <|im_start|> and <|im_end|>, as transformers reports; generation
    # must also stop at <|endoftext|> (0), the base model's end of text. No BOS: add_bos_token is false.
    "smollm2-135m": Expected((1, "<|im_start|>"), (2, "<|im_end|>"), {0, 2}, [6004], 49152),
    "qwen2.5-coder-0.5b": Expected(
        (151643, "<|endoftext|>"), (151645, "<|im_end|>"), {151643, 151645}, [6023], 151936
    ),
    # SentencePiece with add_bos_token: BOS first. Chat turns end with <end_of_turn>.
    "gemma3-270m": Expected((2, "<bos>"), (1, "<eos>"), {1, 106}, [2, 2202], 262144),
}


@dataclass(frozen=True)
class Pair:
    name: str
    path: Path
    ours: Tokenizer
    reference: Any  # transformers' tokenizer from the same GGUF file


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest) -> Pair:
    """Ours and transformers' tokenizer for one registry model. Slow to build, so every test that takes it
    runs for every model, and pytest groups them to build each pair once."""
    transformers = pytest.importorskip("transformers")
    entry = REGISTRY[request.param]
    if missing_packages(entry):
        pytest.skip(f"needs the model: seriatim pull {entry.name}")
    path = model_file(entry)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Pair(entry.name, path, Tokenizer.from_gguf(path), reference)


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(pair: Pair, text: str) -> None:
    assert pair.ours.encode(text) == pair.reference(text)["input_ids"]
    expected = pair.reference(text, add_special_tokens=False)["input_ids"]
    assert pair.ours.encode(text, add_special_tokens=False) == expected


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_decode_matches_transformers_and_round_trips(pair: Pair, text: str) -> None:
    ids = pair.ours.encode(text, add_special_tokens=False)
    assert pair.ours.decode(ids) == pair.reference.decode(ids) == text
    ids = pair.ours.encode(text)
    for skip in (False, True):
        assert pair.ours.decode(ids, skip_special_tokens=skip) == pair.reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.real_model
def test_decode_arbitrary_ids_matches_transformers(pair: Pair) -> None:
    # Random ids cut characters anywhere and mix in special tokens: the U+FFFD placement must agree too.
    rng = random.Random(0)
    specials = sorted(pair.ours.hf.get_added_tokens_decoder())
    for _ in range(200):
        ids = [rng.randrange(pair.ours.vocab_size) for _ in range(rng.randrange(1, 12))] + [rng.choice(specials)]
        for skip in (False, True):
            expected = pair.reference.decode(ids, skip_special_tokens=skip)
            assert pair.ours.decode(ids, skip_special_tokens=skip) == expected


@pytest.mark.real_model
@pytest.mark.parametrize(("text", "pieces"), DIGITS_SPLIT_FIRST.items())
def test_digits_after_whitespace(pair: Pair, text: str, pieces: list[str]) -> None:
    ids = pair.ours.encode(text)
    if pair.name == "smollm2-135m":  # splits digits first, like llama.cpp and unlike transformers
        assert [pair.ours.id_to_token(i) for i in ids] == pieces
    else:
        assert ids == pair.reference(text)["input_ids"]
    assert pair.ours.decode(ids, skip_special_tokens=True) == text


@pytest.mark.real_model
def test_special_tokens(pair: Pair) -> None:
    ours, reference, expected = pair.ours, pair.reference, EXPECTED[pair.name]
    assert (ours.bos_token_id, ours.bos_token) == (reference.bos_token_id, reference.bos_token) == expected.bos
    assert (ours.eos_token_id, ours.eos_token) == (reference.eos_token_id, reference.eos_token) == expected.eos
    assert ours.eos_token_ids == expected.stop
    assert ours.encode("hi") == reference("hi")["input_ids"] == expected.hi
    assert ours.vocab_size == len(reference) == expected.vocab_size
    assert ours.chat_template == reference.chat_template
    assert ours.id_to_token(expected.eos[0]) == expected.eos[1]
    with pytest.raises(IndexError):
        ours.id_to_token(ours.vocab_size)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi 🦀, what's the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]},
    {"role": "tool", "content": "18°C, sunny"},
    {"role": "assistant", "content": "Sunny, 18°C."},
]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


@pytest.mark.real_model
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_prompt_matches_transformers(pair: Pair, add_generation_prompt: bool, tools: Any) -> None:
    options = dict(add_generation_prompt=add_generation_prompt, tools=tools)
    if pair.reference.chat_template is None:  # Gemma 3 270M is a base model
        with pytest.raises(ValueError, match="no chat template"):
            pair.ours.apply_chat_template(CONVERSATION, **options)
        return
    prompt = pair.ours.apply_chat_template(CONVERSATION, **options)
    assert prompt == pair.reference.apply_chat_template(CONVERSATION, tokenize=False, **options)
    # A rendered prompt is encoded without adding special tokens, as transformers does.
    expected = pair.reference(prompt, add_special_tokens=False)["input_ids"]
    assert pair.ours.encode(prompt, add_special_tokens=False) == expected


@pytest.mark.real_model
def test_from_pretrained_dir_matches_saved_reference(pair: Pair, tmp_path: Path) -> None:
    pair.reference.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    for text in CORPUS:
        assert loaded.encode(text) == pair.reference(text)["input_ids"]
        assert loaded.decode(pair.ours.encode(text)) == pair.ours.decode(pair.ours.encode(text))
    assert (loaded.bos_token_id, loaded.eos_token_id) == (pair.ours.bos_token_id, pair.ours.eos_token_id)
    assert loaded.eos_token_ids == pair.ours.eos_token_ids
    assert loaded.chat_template == pair.ours.chat_template


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


# A tiny Gemma-style SentencePiece vocabulary: specials, whole-matched "\n", a run of spaces stored as real
# spaces, the 256 byte-fallback tokens, then pieces in merge order. The scores run against that order:
# Gemma's are meaningless, and both transformers and we must rank merges by position instead.
_SPM_HEAD = {"<pad>": 3, "<eos>": 3, "<bos>": 3, "<unk>": 3, "<start_of_turn>": 3, "<end_of_turn>": 3,
             "\n": 4, "  ": 4}
_SPM_PIECES = ["▁", "h", "e", "l", "o", "ll", "he", "hell", "hello", "▁hello", "▁h", "lo", "▁l"]


def write_tiny_gemma_gguf(path: Path, architecture: str = "gemma3", **extra: Any) -> Path:
    import gguf

    tokens = [*_SPM_HEAD, *(f"<0x{byte:02X}>" for byte in range(256)), *_SPM_PIECES]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(i) for i in range(len(tokens))])  # ascending: the opposite of merge order
    writer.add_token_types([*_SPM_HEAD.values(), *[6] * 256, *[1] * len(_SPM_PIECES)])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    for key, value in extra.items():  # e.g. add_add_bos_token=False
        getattr(writer, key)(value)
    writer.add_tensor("unused", np.zeros(4, dtype=np.float32))  # transformers wants a tensor to read the file
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_tiny_gemma_gguf(tmp_path / "spm.gguf")  # no add_bos_token key: SentencePiece adds BOS
    tok = Tokenizer.from_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = ["hello hello", " hello  hello\n\n", "héllo<end_of_turn>x", "  lo   ", "hellohello", "▁l", "\ttab 🦀", ""]
    for text in texts:
        assert tok.encode(text) == reference(text)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]
        for skip in (False, True):
            assert tok.decode(tok.encode(text), skip_special_tokens=skip) == reference.decode(
                tok.encode(text), skip_special_tokens=skip)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text.replace("▁", " ")  # ▁ reads as a space
    assert tok.encode("hello", add_special_tokens=False) == [272]  # ll, he, hell, hello: by position, not score
    assert [tok.id_to_token(i) for i in tok.encode(" hello  é", add_special_tokens=False)] == [
        "▁hello", "▁▁", "<0xC3>", "<0xA9>"]  # "  " is reached as ▁▁; é falls back to bytes
    assert (tok.bos_token, tok.eos_token, tok.eos_token_ids) == ("<bos>", "<eos>", {1, 5})


def test_tiny_sentencepiece_gguf_bos_flag_and_unsupported_architecture(tmp_path: Path) -> None:
    no_bos = Tokenizer.from_gguf(write_tiny_gemma_gguf(tmp_path / "a.gguf", add_add_bos_token=False))
    assert no_bos.encode("hello") == no_bos.encode("hello", add_special_tokens=False) == [272]
    # Llama 2-style SentencePiece (prefix space, score-ranked merges) is not built.
    with pytest.raises(ValueError, match=r"SentencePiece GGUF vocabularies are supported for .*not 'llama'"):
        Tokenizer.from_gguf(write_tiny_gemma_gguf(tmp_path / "b.gguf", architecture="llama"))
