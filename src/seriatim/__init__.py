"""seriatim: autoregressive text generation, one token at a time."""

from .llm import LLM
from .outputs import CompletionOutput, Delta
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "CompletionOutput", "Delta"]
