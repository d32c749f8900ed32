"""IncrementalDetokenizer: streamed deltas are whole characters and add up to the full decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from seriatim.text.detokenizer import IncrementalDetokenizer
from seriatim.text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "你好，世界！这是一个测试。",
    "I ❤️ 🦀 and 👩‍👩‍👧‍👦 and 🇫🇷 👍🏽",
    "mixed: héllo wörld — “quotes” … 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff",
    "def f(x):\n\treturn '🦀' * x  # 蟹\n",
    "<|im_start|>assistant\n答案是 42 🎉<|im_end|>",
]


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]


def check_stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    """The deltas add up to the full decode and hold no U+FFFD the full decode lacks."""
    deltas = stream(tokenizer, ids, skip_special_tokens)
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas)
    return deltas


def byte_tokenizer() -> Tokenizer:
    """One token per byte, plus "Ġð" and "ĠðŁ" that end inside an emoji, like SmolLM2's."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, "Ġð", "ĠðŁ", "<|im_end|>"]
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
            "tokenizer.ggml.merges": ["Ġ ð", "Ġð Ł"],
            "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        }
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_byte_tokens_stream_whole_characters(text: str, skip_special_tokens: bool) -> None:
    tokenizer = byte_tokenizer()
    check_stream(tokenizer, tokenizer.encode(text), skip_special_tokens)


def test_a_character_waits_for_its_last_byte() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("a 🦀 蟹")
    assert [tokenizer.id_to_token(i) for i in ids][:4] == ["a", "ĠðŁ", "¦", "Ģ"]
    assert stream(tokenizer, ids) == ["a", "", "", " 🦀", " ", "", "", "蟹", ""]


def test_an_unfinished_character_is_flushed_as_in_decode() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("ok 🦀")[:-1]  # the emoji's last byte never comes
    assert stream(tokenizer, ids) == ["o", "k", "", "", " \ufffd"]
    assert tokenizer.decode(ids) == "ok \ufffd"


def test_each_push_decodes_a_short_window() -> None:
    tokenizer = byte_tokenizer()
    windows: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            windows.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    detokenizer = IncrementalDetokenizer(Counting())
    text = "".join(detokenizer.push(i) for i in tokenizer.encode("streaming 流式 🦀 " * 200))
    assert text + detokenizer.flush() == "streaming 流式 🦀 " * 200
    assert max(windows) <= 8  # the longest character is 4 bytes, so the window stays a few tokens


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_real_tokenizer_streams_whole_characters(smollm2: Tokenizer, text: str, skip_special_tokens: bool) -> None:
    ids = smollm2.encode(text)
    deltas = check_stream(smollm2, ids, skip_special_tokens)
    assert len(deltas) == len(ids) + 1


@pytest.mark.real_model
def test_real_tokenizer_random_ids(smollm2: Tokenizer) -> None:
    # Sampled tokens need not form valid UTF-8: the stream must still match a full decode.
    rng = random.Random(0)
    byte_tokens = [i for i in range(smollm2.vocab_size) if len(smollm2.id_to_token(i)) == 1]
    for _ in range(100):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.7 else rng.randrange(smollm2.vocab_size) for _ in range(30)]
        check_stream(smollm2, ids, skip_special_tokens=rng.random() < 0.5)
