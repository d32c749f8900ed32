"""Constraints compiled once per model and cached: each request gets its own copy of the compiled matcher."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..errors import ParameterError
from ..text.tokenizer import Tokenizer
from .constraint import Constraint
from .state import GrammarState

CACHE_SIZE = 256  # compiled grammars kept, least recently used first out


class GrammarCompiler:
    """Builds llguidance's view of the vocabulary on first use (0.2 s for 49k tokens, 0.8 s for 151k) and
    compiles constraints against it. Thread-safe: the server compiles off the engine thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        """`vocab_size`: the model's logits width, which may exceed the tokenizer's (padding rows)."""
        self._tokenizer = tokenizer
        self._vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self.compiled = 0  # constraints compiled (cache misses), for tests and metrics

    def state(self, constraint: Constraint) -> GrammarState:
        """A fresh matcher for `constraint`, at its start; ParameterError (param: the constraint's kind)
        naming the problem when it does not compile."""
        return GrammarState(self.compile(constraint).deep_copy(), self._vocab_size)

    def compile(self, constraint: Constraint):
        """The compiled matcher of `constraint`, from the cache or compiled now (and cached): not to be
        advanced, only copied."""
        with self._lock:
            pristine = self._cache.get(constraint)
            if pristine is not None:
                self._cache.move_to_end(constraint)
                return pristine
        pristine = self._compile(constraint)  # outside the lock: one slow compile does not hold up the others
        with self._lock:
            self.compiled += 1
            self._cache[constraint] = pristine
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return pristine

    def _compile(self, constraint: Constraint):
        from llguidance import LLMatcher, LLParserLimits

        try:
            grammar = constraint.grammar()
        except ValueError as e:
            raise ParameterError(constraint.kind, f"{constraint.kind} is invalid: {e}") from None
        # The default limits bound a compile to tens of milliseconds; a grammar that needs more is refused.
        matcher = LLMatcher(self._vocabulary(), grammar, log_level=0, limits=LLParserLimits())
        if matcher.is_error():
            problem = _first_line(matcher.get_error())
            raise ParameterError(constraint.kind, f"{constraint.kind} cannot be used: {problem}")
        return matcher

    def _vocabulary(self):
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLTokenizer

                self._ll_tokenizer = LLTokenizer(self._tokenizer.hf.to_str(), n_vocab=self._vocab_size,
                                                 eos_token=sorted(self._tokenizer.eos_token_ids))
            return self._ll_tokenizer


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "unknown error"
