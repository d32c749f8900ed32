"""End-to-end generation behaviour on the tiny model: streaming, stops, seeds, limits, logprobs."""

from __future__ import annotations

import pytest
import torch

from seriatim import SamplingParams


def prompt_ids(llm, n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_stream_concatenates_to_generate(tiny_llm):
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=40, ignore_eos=True)
    prompt = "The quick brown fox"
    deltas = list(tiny_llm.stream(prompt, params))
    whole = tiny_llm.generate(prompt, params)[0]
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_streams_read_interleaved_each_get_their_own_tokens(tiny_llm):
    """Two open streams, and a generate() while a stream is paused: each caller gets exactly its own
    request's deltas (a step's deltas for the others are kept for them), and nothing hangs."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [prompt_ids(tiny_llm, n, n) for n in (5, 9, 7)]
    alone = [tiny_llm.generate(p, params)[0].token_ids for p in prompts]
    a, b = tiny_llm.stream(prompts[0], params), tiny_llm.stream(prompts[1], params)
    first = next(a).token_ids
    together = tiny_llm.generate(prompts[2], params)[0].token_ids  # runs a's request to its end meanwhile
    got_b = [t for d in b for t in d.token_ids]
    got_a = first + [t for d in a for t in d.token_ids]
    assert [got_a, got_b, together] == alone
    assert not tiny_llm.engine.has_unfinished() and not tiny_llm._outbox


def test_a_stream_left_early_is_cancelled(tiny_llm):
    stream = tiny_llm.stream(prompt_ids(tiny_llm, 5), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    next(stream)
    stream.close()
    assert not tiny_llm.engine.has_unfinished() and not tiny_llm._outbox


def test_a_rejected_prompt_queues_none_of_its_batch(tiny_llm):
    too_long = [5] * tiny_llm.config.context_length
    with pytest.raises(ValueError, match="context"):
        tiny_llm.generate([prompt_ids(tiny_llm, 5), too_long], SamplingParams(max_tokens=4))
    assert not tiny_llm.engine.has_unfinished()
    before = tiny_llm.engine.stats.generated_tokens
    tiny_llm.generate(prompt_ids(tiny_llm, 5), SamplingParams(max_tokens=3, ignore_eos=True))
    assert tiny_llm.engine.stats.generated_tokens - before == 3


def test_seed_reproducible_and_seeds_differ(tiny_llm):
    p = prompt_ids(tiny_llm, 6)
    runs = [tiny_llm.generate(p, SamplingParams(temperature=1.0, seed=s, max_tokens=20, ignore_eos=True))[0]
            for s in (1, 1, 2)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids


def test_seeded_tokens_do_not_depend_on_the_batch(tiny_llm):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=15, ignore_eos=True) for s in range(3)]
    prompts = [prompt_ids(tiny_llm, n, n) for n in (4, 11, 7)]
    alone = [tiny_llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    ids = [tiny_llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    together = {}
    while tiny_llm.engine.has_unfinished():
        for delta, seq in tiny_llm.engine.step():
            if delta.finish_reason:
                together[delta.request_id] = seq.output_ids
    assert [together[i] for i in ids] == alone


def test_stop_string_across_token_boundary(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = prompt_ids(tiny_llm, 5)
    full = tiny_llm.generate(prompt, params)[0]
    # Pick a stop string that straddles the boundary between two generated tokens.
    pieces = [tiny_llm.tokenizer.decode([t]) for t in full.token_ids]
    k = next(i for i in range(3, len(pieces))
             if pieces[i - 1] and pieces[i] and full.text.count(pieces[i - 1] + pieces[i][0]) == 1)
    stop = pieces[k - 1] + pieces[k][0]
    start = full.text.index(stop)
    stopped = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:start]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop)
    deltas = [d.text for d in tiny_llm.stream(prompt, params)]
    assert "".join(deltas) == full.text[:start]


def test_eos_stops_generation(tiny_llm):
    eos = min(tiny_llm.tokenizer.eos_token_ids)
    params = SamplingParams(temperature=0, max_tokens=30, logit_bias={eos: 100})
    out = tiny_llm.generate(prompt_ids(tiny_llm, 5), params)[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    ignored = tiny_llm.generate(prompt_ids(tiny_llm, 5),
                                SamplingParams(temperature=0, max_tokens=5, logit_bias={eos: 100}, ignore_eos=True))[0]
    assert ignored.token_ids == [eos] * 5 and ignored.finish_reason == "length"


def test_context_length_ends_generation(tiny_llm):
    ctx = tiny_llm.config.context_length
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    out = tiny_llm.generate(prompt_ids(tiny_llm, ctx - 3), params)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_prompt_over_context_is_rejected(tiny_llm):
    with pytest.raises(ValueError, match="context"):
        tiny_llm.generate(prompt_ids(tiny_llm, tiny_llm.config.context_length), SamplingParams())
    assert not tiny_llm.engine.has_unfinished()


@pytest.mark.parametrize("prompt", [[[]], [10**6], [-1]])
def test_bad_token_prompts_are_rejected(tiny_llm, prompt):
    with pytest.raises(ValueError):
        tiny_llm.generate(prompt, SamplingParams())


def test_logprobs_are_raw_model_logprobs(tiny_llm):
    prompt = prompt_ids(tiny_llm, 6)
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    with torch.inference_mode():
        from support.parity import run_chunks

        logits = run_chunks(tiny_llm, prompt + out.token_ids, [len(prompt), 1, 1])
    for step, lp in enumerate(out.logprobs):
        ref = torch.log_softmax(logits[len(prompt) - 1 + step], -1)
        assert lp.token_id == out.token_ids[step]
        assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref.topk(4).indices.tolist()


def test_multibyte_characters_never_split_in_stream(tiny_llm):
    # Random sampling over a byte-level vocabulary emits lone bytes of multi-byte characters.
    text = ""
    for seed in range(4):
        params = SamplingParams(temperature=1.5, seed=seed, max_tokens=60, ignore_eos=True)
        deltas = list(tiny_llm.stream("你好，世界！😀", params))
        joined = "".join(d.text for d in deltas)
        assert joined == tiny_llm.generate("你好，世界！😀", params)[0].text
        for d in deltas[:-1]:
            assert not d.text.endswith("\ufffd")
        text += joined
    assert any(ord(c) > 127 for c in text)  # the check above saw multi-byte characters


def test_chat_uses_the_template(tiny_llm):
    ids = tiny_llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert tiny_llm.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = tiny_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4))
    assert out.prompt_token_ids == ids


def test_request_metrics_time_every_token(tiny_llm):
    outs = tiny_llm.generate(["a b", "c d e"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for out in outs:
        m = out.metrics
        assert m.output_tokens == 6 and m.arrival <= m.scheduled <= m.first_token <= m.last_token <= m.finished
        assert m.inter_token_latency == pytest.approx((m.last_token - m.first_token) / 5)
        assert 0 < m.inter_token_latency <= m.max_inter_token


def test_held_back_text_that_completes_a_stop_at_the_length_limit_finishes_as_stop(tiny_llm):
    """The last allowed token leaves a character incomplete; flushed, its U+FFFD completes the stop string."""
    from seriatim.engine.sequence import Sequence
    from seriatim.sampling import SamplingState
    from seriatim.text.detokenizer import IncrementalDetokenizer

    tok = tiny_llm.tokenizer
    ids = tok.encode("aお", add_special_tokens=False)[:-1]  # "a" and part of "お"
    params = SamplingParams(max_tokens=len(ids), stop=("a\ufffd",))
    seq = Sequence(0, [5], params, SamplingState(params, [5], tiny_llm.config.vocab_size, "cpu"),
                   IncrementalDetokenizer(tok, skip_special_tokens=True), frozenset(), 100)
    deltas = [seq.append(t, None) for t in ids]
    assert [d.finish_reason for d in deltas] == [None] * (len(ids) - 1) + ["stop"]
    assert seq.text == "" and "".join(d.text for d in deltas) == ""
