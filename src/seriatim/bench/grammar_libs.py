"""llguidance against xgrammar on this CPU, for choosing the structured-output library.

For each model's tokenizer and for both libraries it measures:

- tokenizer setup: building the library's view of the vocabulary, once per model;
- schema compile time for the 20 JSON Schemas in schemas.json (no cache), and compile plus the first
  mask, since llguidance builds its lexer lazily and xgrammar precomputes masks at compile time;
- the time to fill the next-token bitmask (and to commit the token) at every step of a walk along a
  real, valid instance of each schema, then EOS, at batch 1 and at batch 16 (16 sequences in lock
  step, each on its own schema, restarted when done). The walk takes the instance's BPE tokens except
  where a library's mask rules one out; there it takes the longest allowed token that spells the text
  that follows, as a constrained model would. The first walk of each schema is timed too, so what a
  library builds lazily shows in p99;
- which JSON Schema features of those schemas each library accepts, rejects, or accepts while
  ignoring a constraint (xgrammar says so only in a log line, which is captured here).

Both libraries are set to compact JSON (no free whitespace, "," and ":" separators), so one instance
text serves both. Run it: `python -m seriatim.bench.grammar_libs [--quick] [--models ...]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import llguidance
import llguidance.torch
import torch
import transformers
import xgrammar

from ..kernels import isa
from .structured import schemas as load_structured_schemas

DEFAULT_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
BATCH = 16
QUICK_SCHEMAS = 3
QUICK_BATCH_STEPS = 32
MIN_WALK_TOKENS = 30
ERROR_CHARS = 90

# One valid instance per schema, keys in the schemas' declared order: both libraries emit properties
# in that order, so a walk in any other order would be rejected.
INSTANCES: dict[str, Any] = {
    "contact_card": {
        "full_name": "Ada Lovelace", "email": "ada.lovelace@example.com", "phone": "+441632960123",
        "birthday": "1815-12-10", "company": "Analytical Engines Ltd", "tags": ["work", "vip"],
    },
    "address_book": {
        "owner": "Grace Hopper", "updated": "2024-05-01T09:30:00Z",
        "contacts": [
            {"name": "Alan Turing", "email": "alan@example.org",
             "home": {"street": "43 Hollymeade", "city": "Wilmslow", "postal_code": "SK9 1AB", "country": "GB"}},
            {"name": "Katherine Johnson", "home": {"street": "12 Orbit Lane", "city": "Hampton", "country": "US"}},
        ],
    },
    "invoice": {
        "invoice_id": "INV-004217", "issued": "2024-03-01", "due": "2024-03-31", "currency": "EUR",
        "customer": {"name": "Acme GmbH", "email": "billing@acme.example", "vat_id": "DE123456789"},
        "line_items": [
            {"sku": "WID-1001", "description": "Steel widget, 10 mm", "quantity": 12, "unit_price": 4.5},
            {"sku": "SVC-200", "description": "Installation", "quantity": 1, "unit_price": 120},
        ],
        "total": 174,
    },
    "github_issue": {
        "number": 4821, "title": "Crash when loading a GGUF file with no chat template", "state": "open",
        "html_url": "https://github.com/acme/seriatim/issues/4821", "user": {"login": "octocat", "id": 583231},
        "labels": [{"name": "bug", "color": "d73a4a"}, {"name": "good first issue", "color": "7057ff"}],
        "assignee": None, "created_at": "2024-06-12T14:03:27Z", "comments": 3, "locked": False,
    },
    "calendar_event": {
        "id": "3f2b8c1e-9a4d-4e6f-8b2a-1c5d7e9f0a12", "title": "Quarterly planning",
        "start": "2024-07-08T10:00:00+02:00", "end": "2024-07-08T11:30:00+02:00", "all_day": False,
        "location": {"kind": "virtual", "url": "https://meet.example.com/q3-plan"},
        "attendees": [
            {"email": "li.wei@example.com", "response": "accepted"},
            {"email": "sam.ortiz@example.com", "response": "tentative"},
        ],
        "recurrence": "monthly", "reminder_minutes": 15,
    },
    "product_catalog_entry": {
        "sku": "ELE-2048", "name": "Noise-cancelling headphones", "price": {"amount": 199.5, "currency": "USD"},
        "categories": ["electronics"], "in_stock": True, "stock_count": 342,
        "dimensions_cm": {"width": 18.5, "height": 20, "depth": 8.2},
        "variants": [{"color": "black", "size": "M"}, {"color": "silver"}],
    },
    "weather_report": {
        "station": {"city": "Reykjavik", "lat": 64.13, "lon": -21.9}, "observed_at": "2024-01-15T12:00:00Z",
        "temperature_c": -3.5, "humidity_pct": 81, "conditions": "snow", "wind": {"speed_kmh": 27.4, "direction": "NE"},
        "forecast": [
            {"date": "2024-01-16", "high_c": -1, "low_c": -6, "precip_pct": 70},
            {"date": "2024-01-17", "high_c": 1, "low_c": -4, "precip_pct": 40},
        ],
    },
    "recipe": {
        "title": "Tomato basil pasta", "servings": 4, "prep_minutes": 10, "cook_minutes": 15, "difficulty": "easy",
        "vegetarian": True,
        "ingredients": [
            {"name": "spaghetti", "quantity": 400, "unit": "g"},
            {"name": "cherry tomatoes", "quantity": 250, "unit": "g"},
            {"name": "olive oil", "quantity": 2, "unit": "tbsp"},
        ],
        "steps": ["Boil the pasta in salted water until al dente.", "Toss with the tomatoes and basil."],
    },
    "geojson_feature": {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": [[-122.4194, 37.7749], [-122.2711, 37.8044]]},
        "properties": {"name": "Bay Trail segment", "elevation_m": 12},
    },
    "log_event": {
        "timestamp": "2024-09-03T08:15:42.123Z", "level": "ERROR", "logger": "api.orders.handler",
        "message": "Payment provider timed out after 3 retries", "request_id": "b7e4a1d2-5c3f-4e8a-9d6b-2f1e0c9a8b7d",
        "context": {"user_id": 1048576, "path": "/v1/orders/checkout", "status": 504, "duration_ms": 30012.5},
        "error": {"type": "TimeoutError", "message": "upstream did not answer within 30 s"},
    },
    "tool_call_search_flights": {
        "origin": "SFO", "destination": "NRT", "depart_date": "2024-10-05", "return_date": "2024-10-19",
        "passengers": {"adults": 2, "children": 1}, "cabin": "premium_economy", "nonstop_only": True,
        "max_price": {"amount": 2500, "currency": "USD"},
    },
    "order": {
        "order_id": "9c1d2e3f-4a5b-4c6d-8e7f-0a1b2c3d4e5f", "status": "shipped", "placed_at": "2024-04-22T16:45:00Z",
        "items": [{"product_id": "P10234", "quantity": 2, "price": 19.5}, {"product_id": "P20411", "quantity": 1,
                                                                             "price": 89}],
        "shipping_address": {"street": "221B Baker Street", "city": "London", "postal_code": "NW1 6XE",
                             "country": "GB"},
        "payment": {"method": "card", "last4": "4242", "brand": "visa"},
    },
    "service_config": {
        "version": 2, "service": {"name": "orders-api", "host": "orders.internal.example.com", "port": 8080},
        "logging": {"level": "info", "format": "json"},
        "database": {"url": "postgres://db.example.com:5432/orders", "pool_size": 16, "timeout_s": 5.5},
        "features": {"new_checkout": True, "dark_mode": False}, "retries": 3, "debug": False,
    },
    "movie_review": {
        "movie": {"title": "Spirited Away", "year": 2001, "imdb_id": "tt0245429"}, "rating": 9.5,
        "headline": "A timeless, gorgeous fairy tale", "body": "Miyazaki at his best: strange, warm, never cloying.",
        "contains_spoilers": False, "reviewer": {"name": "Priya N.", "email": "priya@example.net", "verified": True},
        "reviewed_on": "2024-02-11", "tags": ["animation", "fantasy"],
    },
    "bank_transaction": {
        "transaction_id": "e4d3c2b1-a0f9-4e8d-b7c6-5a4b3c2d1e0f", "account_iban": "DE89370400440532013000",
        "amount": 1250, "currency": "EUR", "direction": "debit", "booked_at": "2024-08-01T07:00:00Z",
        "value_date": "2024-08-01", "counterparty": {"name": "Hausverwaltung Meyer", "iban": "DE02120300000000202051"},
        "category": "rent", "memo": "Miete August 2024",
    },
    "chess_move": {
        "game_id": "0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", "move_number": 23, "color": "white", "san": "Nxe5+",
        "from": "f3", "to": "e5", "piece": "knight", "captured": "pawn", "check": True,
        "clock": {"white_ms": 412000, "black_ms": 388500},
    },
    "book_with_authors": {
        "isbn": "9780441172719", "title": "Dune",
        "authors": [{"name": "Frank Herbert", "born": 1920, "nationality": "US"}], "translator": None,
        "publisher": "Chilton Books", "published": "1965-08-01", "pages": 412, "genres": ["fiction", "fantasy"],
        "language": "en",
    },
    "medical_appointment": {
        "appointment_id": "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d",
        "patient": {"name": "Jordan Smith", "date_of_birth": "1987-03-14", "mrn": "MRN0048213"},
        "provider": {"name": "Dr. Amara Okafor", "specialty": "dermatology"},
        "scheduled_for": "2024-11-05T09:15:00-05:00", "duration_minutes": 30, "visit_type": "in_person",
        "reason": "Follow-up on eczema treatment", "status": "scheduled",
        "insurance": {"provider": "BlueCross", "member_id": "XJ4827193"},
    },
    "sports_match_score": {
        "match_id": "M240817", "sport": "football", "competition": "Premier League", "kickoff": "2024-08-17T14:00:00Z",
        "home": {"team": "Arsenal", "score": 2}, "away": {"team": "Wolves", "score": 0}, "status": "full_time",
        "minute": 90,
        "events": [
            {"minute": 25, "kind": "goal", "side": "home", "player": "Kai Havertz"},
            {"minute": 74, "kind": "goal", "side": "home", "player": "Bukayo Saka"},
        ],
    },
    "survey_response": {
        "survey_id": "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d", "submitted_at": "2024-05-30T18:22:05Z",
        "respondent": {"age_range": "25-34", "country": "CA"},
        "answers": [
            {"question": "satisfaction", "value": 4}, {"question": "channel", "value": "web"},
            {"question": "comment", "value": "Checkout was quick but delivery took a week."},
        ],
        "nps": 8, "consent": True,
    },
}


@dataclass(frozen=True)
class Case:
    """A schema with the text and tokens of one valid instance."""

    name: str
    schema: str  # serialized once, so that neither library's compile time includes json.dumps
    text: str
    tokens: tuple[int, ...]  # the instance's BPE tokens (EOS not included)


@dataclass(frozen=True)
class Vocabulary:
    name: str
    tokenizer: Any  # seriatim.text.tokenizer.Tokenizer
    size: int  # the model's logit width: the mask covers this many tokens


@dataclass
class Compiled:
    """One library's result for one schema: the timings are medians over the samples."""

    name: str
    seconds: float = math.nan
    ready_seconds: float = math.nan  # compile, matcher, first mask
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    handle: Any = None
    walk: tuple[int, ...] = ()  # the instance as this library lets it be tokenized, then EOS
    retokenized: int = 0  # steps where the mask ruled out the BPE token and the walk took another


@dataclass
class Steps:
    """Per-step timings of mask fills (and token commits) along walks, in microseconds."""

    mask_us: list[float] = field(default_factory=list)
    commit_us: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class LibraryRun:
    library: str
    setup_seconds: float
    compiled: list[Compiled]
    batch1: Steps
    batch16: Steps


@dataclass(frozen=True)
class Compilation:
    """A library's answer to compiling one schema: the error, or the warnings (constraints ignored)."""

    handle: Any
    seconds: float  # the library's own calls only, not the capture of its log
    error: str | None
    warnings: list[str]


class Library(Protocol):
    """What the measurements need from a grammar library; one instance per vocabulary."""

    name: str

    def compile(self, schema: str) -> Compilation: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, mask: torch.Tensor) -> None: ...
    def fill_batch(self, matchers: list[Any], mask: torch.Tensor) -> None: ...
    def commit(self, matcher: Any, token: int) -> bool: ...
    def commit_batch(self, matchers: list[Any], tokens: list[int]) -> list[bool]: ...
    def reset(self, matcher: Any) -> None: ...


# ---------------------------------------------------------------------------------------------- libraries


class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab: Vocabulary, threads: int) -> None:
        self.tokenizer = llguidance.LLTokenizer(
            vocab.tokenizer.hf.to_str(), n_vocab=vocab.size, eos_token=sorted(vocab.tokenizer.eos_token_ids)
        )
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: str) -> Compilation:
        # The schema becomes a grammar string that LLMatcher parses again: both are llguidance's compile.
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        seconds = time.perf_counter() - start
        if matcher.is_error():
            return Compilation(None, seconds, matcher.get_error(), [])
        return Compilation(matcher, seconds, None, matcher.get_grammar_warnings())

    def matcher(self, compiled: Any) -> Any:
        # The compiled object is already a matcher at its start; copies share its grammar and lexer.
        return compiled.deep_copy()

    def fill(self, matcher: Any, mask: torch.Tensor) -> None:
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)

    def fill_batch(self, matchers: list[Any], mask: torch.Tensor) -> None:
        llguidance.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], mask)

    def commit(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def commit_batch(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        return self.executor.consume_token_par(list(zip(matchers, tokens)))

    def reset(self, matcher: Any) -> None:
        matcher.reset()


class XGrammar:
    name = "xgrammar"

    def __init__(self, vocab: Vocabulary, threads: int) -> None:
        self.threads = threads
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab.tokenizer.hf)
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab.size, stop_token_ids=sorted(vocab.tokenizer.eos_token_ids)
        )
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: str) -> Compilation:
        # A compiler per schema with its cache off: every compile starts from nothing.
        compiler = xgrammar.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        with captured_stderr() as log:
            start = time.perf_counter()
            try:
                compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
            except Exception as e:  # any failure is a result to report
                return Compilation(None, time.perf_counter() - start, f"{type(e).__name__}: {e}", [])
            seconds = time.perf_counter() - start
        return Compilation(compiled, seconds, None, [line for line in log if "Warning" in line])

    def matcher(self, compiled: Any) -> Any:
        return xgrammar.GrammarMatcher(compiled)

    def fill(self, matcher: Any, mask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(mask, 0)

    def fill_batch(self, matchers: list[Any], mask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, mask)

    def commit(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def commit_batch(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        return xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    def reset(self, matcher: Any) -> None:
        matcher.reset()


LIBRARIES: tuple[Callable[[Vocabulary, int], Library], ...] = (LLGuidance, XGrammar)


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """The lines written to file descriptor 2 inside the block: xgrammar's C++ log reports an ignored
    constraint only there, not as a Python warning."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


# ---------------------------------------------------------------------------------------------- inputs


def load_vocabulary(model: str) -> Vocabulary:
    from ..model.config import gguf_vocab_size
    from ..text.tokenizer import Tokenizer
    from ..weights.gguf_file import read_gguf_metadata
    from ..weights.registry import resolve_model

    # The metadata is read once for both the tokenizer and the logit width (which can exceed the
    # tokenizer's vocabulary: the mask must cover every logit).
    meta = read_gguf_metadata(resolve_model(model))
    return Vocabulary(model, Tokenizer.from_gguf_metadata(meta), gguf_vocab_size(meta))


def make_cases(schemas: list[dict[str, Any]], vocab: Vocabulary) -> list[Case]:
    cases = []
    for entry in schemas:
        text = json.dumps(INSTANCES[entry["name"]], separators=(",", ":"))
        tokens = tuple(vocab.tokenizer.encode(text, add_special_tokens=False))
        if len(tokens) + 1 < MIN_WALK_TOKENS:
            raise ValueError(f"the instance of {entry['name']} is {len(tokens)} tokens; walks need {MIN_WALK_TOKENS}")
        cases.append(Case(entry["name"], json.dumps(entry["schema"]), text, tokens))
    return cases


def check_instances(schemas: list[dict[str, Any]]) -> None:
    """Every instance must satisfy its schema, or a rejected walk would blame the library."""
    import jsonschema

    for entry in schemas:
        validator = jsonschema.Draft202012Validator(
            entry["schema"], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        validator.validate(INSTANCES[entry["name"]])


# ---------------------------------------------------------------------------------------------- measuring


def allowed(mask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(mask[row, token >> 5]) >> (token & 31)) & 1)


def allowed_tokens(mask: torch.Tensor, row: int) -> list[int]:
    return [32 * i + b for i, word in enumerate(mask[row].tolist()) if word for b in range(32) if (word >> b) & 1]


def new_mask(batch: int, vocab_size: int) -> torch.Tensor:
    # The layout both libraries use: one bit a token, 32 to an int32.
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def compile_case(lib: Library, case: Case, vocab_size: int, samples: int) -> Compiled:
    result = Compiled(case.name)
    seconds, ready = [], []
    mask = new_mask(1, vocab_size)
    for _ in range(samples):
        compilation = lib.compile(case.schema)
        if compilation.error is not None:
            result.error = compilation.error
            return result
        start = time.perf_counter()
        lib.fill(lib.matcher(compilation.handle), mask)
        ready.append(compilation.seconds + time.perf_counter() - start)
        seconds.append(compilation.seconds)
    result.seconds, result.ready_seconds = statistics.median(seconds), statistics.median(ready)
    result.warnings, result.handle = compilation.warnings, compilation.handle
    return result


def plan_walk(lib: Library, compiled: Compiled, case: Case, vocab: Vocabulary) -> str | None:
    """Set `compiled.walk`: the instance's BPE tokens, except where the library's mask rules one out
    (llguidance allows only its own tokenization of bytes the grammar forces); there it takes the
    longest allowed token that spells the text that follows, as a constrained model would, and goes on
    with the BPE tokens of the rest. Returns why the walk cannot go on, or None.

    It plans on a grammar compiled again, so that whatever a library builds lazily on a first walk is
    still to be built when the timed walks start, as it would be for a new request."""
    tok, mask = vocab.tokenizer, new_mask(1, vocab.size)
    matcher = lib.matcher(lib.compile(case.schema).handle)
    pending, done, walk = list(case.tokens), "", []
    while pending:
        lib.fill(matcher, mask)
        token = pending[0] if allowed(mask, 0, pending[0]) else longest_fit(mask, tok, case.text[len(done):])
        if token is None:
            return f"{case.name}: no allowed token spells {case.text[len(done):][:12]!r}"
        lib.commit(matcher, token)
        walk.append(token)
        done += tok.decode([token])
        if token == pending[0]:
            pending.pop(0)
        else:
            compiled.retokenized += 1
            pending = tok.encode(case.text[len(done):], add_special_tokens=False)
    lib.fill(matcher, mask)
    eos = [t for t in sorted(tok.eos_token_ids) if allowed(mask, 0, t)]
    if not eos:
        return f"{case.name}: EOS masked out at the end"
    compiled.walk = (*walk, eos[0])
    return None


def longest_fit(mask: torch.Tensor, tok: Any, rest: str) -> int | None:
    # Instances are ASCII, so a single token's decoded text is exactly its bytes.
    fits = [(len(s), t) for t in allowed_tokens(mask, 0) if (s := tok.decode([t])) and rest.startswith(s)]
    return max(fits)[1] if fits else None


def walk(lib: Library, compiled: Compiled, mask: torch.Tensor, steps: Steps) -> None:
    """Fill a mask before every token of the walk and commit the token: the decode loop at batch 1."""
    matcher = lib.matcher(compiled.handle)
    for i, token in enumerate(compiled.walk):
        start = time.perf_counter()
        lib.fill(matcher, mask)
        filled = time.perf_counter()
        accepted = lib.commit(matcher, token)
        done = time.perf_counter()
        if not (accepted and allowed(mask, 0, token)):
            steps.failures.append(f"{compiled.name}: token {i} ({token}) failed at batch 1")
            return
        steps.mask_us.append((filled - start) * 1e6)
        steps.commit_us.append((done - filled) * 1e6)


def batch1(lib: Library, compiled: list[Compiled], vocab_size: int, samples: int) -> Steps:
    steps, mask = Steps(), new_mask(1, vocab_size)
    for _ in range(samples):
        for c in compiled:
            walk(lib, c, mask, steps)
    return steps


def batch16(lib: Library, compiled: list[Compiled], vocab_size: int, n_steps: int) -> Steps:
    """BATCH sequences in lock step, slot j on schema j mod n; a finished slot starts its walk again, so
    every step fills BATCH masks."""
    steps, mask = Steps(), new_mask(BATCH, vocab_size)
    slots = [compiled[j % len(compiled)] for j in range(BATCH)]
    matchers = [lib.matcher(c.handle) for c in slots]
    positions = [0] * BATCH
    for _ in range(n_steps):
        tokens = [c.walk[p] for c, p in zip(slots, positions)]
        start = time.perf_counter()
        lib.fill_batch(matchers, mask)
        filled = time.perf_counter()
        accepted = lib.commit_batch(matchers, tokens)
        done = time.perf_counter()
        steps.mask_us.append((filled - start) * 1e6)
        steps.commit_us.append((done - filled) * 1e6)
        for j, c in enumerate(slots):
            failed = not (accepted[j] and allowed(mask, j, tokens[j]))
            if failed:
                steps.failures.append(f"{c.name}: token {positions[j]} failed at batch {BATCH}")
            positions[j] += 1
            if failed or positions[j] == len(c.walk):
                lib.reset(matchers[j])
                positions[j] = 0
    return steps


def run_library(
    make: Callable[[Vocabulary, int], Library], vocab: Vocabulary, cases: list[Case], samples: int,
    threads: int, batch_steps: int | None,
) -> LibraryRun:
    start = time.perf_counter()
    lib = make(vocab, threads)
    setup = time.perf_counter() - start
    compiled = [compile_case(lib, case, vocab.size, samples) for case in cases]
    unplanned = [plan_walk(lib, c, case, vocab) for c, case in zip(compiled, cases) if c.error is None]
    walkable = [c for c in compiled if c.walk]
    one = batch1(lib, walkable, vocab.size, samples)
    one.failures[:0] = [why for why in unplanned if why]
    if not walkable:
        return LibraryRun(lib.name, setup, compiled, one, Steps())
    n_steps = batch_steps or samples * max(len(c.walk) for c in walkable)
    return LibraryRun(lib.name, setup, compiled, one, batch16(lib, walkable, vocab.size, n_steps))


# ---------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Feature:
    name: str
    present: Callable[[dict[str, Any]], bool]  # true for a schema node that uses the feature
    probe: dict[str, Any]  # the smallest schema that uses it


def _prop(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"x": schema}, "required": ["x"], "additionalProperties": False}


def _has_format(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda node: node.get("format") == name


def _tagged(node: dict[str, Any]) -> bool:
    return any("const" in p for p in node.get("properties", {}).values())


def _is_object(node: Any) -> bool:
    return isinstance(node, dict) and (node.get("type") == "object" or "$ref" in node)


FEATURES: tuple[Feature, ...] = (
    Feature("nested object", lambda n: n.get("type") == "object" and any(
        _is_object(p) for p in n.get("properties", {}).values()), _prop(_prop({"type": "integer"}))),
    Feature("array of objects", lambda n: n.get("type") == "array" and _is_object(n.get("items")),
            _prop({"type": "array", "items": _prop({"type": "integer"}), "maxItems": 3})),
    Feature("required", lambda n: "required" in n, _prop({"type": "integer"})),
    Feature("additionalProperties: false", lambda n: n.get("additionalProperties") is False,
            _prop({"type": "integer"})),
    Feature("patternProperties + maxProperties", lambda n: "patternProperties" in n, _prop({
        "type": "object", "patternProperties": {"^[a-z]{1,8}$": {"type": "boolean"}},
        "additionalProperties": False, "maxProperties": 4})),
    Feature("enum", lambda n: "enum" in n, _prop({"enum": ["a", "b", 3]})),
    Feature("const", lambda n: "const" in n, _prop({"const": "fixed"})),
    Feature("anyOf", lambda n: "anyOf" in n, _prop({"anyOf": [{"type": "null"}, {"type": "integer"}]})),
    Feature("oneOf, objects told apart by a const", lambda n: any(_tagged(b) for b in n.get("oneOf", [])),
            _prop({"oneOf": [_prop({"const": "a"}), _prop({"const": "b"})]})),
    Feature("oneOf, null or an object", lambda n: {"type": "null"} in n.get("oneOf", []), _prop({"oneOf": [
        {"type": "null"}, _prop({"type": "integer"})]})),
    Feature("type list (nullable)", lambda n: isinstance(n.get("type"), list), _prop({"type": ["integer", "null"]})),
    Feature("$ref + $defs", lambda n: "$defs" in n,
            {"$defs": {"a": {"type": "integer"}}, **_prop({"$ref": "#/$defs/a"})}),
    Feature("$ref + definitions", lambda n: "definitions" in n,
            {"definitions": {"a": {"type": "integer"}}, **_prop({"$ref": "#/definitions/a"})}),
    Feature("string minLength/maxLength", lambda n: "maxLength" in n and "format" not in n,
            _prop({"type": "string", "minLength": 1, "maxLength": 20})),
    Feature("pattern", lambda n: "pattern" in n, _prop({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,5}$"})),
    Feature("pattern + maxLength", lambda n: "pattern" in n and "maxLength" in n,
            _prop({"type": "string", "pattern": "^[a-z]+(\\.[a-z]+)*$", "maxLength": 30})),
    Feature("format: date", _has_format("date"), _prop({"type": "string", "format": "date"})),
    Feature("format: date-time", _has_format("date-time"), _prop({"type": "string", "format": "date-time"})),
    Feature("format: uuid", _has_format("uuid"), _prop({"type": "string", "format": "uuid"})),
    Feature("format: email", _has_format("email"), _prop({"type": "string", "format": "email"})),
    Feature("format: uri", _has_format("uri"), _prop({"type": "string", "format": "uri"})),
    Feature("format: hostname", _has_format("hostname"), _prop({"type": "string", "format": "hostname"})),
    Feature("format + maxLength", lambda n: "format" in n and "maxLength" in n,
            _prop({"type": "string", "format": "email", "maxLength": 40})),
    Feature("integer minimum/maximum", lambda n: n.get("type") == "integer" and "maximum" in n,
            _prop({"type": "integer", "minimum": -5, "maximum": 300})),
    Feature("number minimum/maximum", lambda n: n.get("type") == "number" and "maximum" in n,
            _prop({"type": "number", "minimum": -90, "maximum": 90})),
    Feature("exclusiveMinimum", lambda n: "exclusiveMinimum" in n, _prop({"type": "number", "exclusiveMinimum": 0})),
    Feature("number multipleOf", lambda n: n.get("type") == "number" and "multipleOf" in n,
            _prop({"type": "number", "multipleOf": 0.01})),
    Feature("array minItems/maxItems", lambda n: "maxItems" in n,
            _prop({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4})),
    Feature("prefixItems + items: false", lambda n: "prefixItems" in n, _prop({
        "type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}], "items": False})),
)


def nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every subschema (and some plain mappings such as `properties`, which no feature matches)."""
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from nodes(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from nodes(value)


def feature_users(schemas: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        f.name: [s["name"] for s in schemas if any(f.present(n) for n in nodes(s["schema"]))] for f in FEATURES
    }


def verdict_cell(compilation: Compilation) -> str:
    if compilation.error is not None:
        return f"rejected: {short(compilation.error)}"
    if compilation.warnings:
        return f"accepted, with warning: {short(compilation.warnings[0].split('Warning:')[-1])}"
    return "accepted"


def probe_features(vocab: Vocabulary, threads: int, used: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    cells: dict[str, dict[str, str]] = {}
    for make in LIBRARIES:
        lib = make(vocab, threads)
        for feature in FEATURES:
            if used[feature.name]:
                compilation = lib.compile(json.dumps(feature.probe))
                cells.setdefault(feature.name, {})[lib.name] = verdict_cell(compilation)
    return cells


# ---------------------------------------------------------------------------------------------- report


def short(text: str, limit: int = ERROR_CHARS) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quantile(values: list[float], q: float) -> float:
    """Nearest rank: deterministic, and the max when there are few values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def us(values: list[float]) -> str:
    # The mean too: rare slow steps (p99) can cost more in all than the many fast ones.
    if not values:
        return "–"
    return f"{quantile(values, 0.5):.0f} / {statistics.fmean(values):.0f} / {quantile(values, 0.99):.0f}"


def summary_rows(runs: list[LibraryRun]) -> list[tuple[str, list[str]]]:
    def compile_stat(run: LibraryRun, attr: str) -> str:
        values = [getattr(c, attr) for c in run.compiled if c.error is None]
        return f"{ms(quantile(values, 0.5))} / {ms(quantile(values, 0.99))} / {ms(max(values))}" if values else "–"

    return [
        ("tokenizer setup, ms", [ms(r.setup_seconds) for r in runs]),
        ("compile, ms: p50 / p99 / max", [compile_stat(r, "seconds") for r in runs]),
        ("compile + first mask, ms: p50 / p99 / max", [compile_stat(r, "ready_seconds") for r in runs]),
        ("schemas that fail to compile", [str(sum(c.error is not None for c in r.compiled)) for r in runs]),
        ("mask, batch 1, µs a step: p50 / mean / p99", [us(r.batch1.mask_us) for r in runs]),
        ("commit, batch 1, µs a token: p50 / mean / p99", [us(r.batch1.commit_us) for r in runs]),
        (f"mask, batch {BATCH}, µs a step: p50 / mean / p99", [us(r.batch16.mask_us) for r in runs]),
        (f"commit, batch {BATCH}, µs a step: p50 / mean / p99", [us(r.batch16.commit_us) for r in runs]),
        ("steps timed, batch 1 / batch 16", [f"{len(r.batch1.mask_us)} / {len(r.batch16.mask_us)}" for r in runs]),
        ("BPE tokens the mask ruled out (walk re-tokenized)", [str(sum(c.retokenized for c in r.compiled))
                                                              for r in runs]),
        ("walk failures", [str(len(r.batch1.failures) + len(r.batch16.failures)) for r in runs]),
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def compile_cell(c: Compiled) -> str:
    return f"fails: {short(c.error)}" if c.error is not None else ms(c.seconds)


def walk_cell(c: Compiled) -> str:
    if not c.walk:
        return "–"
    return f"{len(c.walk)} ({c.retokenized} re-tokenized)" if c.retokenized else str(len(c.walk))


def note_cell(c: Compiled) -> str:
    return "; ".join(short(w.split("Warning:")[-1], 70) for w in dict.fromkeys(c.warnings)) or ""


def model_section(vocab: Vocabulary, cases: list[Case], runs: list[LibraryRun]) -> list[str]:
    lines = [f"## {vocab.name} (mask width {vocab.size} tokens)", ""]
    lines += table(["", *(r.library for r in runs)], [[name, *cells] for name, cells in summary_rows(runs)])
    lines += ["", "Per schema: the walk's tokens (BPE, then as each library let it go, with EOS), compile ms "
              "(median), and what a library said while accepting the schema.", ""]
    names = [r.library for r in runs]
    header = ["schema", "BPE tokens", *(f"{n} walk" for n in names), *(f"{n} compile" for n in names),
              *(f"{n} notes" for n in names)]
    rows = []
    for i, case in enumerate(cases):
        per_lib = [r.compiled[i] for r in runs]
        rows.append([case.name, str(len(case.tokens)), *map(walk_cell, per_lib), *map(compile_cell, per_lib),
                     *map(note_cell, per_lib)])
    lines += table(header, rows)
    failures = [f"{r.library}: {f}" for r in runs for f in dict.fromkeys(r.batch1.failures + r.batch16.failures)]
    if failures:
        lines += ["", "Walk failures (a valid token masked out or rejected):", ""] + [f"- {f}" for f in failures]
    return lines + [""]


def feature_section(model: str, used: dict[str, list[str]], cells: dict[str, dict[str, str]]) -> list[str]:
    names = [make.name for make in LIBRARIES]
    rows = [[f.name, str(len(used[f.name])), *(cells[f.name][n] for n in names)] for f in FEATURES if used[f.name]]
    intro = f"## Features of the schemas, each probed alone ({model}'s tokenizer)"
    return [intro, "", *table(["feature", "schemas using it", *names], rows), ""]


def header_lines(threads: int, samples: int, n_cases: int) -> list[str]:
    from importlib.metadata import version

    return [
        "# Grammar libraries on this CPU",
        "",
        f"llguidance {version('llguidance')}, xgrammar {version('xgrammar')}; {isa.describe()}, "
        f"{threads} threads for each library's compile and batch work; {n_cases} schemas, samples: {samples}.",
        "Compact JSON for both (llguidance `whitespace_flexible: False`; xgrammar `any_whitespace=False`, "
        "separators `,` `:`). Compile: median over the samples per schema, then p50/p99/max over schemas. "
        "Mask: one fill of the next-token bitmask; at batch 16 one fill of all 16 rows.",
        "",
    ]


def measure(
    models: Sequence[str] = DEFAULT_MODELS, samples: int = 5, limit: int | None = None,
    batch_steps: int | None = None, threads: int | None = None,
) -> str:
    """The markdown report: `limit` keeps the first schemas only, `batch_steps` caps the batch-16 steps."""
    threads = threads or os.cpu_count() or 1
    schemas = load_structured_schemas()[:limit]
    check_instances(schemas)
    used = feature_users(schemas)
    lines = header_lines(threads, samples, len(schemas))
    features: list[str] = []
    for model in models:
        vocab = load_vocabulary(model)
        cases = make_cases(schemas, vocab)
        runs = [run_library(make, vocab, cases, samples, threads, batch_steps) for make in LIBRARIES]
        lines += model_section(vocab, cases, runs)
        if model == models[0]:
            # Features do not depend on the tokenizer: probing them once is enough.
            features = feature_section(model, used, probe_features(vocab, threads, used))
    return "\n".join(lines + features)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="registry names or GGUF paths")
    parser.add_argument("--samples", type=int, default=5, help="compiles and walks per schema")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SCHEMAS} schemas, one sample, few steps")
    args = parser.parse_args(argv)
    if args.quick:
        print(measure(args.models, samples=1, limit=QUICK_SCHEMAS, batch_steps=QUICK_BATCH_STEPS))
    else:
        print(measure(args.models, samples=args.samples))


if __name__ == "__main__":
    main()
