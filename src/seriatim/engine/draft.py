"""Speculative drafts from a draft model: a smaller model with the target's vocabulary decodes each
speculating sequence's next tokens itself, every sequence batched in each of its passes, over a paged KV
cache of its own.

The draft's cache follows each sequence lazily: before drafting, whatever it holds beyond the longest
prefix it shares with the sequence's tokens is rolled back (rejected drafts), and the tokens it lacks are
fed (the prompt, the target's own tokens, the last accepted draft) in the same pass that drafts the first
new token. So the target's verification, preemption and forced grammar tokens need not tell it anything:
it compares tokens. Only a request's end does (`forget`), to free its blocks.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..grammar.state import GrammarError
from ..model.paged_kv import PagedKVCache
from ..model.quant import leading_rows
from ..model.transformer import Transformer
from ..sampling import SamplingState, process_rows
from ..text.tokenizer import Tokenizer
from .block_manager import BlockManager, BlockTable
from .runner import Feed, ModelRunner, StepBatch
from .sequence import Sequence
from .speculation import PassCost, draw

Pick = tuple[int, torch.Tensor | None]  # a draft, and the distribution it was drawn from (sampled requests)


def check_pair(target: Transformer, target_tokenizer: Tokenizer, draft: Transformer, draft_tokenizer: Tokenizer,
               name: str) -> None:
    """ValueError unless `draft` can draft for `target`: the same token ids for the same strings, logits over
    the same vocabulary, and no sliding-window layers (their rings keep too little to roll back freely)."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft model {name} has a vocabulary of {draft.cfg.vocab_size} tokens, the model "
                         f"{target.cfg.vocab_size}: a draft model must share the model's tokenizer")
    if draft_tokenizer.hf.get_vocab(with_added_tokens=True) != target_tokenizer.hf.get_vocab(with_added_tokens=True):
        raise ValueError(f"draft model {name} has a different tokenizer: a draft model must share the model's "
                         "tokenizer (e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)")
    if any(draft.cfg.layer_window(i) is not None for i in range(draft.cfg.num_layers)):
        raise ValueError(f"draft model {name} has sliding-window layers, which a draft model cannot have here")


@dataclass
class DraftState:
    """What the draft's cache holds of one sequence: these tokens' keys and values, in `table`'s blocks."""

    table: BlockTable = field(default_factory=BlockTable)
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Drafting:
    """One sequence's drafts as they are decoded, under `sampling`: the sequence's own sampling state but for
    its grammar, a copy the drafts advance (as the verification's masks will be) and then leave. A draft that
    llguidance gives up on ends the drafting only: the target may never take that token."""

    seq: Sequence
    n: int  # drafts wanted
    state: DraftState
    sampling: SamplingState
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor | None] = field(default_factory=list)  # each draft's distribution (sampled requests)
    done: bool = False  # no more drafts: the grammar has ended, given up, or allows nothing the draft has

    def take(self, pick: Pick | None) -> None:
        """Append a draft and its distribution, or with None (nothing could be drawn) end the drafting."""
        if pick is None:
            self.done = True
            return
        token, probs = pick
        if (grammar := self.sampling.grammar) is not None:
            try:
                grammar.accept(token)
            except GrammarError:
                self.done = True
                return
            self.done = grammar.finished()
        self.tokens.append(token)
        self.probs.append(probs)

    @property
    def more(self) -> bool:
        return not self.done and len(self.tokens) < self.n


class DraftModel:
    """Proposes a sequence's next tokens by decoding them with a smaller model.

    `relative_cost`: one draft token's cost against a one-row pass of the target, taken as the ratio of the
    weight bytes the two models read per token (a CPU's decode pass reads each weight once): how many drafts
    pay depends on it (`Acceptance.drafts`). A fixed figure, not a timing, so that a sampled request's
    drafts, and with them its draws, do not depend on the machine's load. Greedy requests, whose output no
    number of drafts changes, go by the passes' measured times instead (`cost`).

    `vocab`: the draft proposes only the first `vocab` token ids (None: all). Its head is then a slice of its
    own, sharing the weights: on a 0.5B model with 152k tokens the head is about a third of a decode pass's
    bytes, while a BPE vocabulary's first ids are its most frequent merges, which make most text."""

    def __init__(self, model: Transformer, target: Transformer, kv_dtype: torch.dtype, device: torch.device,
                 num_blocks: int, block_size: int, max_pass_tokens: int, batch_invariant: bool,
                 vocab: int | None = None):
        self.model = model
        self.head = None if vocab is None or vocab >= model.cfg.vocab_size else leading_rows(model.lm_head, vocab)
        self.cache = PagedKVCache(model.cfg, num_blocks, block_size, kv_dtype, device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, self.cache, False, batch_invariant)
        self.max_pass_tokens = max_pass_tokens  # a long prompt catches up in chunks, as the target prefills it
        self.relative_cost = model.bytes_per_token(self.head) / target.bytes_per_token()
        self.pass_cost = PassCost()  # the draft's own passes, by the rows (drafting requests) in them
        self.states: dict[int, DraftState] = {}  # request id -> its cache

    def cost(self, target: PassCost, rows: int) -> float:
        """One draft token's cost against a pass of the target's: a draft pass over `rows` rows against a target
        pass over as many, as both have been measured (`target` PRIOR_COST, which measures nothing: the
        fixed `relative_cost`)."""
        mine, theirs = self.pass_cost.estimate(rows), target.estimate(rows)
        return self.relative_cost if mine is None or theirs is None else mine / theirs

    def forget(self, request_id: int) -> None:
        """Free a finished or aborted request's cache."""
        if (state := self.states.pop(request_id, None)) is not None:
            self.blocks.free_table(state.table)

    def propose(self, wanted: list[tuple[Sequence, int]]) -> None:
        """Set each sequence's `draft` to the draft model's next `n` tokens after its own (greedy: its argmax;
        sampled: drawn from its processed distribution with the request's generator, which is kept in
        `draft_probs` [n, V] for the verification). A sequence the draft's cache has no room for gets none."""
        drafting, feeds = [], []
        for seq, n in wanted:
            state = self.states.setdefault(seq.request_id, DraftState())
            tokens = seq.all_tokens()
            start = self._keep_common_prefix(state, tokens)
            if not self.blocks.grow(state.table, len(tokens) + n - 1):
                self.forget(seq.request_id)
                continue
            drafting.append(_Drafting(seq, n, state, seq.sampling.branch()))
            feeds.append(tokens[start:])
        active = drafting
        while active:
            start = time.perf_counter()
            logits = self._run([(d.state, tokens) for d, tokens in zip(active, feeds)])
            # A draft's pass feeds one or two tokens a request (the target's, and the last draft kept); one that
            # catches up on a prompt costs more, and is not what a draft costs.
            if all(len(tokens) <= 2 for tokens in feeds):
                self.pass_cost.record(len(active), time.perf_counter() - start)
            for d, row in zip(active, logits):
                d.take(self._pick(d.sampling, row, d.tokens))
            active = [d for d in active if d.more]
            feeds = [d.tokens[-1:] for d in active]
        for d in drafting:
            d.seq.draft = d.tokens
            d.seq.draft_probs = None if d.seq.params.greedy or not d.probs else torch.stack(d.probs)

    def _keep_common_prefix(self, state: DraftState, tokens: list[int]) -> int:
        """Roll the cache back to the longest prefix it shares with `tokens`, leaving at least one token of
        `tokens` to feed (its logits draft the first token); returns the prefix's length."""
        common = next((i for i, (a, b) in enumerate(zip(state.tokens, tokens)) if a != b),
                      min(len(state.tokens), len(tokens)))
        common = min(common, len(tokens) - 1)
        if common < len(state.tokens):
            self.blocks.truncate(state.table, common)
            del state.tokens[common:]
        return common

    def _run(self, feeds: list[tuple[DraftState, list[int]]]) -> torch.Tensor:
        """Feed each state its tokens, in passes of at most `max_pass_tokens` tokens each -> logits [N, V]
        after each one's last token."""
        last: list[torch.Tensor | None] = [None] * len(feeds)
        pending = list(enumerate(feeds))
        while pending:
            pieces = [(i, state, tokens[: self.max_pass_tokens]) for i, (state, tokens) in pending]
            batch = StepBatch.of_feeds([Feed(s.table.blocks, len(s.tokens), piece) for _, s, piece in pieces],
                                       self.cache)
            hidden = self.runner.run(batch)
            for (i, state, piece), end in zip(pieces, itertools.accumulate(len(p) for _, _, p in pieces)):
                state.tokens += piece
                last[i] = hidden[end - 1]
            pending = [(i, (s, tokens[self.max_pass_tokens :])) for i, (s, tokens) in pending
                       if len(tokens) > self.max_pass_tokens]
        hidden = torch.stack(last)
        if self.head is None:
            return self.model.logits(hidden)
        logits = hidden.new_full((len(last), self.model.cfg.vocab_size), -torch.inf, dtype=torch.float32)
        logits[:, : self.head.out_features] = self.model.logits(hidden, self.head)
        return logits

    @staticmethod
    def _pick(sampling: SamplingState, logits: torch.Tensor, drafted: list[int]) -> Pick | None:
        """The next draft after `drafted`, from the draft's logits [V] processed as the target's will be (the
        grammar in `sampling` at `drafted`'s end); None where that leaves nothing (a grammar allowing only ids
        past a `draft_vocab`)."""
        logprobs = process_rows(logits[None], sampling.ahead(drafted))[0]
        if logprobs.isnan().all():  # log_softmax of a row all -inf
            return None
        if sampling.params.greedy:
            return int(logprobs.argmax()), None
        probs = logprobs.exp()
        return draw(probs, sampling.generator), probs
