"""Constrained generation on the tiny model: masks agree with llguidance's own matcher, outputs always match
their constraint, jump-forward, batches mixing constraints, and the errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

from seriatim import SamplingParams
from seriatim.errors import ParameterError
from seriatim.grammar.constraint import Constraint
from seriatim.grammar.state import token_bitmask, unpack
from seriatim.sampling import SamplingState, process_logits


def allowed_tokens(states, vocab: int) -> torch.Tensor:
    return unpack(token_bitmask(states), vocab)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "format": "email", "maxLength": 20},
        "tags": {"type": "array", "items": {"enum": ["admin", "staff", "guest"]}, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                          "required": ["city", "zip"], "additionalProperties": False}},
}
REGEX = r"[A-Z][a-z]{1,6} [0-9]{2,4}(-[a-z]+)?"
CHOICES = ["positive", "negative", "neutral, or mixed"]
GBNF = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c]+ | "nil"'


def test_masks_are_what_llguidance_accepts(tiny_llm):
    """Along random walks through the schema, a token is in the mask exactly when the matcher consumes it."""
    compiler, vocab = tiny_llm.engine.grammars, tiny_llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for walk in range(4):
        state = compiler.state(Constraint.of("json_schema", PERSON))
        for _ in range(25):
            allowed = allowed_tokens([state], vocab)[0]
            for token in torch.randint(0, vocab, (40,), generator=g).tolist() + allowed.nonzero()[:20, 0].tolist():
                trial = state.matcher.deep_copy()
                assert trial.consume_token(token) == bool(allowed[token]), (walk, token)
            choices = allowed.nonzero()[:, 0]
            if not len(choices):
                break
            state.accept(int(choices[torch.randint(len(choices), (1,), generator=g)]))


def test_the_processed_distribution_is_the_masked_one(tiny_llm):
    vocab = tiny_llm.config.vocab_size
    params = SamplingParams(temperature=0.7, regex=REGEX)
    state = SamplingState(params, [1, 2], vocab, "cpu", tiny_llm.engine.grammars.state(params.constraint))
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1))
    allowed = allowed_tokens([state.grammar], vocab)[0]
    expected = (logits / 0.7).masked_fill(~allowed, -torch.inf).log_softmax(-1)
    assert torch.allclose(process_logits(logits, state), expected, atol=1e-6)
    assert 0 < allowed.sum() < vocab


def _valid(params: SamplingParams, text: str) -> bool:
    if params.json_schema is not None:
        jsonschema.validate(json.loads(text), params.json_schema, format_checker=jsonschema.FormatChecker())
        return True
    if params.json_object:
        return isinstance(json.loads(text), dict)
    if params.regex is not None:
        return re.fullmatch(REGEX, text) is not None
    if params.choice is not None:
        return text in CHOICES
    return re.fullmatch(r"\((?:[a-c]+|nil)(?:,(?:[a-c]+|nil))*\)", text) is not None


CONSTRAINTS = [dict(json_schema=PERSON), dict(json_object=True), dict(regex=REGEX), dict(choice=CHOICES),
               dict(grammar=GBNF)]


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: next(iter(c)))
def test_sampled_outputs_always_match(tiny_llm, constraint):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, **constraint) for s in range(8)]
    for p, out in zip(params, tiny_llm.generate(["Reply: "] * len(params), params)):
        assert out.finish_reason == "stop", out.text
        assert _valid(p, out.text), out.text


def test_a_batch_mixes_constraints_and_plain_requests(tiny_llm):
    prompts = ["one", "two", "three", "four"]
    bounded = [dict(json_schema=PERSON), dict(regex=REGEX), dict(choice=CHOICES)]
    params = [SamplingParams(temperature=0, max_tokens=200, **c) for c in bounded]
    params.append(SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    together = tiny_llm.generate(prompts, params)
    alone = [tiny_llm.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(_valid(p, o.text) for p, o in zip(params[:3], together))


def test_forced_tokens_are_appended_without_sampling(tiny_llm):
    """Jump-forward: the schema's fixed keys and punctuation cost no sampling step; a request that wants
    logprobs samples every token instead, so each has its logprob."""
    stats = tiny_llm.engine.stats
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=200, json_schema=PERSON)
    before, steps = stats.forced_tokens, stats.steps
    out = tiny_llm.generate("x", params)[0]
    forced = stats.forced_tokens - before
    assert forced >= 20  # the keys alone are over 40 tokens of this tiny vocabulary
    assert stats.steps - steps < len(out.token_ids)
    before = stats.forced_tokens
    with_lp = tiny_llm.generate("x", SamplingParams(temperature=1.0, seed=3, max_tokens=200, json_schema=PERSON,
                                                    logprobs=2))[0]
    assert stats.forced_tokens == before
    assert len(with_lp.logprobs) == len(with_lp.token_ids) and _valid(params, with_lp.text)


@pytest.mark.parametrize("grammar", ['start: / +/ / +/ "x"', "start: /a+/ /a+/"])
def test_a_grammar_whose_forced_text_never_ends_does_not_hold_the_engine(tiny_llama, grammar):
    """After its first byte, each grammar allows one byte only, for ever (the first greedy lexeme never lets the
    second begin): jump-forward would never return, inside a call that holds the GIL, so the request runs in a
    child process with a deadline. Written grammars are generated a masked token at a time and end by length."""
    code = ("import sys; from seriatim import LLM, SamplingParams; "
            f"llm = LLM({str(tiny_llama[0] / 'hf')!r}, dtype='float32'); "
            "out = llm.generate('x', SamplingParams(temperature=0, max_tokens=6, grammar=sys.argv[1]))[0]; "
            "print(out.finish_reason, len(out.token_ids), repr(out.text))")
    run = subprocess.run([sys.executable, "-c", code, grammar], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    reason, count, text = run.stdout.split(maxsplit=2)
    assert (reason, count) == ("length", "6") and set(eval(text)) == {grammar[8]}


def test_seeded_constrained_requests_reproduce_and_stream_alike(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=200, json_schema=PERSON)
    first, again = (tiny_llm.generate("seed", params)[0] for _ in range(2))
    deltas = list(tiny_llm.stream("seed", params))
    assert first.token_ids == again.token_ids == [t for d in deltas for t in d.token_ids]
    assert "".join(d.text for d in deltas) == first.text


def test_compiled_grammars_are_cached(tiny_llm):
    compiler = tiny_llm.engine.grammars
    schema = {"type": "object", "properties": {"cached": {"type": "boolean"}}, "required": ["cached"]}
    before = compiler.compiled
    for _ in range(3):
        tiny_llm.generate("c", SamplingParams(temperature=0, max_tokens=20, json_schema=json.dumps(schema)))
    assert compiler.compiled == before + 1


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(regex="(("), "regex", "regex"),
    (dict(grammar="start: undefined_rule"), "grammar", "undefined_rule"),
    (dict(grammar="root ::= x\nitem"), "grammar", "Expected ::= at line 2"),  # GBNF that does not translate
    (dict(json_schema={"type": "nonsense"}), "json_schema", "nonsense"),
    (dict(json_schema="{not json"), "json_schema", "not valid JSON"),
    (dict(json_schema=[1]), "json_schema", "JSON object"),
    (dict(choice=[]), "choice", "non-empty list"),
    (dict(choice="yes"), "choice", "non-empty list"),
    (dict(choice=["ok", ""]), "choice", "non-empty string"),
    (dict(regex=""), "regex", "non-empty string"),
    (dict(json_object="yes"), "json_object", "bool"),
    (dict(regex="a+", choice=["a"]), "choice", "one constraint per request"),
    (dict(regex="a+", ignore_eos=True), "ignore_eos", "ignore_eos cannot be combined"),
])
def test_bad_constraints_name_the_problem(tiny_llm, kwargs, param, message):
    with pytest.raises(ParameterError, match=message) as e:
        tiny_llm.generate("x", SamplingParams(**kwargs))
    assert e.value.param == param
    assert not tiny_llm.engine.has_unfinished()


def test_generate_takes_one_params_per_prompt_or_says_why(tiny_llm):
    with pytest.raises(ParameterError, match="2 SamplingParams for 3 prompts"):
        tiny_llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])
    with pytest.raises(ParameterError, match=r"params\[1\] is a dict"):
        tiny_llm.generate(["a", "b"], [SamplingParams(), {"temperature": 0}])
    outs = tiny_llm.generate(["a", "b"], [SamplingParams(max_tokens=2, ignore_eos=True),
                                          SamplingParams(max_tokens=5, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [2, 5]


def test_kernel_and_tensor_op_masks_give_the_same_tokens(tiny_llm, tier):
    """Constrained sampling through seriatim's bitmask kernel (tier avx512 and up) and through tensor ops (the
    tiers below, and CUDA): the same tokens, draw for draw."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, json_schema=PERSON) for s in range(3)]
    runs = []
    for name in (None, "none"):
        tier(name)
        runs.append([o.token_ids for o in tiny_llm.generate(["k"] * 3, params)])
    assert runs[0] == runs[1]


def test_logprobs_stay_the_models_raw_ones(tiny_llm):
    """A constrained request's logprobs are the model's, before the mask: the same as scoring the text."""
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=200, json_schema=PERSON, logprobs=3)
    prompt = tiny_llm.tokenizer.encode("raw")
    out = tiny_llm.generate(prompt, params)[0]
    scored = tiny_llm.prompt_logprobs(prompt + out.token_ids)[len(prompt):]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert torch.allclose(torch.tensor([lp.logprob for lp in out.logprobs]),
                          torch.tensor([s.logprob for s in scored]), atol=1e-4)
    assert sum(lp.logprob for lp in out.logprobs) < 0


# Compiles, but after its first token ("a") llguidance's next Earley row would hold 2,500 items, past its
# limit of 2,000: it gives up mid-generation.
GIVES_UP = "start: x+\nx: " + " | ".join(f'"a{i}"' for i in range(2500))


def test_a_grammar_llguidance_gives_up_on_ends_its_request_alone(tiny_llm):
    params = [SamplingParams(temperature=0, max_tokens=8, grammar=GIVES_UP),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    failed, plain = tiny_llm.generate(["one", "two"], params)
    assert failed.finish_reason == "error" and failed.token_ids == [] and failed.text == ""
    assert failed.error.startswith("llguidance gave up on it at token ") and "items; max is 2000" in failed.error
    assert plain.finish_reason == "length" and plain.token_ids == tiny_llm.generate("two", params[1])[0].token_ids
    assert not tiny_llm.engine.has_unfinished()
