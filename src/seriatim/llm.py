"""The user-facing Python API: `LLM(...).generate / stream / chat`."""

from __future__ import annotations

import logging
import numbers
import sys
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from jinja2 import TemplateError

from .engine.config import EngineConfig
from .engine.draft import check_pair
from .engine.engine import Engine, ValidPrompt
from .engine.sequence import Sequence
from .engine.speculation import Speculation
from .errors import ParameterError
from .hardware import keep_freed_memory, physical_cores, usable_cpus
from .kernels import isa
from .model.scoring import prompt_logprobs
from .model.transformer import Transformer
from .outputs import CompletionOutput, Delta
from .sampling import SamplingParams, TokenLogprobs
from .text.chat_template import text_messages
from .text.tokenizer import Tokenizer
from .weights import converted
from .weights.loader import build_model, choose_precision, load
from .weights.registry import DEFAULT_MODEL, resolve_model

Prompt = str | Seq[int]
log = logging.getLogger(__name__)


def _progress_printer(label: str):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="tensor", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


class LLM:
    """Load a model once, then generate from it.

    `model` is a registry name (see `seriatim models`), a `.gguf` file, or a
    Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    `dtype="auto"` is the fast mode (compact quantized weights, bfloat16
    activations where the CPU supports them); `dtype="float32"` dequantizes
    every weight: the exact reference path. See loader.py.
    `device="auto"` picks CUDA when a GPU is present.
    `kv_cache_memory` (bytes; default a quarter of free RAM, at most 4 GiB)
    bounds the KV cache of all requests together; `max_step_tokens` bounds
    one forward pass (long prompts are prefilled in chunks of that size;
    default 512 on a CPU, 4096 on a GPU);
    `prefix_caching` reuses the cache of identical prompt prefixes;
    `batch_invariant` (the default) makes a request's tokens and logprobs in
    the fast mode bit for bit those it gets alone, whatever its batch, chunking
    or cached prefix (CPU tiers with seriatim's kernels; docs/batch-invariance.md);
    False takes the fastest product for each pass instead;
    `deterministic` runs every request in a forward pass of its own, which
    makes it batch-invariant where `batch_invariant` cannot (below the avx512
    tier, CUDA), at the cost of one forward pass per request;
    `speculative="ngram"` (or {"method": "ngram", "k": 5, "max_n": 4, "min_n": 2,
    "adaptive": True})
    drafts tokens by prompt lookup and verifies them several per pass: greedy
    output is unchanged, sampled output keeps its distribution;
    "lookahead" adds the model's own guesses from earlier passes, and
    {"method": "draft", "model": "qwen2.5-coder-0.5b", "k": 5} has a smaller
    model with the same tokenizer decode the drafts.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        progress: bool = False,
        kv_cache_memory: int | None = None,
        max_step_tokens: int | None = None,
        max_running: int = 64,
        prefix_caching: bool = True,
        deterministic: bool = False,
        batch_invariant: bool = True,
        speculative: str | dict | None = None,
    ):
        threads = physical_cores() if threads is None else threads
        if not 1 <= threads <= usable_cpus():  # far more threads than CPUs only thrash (and 1e5 crash torch)
            raise ValueError(f"threads must be in [1, {usable_cpus()}] (the CPUs this process may use), got {threads}")
        torch.set_num_threads(threads)
        self.device = _device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.precision = choose_precision(dtype, self.device)
        if self.device.type == "cpu":
            log.info("%s; %s", isa.describe(), self.precision.name)
        path = resolve_model(model)
        self.model, self.tokenizer = self._load(path, progress)
        self.config = self.model.cfg
        dtype = self.precision.activations
        speculation = Speculation.of(speculative)
        engine_config = EngineConfig.resolve(
            self.config, self.device, dtype, kv_cache_memory=kv_cache_memory, max_step_tokens=max_step_tokens,
            max_running=max_running, prefix_caching=prefix_caching, deterministic=deterministic,
            batch_invariant=batch_invariant, speculation=speculation,
        )
        draft = self._draft_model(speculation.model, progress) if speculation and speculation.model else None
        self.engine = Engine(self.model, self.tokenizer, self.device, dtype, engine_config, draft)
        # Deltas made for requests started by generate() or stream(), not yet read by their caller.
        self._outbox: dict[int, deque[tuple[Delta, Sequence]]] = {}

    def _load(self, path: Path, progress: bool) -> tuple[Transformer, Tokenizer]:
        """The model and tokenizer: from the converted-weights cache in the compact fast mode when this
        file was converted before, else converted now (and cached)."""
        cacheable = self.precision.compact and converted.wanted(path)
        if cacheable and (hit := converted.load(path, self.precision.name, self.precision.activations)):
            return hit[0].to(self.device), hit[1]
        report = _progress_printer(f"loading {path.name}") if progress else None
        ckpt, tokenizer = load(path, self.precision, report)
        model = build_model(ckpt, self.precision, self.device)
        if cacheable:
            converted.save(path, self.precision.name, model, tokenizer)
        return model, tokenizer

    def _draft_model(self, name: str, progress: bool) -> Transformer:
        """The draft model for speculation, loaded as the model is; ValueError if it cannot draft for it."""
        model, tokenizer = self._load(resolve_model(name), progress)
        check_pair(self.model, self.tokenizer, model, tokenizer, name)
        return model

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[CompletionOutput]:
        """Generate for one prompt or many (strings or token-id lists); one result per prompt, in order.
        `params` applies to every prompt, or is a list with one SamplingParams per prompt."""
        prompts = _prompt_list(prompts)
        ids = self._submit(prompts, _params_list(params, len(prompts)))
        finished = {}
        try:
            for rid in ids:  # all run together: the engine batches them whichever is being read
                for delta, seq in self._take(rid):
                    if delta.finish_reason is not None:
                        finished[rid] = seq.result()
        finally:
            self._forget(ids)
        return [finished[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield text deltas as tokens are generated; they concatenate to the final text."""
        ids = self._submit([prompt], [params or SamplingParams()])
        try:
            yield from (delta for delta, _ in self._take(ids[0]))
        finally:
            self._forget(ids)

    def _submit(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[int]:
        """Queue every prompt or none: one that fails validation withdraws those queued before it."""
        ids: list[int] = []
        try:
            for p, sp in zip(prompts, params, strict=True):
                ids.append(self.add_request(p, sp))
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        self._outbox.update((rid, deque()) for rid in ids)
        return ids

    def _take(self, rid: int) -> Iterator[tuple[Delta, Sequence]]:
        """Request `rid`'s deltas in order, stepping the engine while none is waiting. Every delta a step
        makes goes to its own request's queue, so streams and `generate` calls read interleaved never
        take each other's tokens."""
        queue = self._outbox[rid]
        while True:
            while queue:
                delta, seq = queue.popleft()
                yield delta, seq
                if delta.finish_reason is not None:
                    return
            if rid not in self.engine.requests:  # aborted from outside: no more deltas will come
                return
            for delta, seq in self.engine.step():
                if (waiting := self._outbox.get(delta.request_id)) is not None:
                    waiting.append((delta, seq))

    def _forget(self, ids: list[int]) -> None:
        """Stop routing deltas to these requests and cancel those still running (a stream left early)."""
        for rid in ids:
            self._outbox.pop(rid, None)
            self.engine.abort(rid)

    def chat(self, messages: list[dict], params: SamplingParams | None = None,
             tools: list[dict] | None = None) -> CompletionOutput:
        """Apply the model's chat template (with the generation prompt) and generate a reply. With `tools`
        (OpenAI's function definitions) the template offers them to the model; `text.tool_calls.ToolCallParser`
        finds the calls in the reply."""
        return self.generate(self.chat_prompt(messages, tools), params)[0]

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The token ids of `messages` (and `tools`, if any) rendered by the model's chat template, with the
        generation prompt. Content may be a string or OpenAI's text parts; ParameterError (param "messages",
        or "tools" for a template that cannot offer tools) for anything the template cannot take."""
        checked = text_messages(messages)
        self.check_tools(tools)
        try:
            text = self.tokenizer.apply_chat_template(checked, tools=tools or None)
        except (ValueError, TemplateError) as e:
            raise ParameterError("messages", f"the chat template could not render these messages: {e}") from None
        # The template writes any BOS itself, so the tokenizer must not add another.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_tools(self, tools: list | None) -> None:
        """ParameterError (param "tools") if tools are given to a model whose chat template never reads them."""
        if tools and not self.tokenizer.takes_tools:
            raise ParameterError("tools", "this model's chat template cannot offer tools (it never reads `tools`)")

    def prompt_logprobs(self, prompt: Prompt, top_n: int = 0) -> list[TokenLogprobs | None]:
        """Each prompt token's raw log-probability given the tokens before it, with the `top_n` most likely
        alternatives; None for the first token. Computed outside the engine's KV cache: from a thread other
        than the one stepping the engine, call it between steps (AsyncEngine.run_in_engine_thread)."""
        ids = prompt if isinstance(prompt, ValidPrompt) else self.engine.validate_prompt(self.encode_prompt(prompt))
        return prompt_logprobs(self.model, ids, top_n, self.engine.kv_dtype, self.device)

    def add_request(self, prompt: Prompt, params: SamplingParams) -> int:
        return self.engine.add_request(self.encode_prompt(prompt), params)


def _device(name: str) -> torch.device:
    """The device `name` ("auto": CUDA when present), checked before anything is loaded onto it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (this PyTorch build or this machine has none)")
    return device


def _prompt_list(prompts: object) -> list[Prompt]:
    """`generate`'s prompts as a list: one prompt (a string or token ids) or a list of them.
    ParameterError (param "prompt") for anything else."""
    if _is_prompt(prompts) and not (isinstance(prompts, Seq) and not prompts):
        return [prompts]
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Seq):
        raise ParameterError("prompt", "prompts must be a string, a list of token ids, or a list of those, "
                             f"got {type(prompts).__name__}")
    if not prompts:
        raise ParameterError("prompt", "generate() got no prompts")
    bad = next(((i, p) for i, p in enumerate(prompts) if not _is_prompt(p)), None)
    if bad is not None:
        raise ParameterError("prompt", f"prompt {bad[0]} is a {type(bad[1]).__name__}: each prompt is a string or "
                             "a list of token ids")
    return list(prompts)


def _params_list(params: object, count: int) -> list[SamplingParams]:
    """`generate`'s params as one SamplingParams per prompt: None (the defaults), one for all, or a list of
    `count`. ParameterError (param "params") for anything else."""
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    if isinstance(params, (str, bytes)) or not isinstance(params, Seq):
        raise ParameterError("params", "params must be a SamplingParams or a list of them, "
                             f"got {type(params).__name__}")
    if len(params) != count:
        raise ParameterError("params", f"got {len(params)} SamplingParams for {count} prompts; "
                             "give one, or one per prompt")
    bad = next((i for i, p in enumerate(params) if not isinstance(p, SamplingParams)), None)
    if bad is not None:
        raise ParameterError("params", f"params[{bad}] is a {type(params[bad]).__name__}, not a SamplingParams")
    return list(params)


def _is_prompt(prompt: object) -> bool:
    """A string, or a sequence of ints (token ids; whether they are valid ones is the engine's to say)."""
    if isinstance(prompt, str):
        return True
    ints = isinstance(prompt, Seq) and not isinstance(prompt, bytes)
    return ints and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt)
