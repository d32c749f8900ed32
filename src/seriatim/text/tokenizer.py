"""Text <-> token ids: a Hugging Face `tokenizers` pipeline, built from GGUF metadata or an HF directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ..errors import ModelFileError, in_file
from ..weights.fields import read_json, value
from ..weights.gguf_file import read_gguf_metadata
from .chat_template import render_chat, template_variables

# llama.cpp's `tokenizer.ggml.token_type` values that matter here.
_CONTROL, _USER_DEFINED = 3, 4

# Chat models end a turn with one of these. Files often name a different EOS (a base-model one), and
# generation must stop on either; llama.cpp keeps a similar "end of generation" list.
_END_OF_TURN = frozenset(
    {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|end_of_text|>"}
)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The regexes that cut text into words before BPE, per `tokenizer.ggml.pre`. Like llama.cpp
# (llama-vocab.cpp), each applies to the pieces the previous one left.
_BPE_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2_SPLIT,),
    # Digits go one by one *before* the GPT-2 regex, as in SmolLM's own tokenizer.json and llama.cpp.
    # transformers' GGUF loader skips this step, which changes some whitespace before numbers:
    # "x   12" is [x][ĠĠĠ][1][2] here and in llama.cpp, [x][ĠĠ][Ġ][1][2] in transformers.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "qwen2": (_QWEN2_SPLIT,),
}


@cache
def byte_spelling() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: the alphabet byte-level vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in spelling]
    spelling.update({byte: chr(256 + i) for i, byte in enumerate(others)})
    return spelling


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str]) -> HFTokenizer:
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE (GPT-2, SmolLM, Qwen2, Llama 3)."""
    # Files older than the key: GPT-2's, as transformers reads them.
    pre = value(meta, "tokenizer.ggml.pre", str, "gpt2")
    if pre not in _BPE_SPLITS:
        raise ModelFileError(f"Unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_BPE_SPLITS)}.")
    types = _token_types(meta)
    spelling = byte_spelling()
    alphabet = frozenset(spelling.values())
    # Some files store added tokens as raw text; the BPE model must see them in the byte alphabet.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode()): index
        for index, token in enumerate(tokens)
    }
    merges = [_merge(merge, vocab) for merge in value(meta, "tokenizer.ggml.merges", list[str], [])]
    hf = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in _BPE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    # A control or user-defined token outside the byte alphabet is a converter's mislabel: transformers
    # skips those too.
    _add_typed_tokens(hf, [(token, kind) for token, kind in zip(tokens, types) if set(token) <= alphabet])
    return hf


def _merge(merge: str, vocab: Mapping[str, int]) -> tuple[str, str]:
    """A merge rule "left right", whose parts and their join must all be tokens (`tokenizers` panics, a
    BaseException, on a join that is not)."""
    left, space, right = merge.partition(" ")
    if not (space and left in vocab and right in vocab and left + right in vocab):
        raise ModelFileError(f"the merge {merge!r:.60} does not join two tokens into a third")
    return left, right


def _token_types(meta: Mapping[str, Any]) -> list[int]:
    return value(meta, "tokenizer.ggml.token_type", list[int], [])


# SentencePiece's stand-in for a space.
_SPACE = "\u2581"
# Architectures whose "llama" (SentencePiece) vocabularies are read the way transformers reads Gemma's.
_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})


def _sentencepiece_bpe(meta: Mapping[str, Any], stored: list[str]) -> HFTokenizer:
    """`tokenizer.ggml.model == "llama"` in a Gemma file: SentencePiece BPE with byte fallback (`<0x0A>`),
    spaces written as ▁ and no prefix space, built as transformers' GGUF loader builds it."""
    architecture = meta.get("general.architecture")
    if architecture not in _GEMMA_ARCHITECTURES:
        raise ModelFileError(
            f"SentencePiece GGUF vocabularies are supported for {sorted(_GEMMA_ARCHITECTURES)} files, "
            f"not {architecture!r}."
        )
    # Runs of spaces are stored as real spaces, but BPE only ever sees ▁ (the normalizer below).
    tokens = [_SPACE * len(token) if token and not token.strip(" ") else token for token in stored]
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = _gguf_token_id(meta, "unknown", stored)
    hf = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=_merges_by_position(tokens, vocab),
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    hf.normalizer = normalizers.Replace(" ", _SPACE)
    hf.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # The respelled space runs are reached through BPE, so (as in transformers) they are not matched whole.
    types = _token_types(meta)
    typed = [(token, kind) for token, kind, spelled in zip(stored, types, tokens) if token == spelled]
    _add_typed_tokens(hf, typed)
    return hf


def _merges_by_position(tokens: list[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """The file has no merges: every split of a token into two vocabulary entries is one, ranked by the
    token's position and then longer left part first, as transformers' `generate_merges` ranks them for
    Gemma. Ranking by score would differ: the scores put user-defined pieces (the space runs) last."""
    return [
        (token[:cut], token[cut:])
        for token in tokens
        for cut in range(len(token) - 1, 0, -1)
        if token[:cut] in vocab and token[cut:] in vocab
    ]


def _add_typed_tokens(hf: HFTokenizer, typed: list[tuple[str, int]]) -> None:
    """Control (<|im_end|>) and user-defined (<think>) tokens are matched whole in the text, as llama.cpp
    does; only control ones are special (dropped by skip_special_tokens)."""
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in typed if kind == _CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in typed if kind == _USER_DEFINED])


@dataclass(frozen=True)
class _GGUFVocabulary:
    build: Callable[[Mapping[str, Any], list[str]], HFTokenizer]  # (metadata, tokens)
    add_bos_default: bool  # for files without `tokenizer.ggml.add_bos_token` (llama.cpp and transformers agree)


# Per `tokenizer.ggml.model`.
_GGUF_VOCABULARIES: dict[str, _GGUFVocabulary] = {
    "gpt2": _GGUFVocabulary(_byte_level_bpe, add_bos_default=False),
    "llama": _GGUFVocabulary(_sentencepiece_bpe, add_bos_default=True),
}


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Encodes text to token ids and back, and knows the model's special tokens and chat template."""

    hf: HFTokenizer
    bos_token_id: int | None
    eos_token_id: int | None  # the one the model declares, as the template's `eos_token`
    eos_token_ids: frozenset[int]  # every id that ends a generation
    chat_template: str | None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        with in_file(path):
            return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata as plain values (see `read_gguf_metadata`)."""
        model = value(meta, "tokenizer.ggml.model", str, None)
        if model not in _GGUF_VOCABULARIES:
            raise ModelFileError(
                f"Unsupported GGUF tokenizer model {model!r}; supported: {sorted(_GGUF_VOCABULARIES)}.")
        vocabulary = _GGUF_VOCABULARIES[model]
        tokens = value(meta, "tokenizer.ggml.tokens", list[str], [])
        if not tokens:
            raise ModelFileError("The GGUF file has no tokenizer.ggml.tokens.")
        hf = vocabulary.build(meta, tokens)
        bos_token_id = _gguf_token_id(meta, "bos", tokens)
        if value(meta, "tokenizer.ggml.add_bos_token", bool, vocabulary.add_bos_default):
            if bos_token_id is None:
                raise ModelFileError("The GGUF file asks for a BOS token but names none.")
            bos = hf.id_to_token(bos_token_id)
            if bos is None:  # its token is listed again later, which took the id
                raise ModelFileError(f"The BOS token id {bos_token_id} is not in the vocabulary.")
            # The template names BOS by a fixed identifier: the token's own text may hold the template's ':' or '$'.
            hf.post_processor = processors.TemplateProcessing(
                single=["BOS:0", "$A:0"], special_tokens=[{"id": "BOS", "ids": [bos_token_id], "tokens": [bos]}]
            )
        eos_token_id = _gguf_token_id(meta, "eos", tokens)
        eos_ids = [eos_token_id, _gguf_token_id(meta, "eot", tokens), _gguf_token_id(meta, "eom", tokens)]
        template = value(meta, "tokenizer.chat_template", str, None)
        return cls(hf, bos_token_id, eos_token_id, _stop_ids(hf, eos_ids), template)

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a Hugging Face model directory: tokenizer.json, tokenizer_config.json and, when
        present, chat_template.jinja and generation_config.json (whose EOS ids also stop generation).

        As in transformers 5, tokenizer.json's post-processor alone decides whether BOS is added;
        tokenizer_config.json's `add_bos_token` is ignored."""
        path = Path(path)
        hf = _read_tokenizer_json(path / "tokenizer.json")
        config = _read_json(path / "tokenizer_config.json")
        template = _dir_chat_template(path, config)
        eos_token_id = _token_id(hf, config.get("eos_token"))
        generation = _read_json(path / "generation_config.json")
        with in_file(path / "generation_config.json"):
            kind = list[int] if isinstance(generation.get("eos_token_id"), list) else int
            generation_eos = value(generation, "eos_token_id", kind, None)
        eos_ids = [eos_token_id, *(generation_eos if isinstance(generation_eos, list) else [generation_eos])]
        return cls(hf, _token_id(hf, config.get("bos_token")), eos_token_id, _stop_ids(hf, eos_ids), template)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.hf.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.hf.id_to_token(self.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when the model wants it and `add_special_tokens`.
        Special tokens written in the text (`<|im_start|>`) become their ids either way."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry (byte-level BPE: in GPT-2's byte alphabet, "Ġthe"; SentencePiece: "▁the")."""
        token = self.hf.id_to_token(token_id)
        if token is None:
            raise IndexError(f"Token id {token_id} is outside the vocabulary of {self.vocab_size}.")
        return token

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template reads a `tools` variable, so it can offer functions to the model."""
        return bool(self.chat_template) and "tools" in template_variables(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for `messages`, rendered with this model's template and special tokens."""
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )


def chat_template_of(path: Path) -> str | None:
    """The chat template of a .gguf file or an HF directory, from its metadata alone (no weights read)."""
    if path.is_dir():
        return _dir_chat_template(path, _read_json(path / "tokenizer_config.json"))
    with in_file(path):
        return value(read_gguf_metadata(path), "tokenizer.chat_template", str, None)


def _dir_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """An HF directory's template: chat_template.jinja (where newer transformers save it), else the one in
    tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # the older named-templates form
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _stop_ids(hf: HFTokenizer, declared: Iterable[int | None]) -> frozenset[int]:
    """The declared EOS ids plus every special token whose text ends a chat turn."""
    end_of_turn = {i for i, t in hf.get_added_tokens_decoder().items() if t.special and t.content in _END_OF_TURN}
    return frozenset({*declared, *end_of_turn} - {None})


def _token_id(hf: HFTokenizer, token: str | Mapping[str, Any] | None) -> int | None:
    # tokenizer_config.json writes special tokens as strings or as serialized AddedTokens.
    content = token.get("content") if isinstance(token, Mapping) else token
    return hf.token_to_id(content) if isinstance(content, str) else None


def _gguf_token_id(meta: Mapping[str, Any], role: str, tokens: list[str]) -> int | None:
    """The id of the file's `role` token ("bos", "eos", ...), if it names one: an index into its tokens."""
    key = f"tokenizer.ggml.{role}_token_id"
    token_id = value(meta, key, int, None)
    if token_id is not None and not 0 <= token_id < len(tokens):
        raise ModelFileError(f"{key} is {token_id}, outside the {len(tokens)} tokens.")
    return token_id


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for whatever it cannot read
        raise ModelFileError(f"is not a tokenizer that the tokenizers library reads: {e}", path) from None


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}
