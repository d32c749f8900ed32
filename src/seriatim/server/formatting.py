"""Token texts, bytes and log-probabilities in OpenAI's completions and chat shapes."""

from __future__ import annotations

from functools import cache

from ..sampling import TokenLogprobs
from ..text.detokenizer import IncrementalDetokenizer
from ..text.tokenizer import byte_spelling


@cache
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's byte alphabet, in which byte-level BPE vocabularies are written."""
    return {char: byte for byte, char in byte_spelling().items()}


class TokenTexts:
    """Per-token text and bytes for one tokenizer, cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def piece(self, token_id: int) -> str:
        """The token decoded alone (special tokens spelled out)."""
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]

    def raw_bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            piece = self.piece(token_id)
            data = piece.encode()
            try:
                spelled = self.tokenizer.id_to_token(token_id)
                table = _byte_of_char()
                if spelled and all(c in table for c in spelled):
                    candidate = bytes(table[c] for c in spelled)
                    if "\ufffd" in piece or candidate.decode("utf-8", "replace") == piece:
                        data = candidate
            except IndexError:  # a row of a padded vocabulary, unknown to the tokenizer: the text's bytes
                pass
            self._bytes[token_id] = data
        return self._bytes[token_id]

    def label(self, token_id: int) -> str:
        """OpenAI's token string: the text, or `bytes:\\xNN` for a token that is part of a character."""
        piece = self.piece(token_id)
        if "\ufffd" in piece:
            data = self.raw_bytes(token_id)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        return piece


class TextOffsets:
    """Where each token's text starts, for tokens decoded one after another into a text from `start` on.

    Offsets follow the incremental decoding the text itself came from, so they stay inside it: a token
    that is only part of a multi-byte character points at where that character begins."""

    def __init__(self, tokenizer, start: int, *, skip_special_tokens: bool):
        self._text = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.position = start

    def __call__(self, token_ids: list[int]) -> list[int]:
        out = []
        for tid in token_ids:
            out.append(self.position)
            self.position += len(self._text.push(tid))
        return out


def completion_logprobs(texts: TokenTexts, entries: list[TokenLogprobs | None], token_ids: list[int],
                        offsets: TextOffsets) -> dict:
    """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs (the top N and, as OpenAI
    always includes it, the chosen token) and text_offset.

    `entries[i]` is None where no log-probability exists (an echoed prompt's first token).
    """
    top_logprobs = []
    for tid, lp in zip(token_ids, entries):
        if lp is None:
            top_logprobs.append(None)
            continue
        top = {texts.label(t): _finite(p) for t, p in lp.top}
        top.setdefault(texts.label(tid), _finite(lp.logprob))
        top_logprobs.append(top)
    return {"tokens": [texts.label(t) for t in token_ids],
            "token_logprobs": [None if lp is None else _finite(lp.logprob) for lp in entries],
            "top_logprobs": top_logprobs, "text_offset": offsets(token_ids)}


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprobs]) -> list[dict]:
    """OpenAI chat `logprobs.content`: token, logprob, bytes, top_logprobs for each token."""
    return [
        {
            "token": texts.label(lp.token_id),
            "logprob": _finite(lp.logprob),
            "bytes": list(texts.raw_bytes(lp.token_id)),
            "top_logprobs": [
                {"token": texts.label(t), "logprob": _finite(p), "bytes": list(texts.raw_bytes(t))} for t, p in lp.top
            ],
        }
        for lp in entries
    ]


def _finite(x: float) -> float:
    """JSON has no -inf; OpenAI reports impossible tokens at -9999."""
    return x if x > -9999.0 else -9999.0
