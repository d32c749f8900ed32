"""Streaming token ids to text without ever splitting a character."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids, pushed one at a time, into text deltas.

    A character whose bytes span several tokens is held back until complete, so a delta never ends
    in a U+FFFD standing for a partial character. All deltas plus `flush()` equal
    `tokenizer.decode(ids)`. Each push decodes only the few tokens since the last emitted text
    (vLLM's prefix/read offsets), so the cost per token does not grow with the output.
    """

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        # Text is emitted for _ids[:_read]. Decoding restarts at _prefix (the tokens of the last
        # delta) rather than at _read, because a decoder may spell a token by its neighbours (e.g.
        # SentencePiece drops the space of the first token only).
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (possibly "")."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of generation (a partial character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(prefix_text) or (not final and text.endswith("\ufffd")):
            return ""  # no text yet, or a character is still missing bytes
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def _decode(self, start: int, stop: int) -> str:
        if start == stop:
            return ""
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special_tokens)
