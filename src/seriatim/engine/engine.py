"""The generation loop: admit requests, run one forward pass per step, sample, emit deltas.

Every step feeds the scheduled sequences their tokens that are not yet cached
(prompt chunks: prefill; one token: decode) in one flat batch, and samples a
new token for each sequence whose tokens are now all cached.
"""

from __future__ import annotations

import itertools
import numbers
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from ..errors import ParameterError, PromptTooLong
from ..grammar.compiler import GrammarCompiler
from ..grammar.state import GrammarError
from ..model.paged_kv import PagedKVCache
from ..model.transformer import Transformer
from ..outputs import Delta, Pass
from ..sampling import SamplingParams, SamplingState, TokenLogprobs, process_rows, sample, token_logprobs
from ..text.detokenizer import IncrementalDetokenizer
from ..text.tokenizer import Tokenizer
from .config import EngineConfig
from .draft import DraftModel
from .runner import ModelRunner, StepBatch
from .scheduler import Chunk, Scheduler
from .sequence import Sequence
from .speculation import PRIOR_COST, PassCost, Speculation, verify_greedy, verify_sampled


@dataclass
class EngineStats:
    """Counters of the engine's work: the server's /metrics reports the steps and requests (it counts tokens
    itself); the token counts serve the Python API, benchmarks and tests."""

    steps: int = 0
    step_tokens: int = 0  # tokens fed in the last step
    prompt_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    generated_tokens: int = 0
    forced_tokens: int = 0  # of those, tokens a grammar forced, appended without sampling (jump-forward)
    drafted: int = 0  # speculative drafts verified
    accepted: int = 0  # of those, the ones kept
    verifications: int = 0  # passes that verified drafts
    draft_seconds: float = 0.0  # spent in a draft model's passes
    accepted_at: list[int] = field(default_factory=list)  # [i]: verifications that kept draft i (from 0)
    finished: int = 0  # requests that ended with "stop" or "length"
    aborted: int = 0


@dataclass
class EngineMetrics:
    """A snapshot of the engine's state."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_hit_rate: float
    preemptions: int
    stats: EngineStats


Taken = tuple[list[int], list[TokenLogprobs | None]]  # the tokens a sequence takes in a step, and their logprobs


class ValidPrompt(tuple):
    """Token ids that passed `validate_prompt` for this model: the engine queues them without checking again."""


def validate_prompt(prompt_ids: Seq[int], vocab: int, context: int) -> ValidPrompt:
    """The prompt's ids, checked: non-empty, ints in the vocabulary, and leaving room for output.
    ParameterError (param "prompt") or PromptTooLong otherwise."""
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Seq):
        raise ParameterError("prompt", f"a prompt is a string or a list of token ids, got {type(prompt_ids).__name__}")
    if not prompt_ids:
        raise ParameterError("prompt", "prompt is empty")
    bad_type = next((t for t in prompt_ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)), None)
    if bad_type is not None:
        raise ParameterError("prompt", f"prompt token ids must be ints, got {bad_type!r}")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ParameterError("prompt", f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    if len(prompt_ids) >= context:
        raise PromptTooLong(f"prompt has {len(prompt_ids)} tokens but the model's context is {context} tokens "
                            "(at least one must remain for output)")
    return ValidPrompt(int(t) for t in prompt_ids)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        device: torch.device,
        kv_dtype: torch.dtype,
        config: EngineConfig,
        draft: Transformer | None = None,
    ):
        """`config` as `EngineConfig.resolve` makes it for this model (sliding-window layers need its rings'
        settings); `draft`: the draft model, for speculation by one (draft.py: `check_pair`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.kv_dtype = kv_dtype
        self.context_length = model.cfg.context_length
        self.cache = PagedKVCache(model.cfg, config.num_blocks, config.block_size, kv_dtype, device, config.max_running)
        if self.cache.has_rings and (config.prefix_caching or config.max_rollback is None):
            raise ValueError("a model with sliding-window layers needs EngineConfig.resolve's settings "
                             "(no prefix caching, a bounded rollback)")
        self.scheduler = Scheduler(config)
        self.runner = ModelRunner(model, self.cache, config.deterministic, config.batch_invariant)
        self.speculation = config.speculation
        if (draft is not None) != (self.speculation is not None and self.speculation.method == "draft"):
            raise ValueError("a draft model goes with speculative method 'draft', and that method needs one")
        self.drafter = None if draft is None else DraftModel(
            draft, model, kv_dtype, device, config.num_blocks, config.block_size, config.max_step_tokens,
            config.batch_invariant, self.speculation.draft_vocab)
        self.pass_cost = PassCost()  # measured cost of wider passes: how many drafts pay
        self.grammars = GrammarCompiler(tokenizer, model.cfg.vocab_size)
        self.stats = EngineStats()
        self.requests: dict[int, Sequence] = {}  # waiting or running
        self._ids = itertools.count()

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams) -> int:
        """Queue a tokenized prompt (checked here unless it is a `ValidPrompt`); returns the request id."""
        prompt = list(prompt_ids if isinstance(prompt_ids, ValidPrompt) else self.validate_prompt(prompt_ids))
        grammar = None if params.constraint is None else self.grammars.state(params.constraint)
        rid = next(self._ids)
        seq = Sequence(
            request_id=rid,
            prompt_ids=prompt,
            params=params,
            sampling=SamplingState(params, prompt, self.model.cfg.vocab_size, self.device, grammar),
            detokenizer=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
            eos_ids=self.tokenizer.eos_token_ids,
            max_length=min(self.context_length, len(prompt) + params.max_tokens),
        )
        self.scheduler.add(seq)
        self.requests[rid] = seq
        return rid

    def validate_prompt(self, prompt_ids: Seq[int]) -> ValidPrompt:
        return validate_prompt(prompt_ids, self.model.cfg.vocab_size, self.context_length)

    def abort(self, request_id: int) -> Delta | None:
        """Cancel a waiting or running request; its cache is freed at once."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        seq.abort()
        self._drop(seq)
        self.stats.aborted += 1
        return Delta(request_id, "", [], None, "abort", seq.metrics)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def metrics(self) -> EngineMetrics:
        blocks = self.scheduler.blocks
        return EngineMetrics(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=blocks.num_used,
            kv_blocks_free=blocks.num_available,
            prefix_hit_rate=blocks.stats.hit_rate,
            preemptions=self.scheduler.preemptions,
            stats=self.stats,
        )

    @torch.inference_mode()
    def step(self) -> list[tuple[Delta, Sequence]]:
        """One forward pass over the scheduled chunks. Every sequence whose tokens are now all cached takes new
        ones: one sampled (and any its grammar forces), or with speculation its accepted drafts and one more.

        If the pass or what follows it raises, the requests in the step are aborted before the exception
        propagates: their caches and sampling states stopped part-way, so they cannot go on. The others
        (those waiting) are untouched and go on at the next step."""
        start = time.perf_counter()
        chunks = self.scheduler.schedule()
        self.cache.release_rings({seq.request_id for seq in self.scheduler.running})
        if not chunks:
            return []
        try:
            return self._run(chunks, start)
        except Exception:
            for c in chunks:
                self.abort(c.seq.request_id)
            raise

    def _run(self, chunks: list[Chunk], start: float) -> list[tuple[Delta, Sequence]]:
        """`step` from the forward pass on."""
        hidden = self._forward(chunks)
        decoding = all(c.seq.num_cached - c.length >= len(c.seq.prompt_ids) for c in chunks)  # no prompt in it
        ends = itertools.accumulate(c.length for c in chunks)
        ready = [(c, end) for c, end in zip(chunks, ends) if c.seq.num_cached == c.seq.fed_length]
        if not ready:
            return []
        # Each ready sequence's last row, or with drafts the rows of its last token and of every draft.
        rows = [end - len(c.seq.draft) - 1 + i for c, end in ready for i in range(len(c.seq.draft) + 1)]
        taken = self._take(ready, self.model.logits(hidden[self._tensor(rows)]))
        seconds = time.perf_counter() - start
        if decoding:  # decodes and verifications: what drafts cost
            self.pass_cost.record(sum(c.length for c in chunks), seconds)
        results = []
        for (c, _), took in zip(ready, taken):
            seq = c.seq
            delta = self._advance(seq, took)
            delta.forward_pass = Pass(self.stats.steps, seconds, c.length)
            self.stats.generated_tokens += len(delta.token_ids)
            if seq.finished:
                self._drop(seq)
                if seq.finish_reason == "error":
                    self.stats.aborted += 1
                else:
                    self.stats.finished += 1
            results.append((delta, seq))
        if self.speculation is not None:
            self._propose(self.speculation, [seq for _, seq in results if not seq.finished])
        return results

    def _advance(self, seq: Sequence, took: Taken | GrammarError) -> Delta:
        """Append what `seq` took this step, and any tokens its grammar then forces; one delta for them all. A
        grammar that gives up (while verifying drafts, or on a token) ends this request alone, with an error."""
        delta = Delta(seq.request_id, "", [], [] if seq.logprobs is not None else None)
        if isinstance(took, GrammarError):
            return seq.fail(str(took), delta)
        try:
            tokens, logprobs = took
            seq.extend(tokens, delta, logprobs)
            if not seq.finished and (forced := seq.sampling.forced()):
                seq.extend(forced, delta)
                self.stats.forced_tokens += len(forced)
        except GrammarError as e:
            seq.fail(str(e), delta)
        return delta

    def _drop(self, seq: Sequence) -> None:
        """Forget a finished or aborted request and free its caches."""
        self.requests.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        if self.drafter is not None:
            self.drafter.forget(seq.request_id)

    def _take(self, ready: list[tuple[Chunk, int]], logits: torch.Tensor) -> list[Taken | GrammarError]:
        """The tokens each ready sequence takes, with their logprobs where asked for: sampled from its row, or its
        drafts' verdict from its rows (whose rejected positions leave the cache)."""
        firsts = [0, *itertools.accumulate(len(c.seq.draft) + 1 for c, _ in ready)][:-1]
        plain = [i for i, (c, _) in enumerate(ready) if not c.seq.draft]
        taken: list[Taken | GrammarError] = [([], [])] * len(ready)
        if plain:
            out = sample(logits[[firsts[i] for i in plain]], [ready[i][0].seq.sampling for i in plain])
            for i, token, lp in zip(plain, out.token_ids, out.logprobs):
                taken[i] = ([token], [lp])
        for i, (c, _) in enumerate(ready):
            if c.seq.draft:
                rows = logits[firsts[i] : firsts[i] + len(c.seq.draft) + 1]
                try:
                    tokens = self._verify(c.seq, rows)
                except GrammarError as e:  # its grammar gave up on a draft it had allowed: the request ends
                    taken[i] = e
                    continue
                taken[i] = (tokens, token_logprobs(rows[: len(tokens)], [c.seq.sampling] * len(tokens), tokens))
        return taken

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """Accept a prefix of `seq`'s drafts (speculation.py) and roll the cache back past them."""
        logprobs = process_rows(logits, seq.sampling, seq.draft)
        best = logprobs.argmax(dim=-1).tolist()
        if seq.params.greedy:
            verdict = verify_greedy(seq.draft, best)
        else:
            verdict = verify_sampled(seq.draft, logprobs.exp(), seq.draft_probs, seq.sampling.generator)
        seq.drafting.trajectory.record([seq.output_ids[-1], *seq.draft], best, verdict.accepted)
        self.stats.drafted += len(seq.draft)
        self.stats.accepted += verdict.accepted
        self.stats.verifications += 1
        seq.drafting.record(len(seq.draft), verdict.accepted)
        at = self.stats.accepted_at
        at += [0] * (verdict.accepted - len(at))
        for i in range(verdict.accepted):
            at[i] += 1
        self.scheduler.truncate(seq, seq.length + verdict.accepted)
        seq.draft = []
        return verdict.tokens

    def _propose(self, spec: Speculation, seqs: list[Sequence]) -> None:
        """Drafts for the next pass of those of `seqs` that may speculate, as many as the batch leaves room for."""
        running = len(self.scheduler.running)
        room = spec.drafts_per_sequence(running)
        wanted = []  # a draft model's requests: drafted together
        for seq in seqs:
            params = seq.params
            if not params.speculate or params.trace:
                continue
            # A sampled request's draws follow its drafts, so their number must not depend on timings:
            # it takes the prior cost model, and a seeded request stays reproducible.
            cost = self.pass_cost if params.greedy else PRIOR_COST
            most = min(room, seq.max_length - seq.length - 1)
            if self.drafter is None:
                seq.draft = spec.propose(seq.all_tokens(), most, seq.drafting, cost, running)
                if (grammar := seq.sampling.grammar) is not None:  # verification masks along the drafts
                    seq.draft = seq.draft[: grammar.valid_prefix(seq.draft)]
            elif n := spec.wanted(seq.drafting, seq.drafting.model, most, cost, running,
                                  self.drafter.cost(cost, running)):
                wanted.append((seq, n))
        if wanted:
            start = time.perf_counter()
            self.drafter.propose(wanted)
            self.stats.draft_seconds += time.perf_counter() - start

    def _forward(self, chunks: list[Chunk]) -> torch.Tensor:
        for c in chunks:
            start, prompt = c.seq.num_cached, len(c.seq.prompt_ids)
            if start < prompt:
                self.stats.prompt_tokens += min(start + c.length, prompt) - start
                c.seq.metrics.scheduled = c.seq.metrics.scheduled or time.perf_counter()
        batch = StepBatch.of(chunks, self.cache)
        hidden = self.runner.run(batch)
        for c in chunks:
            self.scheduler.computed(c.seq, c.length)
        self.stats.steps += 1
        self.stats.step_tokens = len(batch.tokens)
        return hidden

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
