"""The user-facing Python API: `LLM(...).generate / stream / chat`."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator, Sequence as Seq
from pathlib import Path

import torch

from .weights import converted
from .engine.engine import Engine
from .hardware import available_memory, keep_freed_memory, physical_cores, usable_cpus
from .weights.loader import build_model, choose_precision, load
from .model.transformer import Transformer
from .outputs import CompletionOutput, Delta
from .weights.registry import DEFAULT_MODEL, resolve_model
from .model.paged_kv import PagedKVCache
from .sampling import SamplingParams
from .engine.scheduler import SchedulerConfig
from .engine.sequence import Sequence
from .text.tokenizer import Tokenizer

Prompt = str | Seq[int]


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
    `deterministic` makes every request's tokens independent of the batch it
    runs in, in the fast mode too, at the cost of one forward pass per request.
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
    ):
        threads = physical_cores() if threads is None else threads
        if not 1 <= threads <= usable_cpus():  # far more threads than CPUs only thrash (and 1e5 crash torch)
            raise ValueError(f"threads must be in [1, {usable_cpus()}] (the CPUs this process may use), got {threads}")
        torch.set_num_threads(threads)
        self.device = _device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.precision = choose_precision(dtype, self.device)
        path = resolve_model(model)
        self.model, self.tokenizer = self._load(path, progress)
        self.config = self.model.cfg
        dtype = self.precision.activations
        if kv_cache_memory is None:  # a quarter of the free RAM (GPU memory on CUDA), at most 4 GiB
            kv_cache_memory = min(available_memory(self.device.type) // 4, 4 << 30)
        if max_step_tokens is None:
            # A CPU's prefill is bound by arithmetic: beyond ~512 tokens a step only makes every stream wait
            # longer. A GPU's is bound by launches: 64 prompts of 64 tokens in one step instead of eight.
            max_step_tokens = 4096 if self.device.type == "cuda" else 512
        scheduling = SchedulerConfig(
            max_step_tokens, max_running, self._kv_capacity(kv_cache_memory, dtype, max_running),
            prefix_caching=prefix_caching, deterministic=deterministic,
        )
        self.engine = Engine(self.model, self.tokenizer, self.device, dtype, scheduling)
        # Deltas made for requests started by generate() or stream(), not yet read by their caller.
        self._outbox: dict[int, deque[tuple[Delta, Sequence]]] = {}

    def _kv_capacity(self, memory: int, dtype: torch.dtype, max_running: int) -> int:
        """Cache positions `memory` bytes hold, after the sliding-window layers' rings."""
        rings = PagedKVCache.ring_bytes(self.config, dtype, max_running)
        per_token = PagedKVCache.bytes_per_token(self.config, dtype)
        block = SchedulerConfig.block_size * per_token
        if memory < rings + block:
            rings_part = f" plus {rings} for the sliding-window layers of {max_running} running sequences" if rings else ""
            raise ValueError(f"kv_cache_memory of {memory} bytes is too small: this model needs at least "
                             f"{rings + block} (one block of {SchedulerConfig.block_size} positions, {block} bytes"
                             f"{rings_part})")
        return (memory - rings) // per_token

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

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | None = None
    ) -> list[CompletionOutput]:
        """Generate for one prompt or many (strings or token-id lists); one result per prompt, in order."""
        params = params or SamplingParams()
        ids = self._submit([prompts] if _is_single_prompt(prompts) else list(prompts), params)
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
        ids = self._submit([prompt], params or SamplingParams())
        try:
            yield from (delta for delta, _ in self._take(ids[0]))
        finally:
            self._forget(ids)

    def _submit(self, prompts: list[Prompt], params: SamplingParams) -> list[int]:
        """Queue every prompt or none: one that fails validation withdraws those queued before it."""
        ids: list[int] = []
        try:
            for p in prompts:
                ids.append(self.add_request(p, params))
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

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> CompletionOutput:
        """Apply the model's chat template (with the generation prompt) and generate a reply."""
        return self.generate(self.chat_prompt(messages), params)[0]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The token ids of `messages` rendered by the model's chat template, with the generation prompt."""
        # The template writes any BOS itself, so the tokenizer must not add another.
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)

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


def _is_single_prompt(prompts: object) -> bool:
    return isinstance(prompts, str) or (
        isinstance(prompts, Seq) and len(prompts) > 0 and all(isinstance(t, int) for t in prompts)
    )
