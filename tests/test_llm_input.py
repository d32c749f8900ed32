"""The Python API's bad input: typed ValueErrors (`ParameterError`) that name the parameter, never a TypeError
from deep inside; and the inputs it accepts as the server does (text parts in chat messages)."""

from __future__ import annotations

import pytest

from seriatim import SamplingParams
from seriatim.errors import ParameterError, PromptTooLong

PARAMS = SamplingParams(temperature=0, max_tokens=3)


@pytest.mark.parametrize("prompts, message", [
    (["ok", None], "prompt 1 is a NoneType: each prompt is a string or a list of token ids"),
    (["ok", 5], "prompt 1 is a int: each prompt is a string or a list of token ids"),
    ([[1, 2], [3, "x"]], "prompt 1 is a list"),
    ([], "generate\\(\\) got no prompts"),
    (None, "prompts must be a string, a list of token ids, or a list of those, got NoneType"),
    ([[]], "prompt is empty"),
    ([[1, True]], "prompt 0 is a list"),
])
def test_generate_refuses_what_is_no_prompt(tiny_llm, prompts, message):
    with pytest.raises(ParameterError, match=message) as info:
        tiny_llm.generate(prompts, PARAMS)
    assert info.value.param == "prompt"
    assert not tiny_llm.engine.requests  # nothing was left queued


def test_a_prompt_over_the_context_is_prompt_too_long(tiny_llm):
    with pytest.raises(PromptTooLong, match="model's context") as info:
        tiny_llm.generate([[1] * tiny_llm.config.context_length], PARAMS)
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")


def test_sampling_errors_name_their_parameter():
    with pytest.raises(ParameterError, match="top_p must be in") as info:
        SamplingParams(top_p=2)
    assert info.value.param == "top_p" and isinstance(info.value, ValueError)


def test_chat_takes_text_parts_as_the_server_does(tiny_llm):
    as_text = tiny_llm.chat([{"role": "user", "content": "hello there"}], PARAMS)
    as_parts = tiny_llm.chat([{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                          {"type": "text", "text": "there"}]}], PARAMS)
    assert as_parts.prompt_token_ids == as_text.prompt_token_ids
    assert as_parts.token_ids == as_text.token_ids


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user"}], "message 0 \\(a user message\\) has no content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "message 0: image_url content is not supported; only text parts"),
    ([{"content": "hi"}], "message 0 must be a dict with a string 'role'"),
    ([{"role": "user", "content": 5}], "message 0: content must be a string or a list of text parts"),
    ([], "messages must be a non-empty list"),
    ("hi", "messages must be a non-empty list"),
])
def test_chat_refuses_malformed_messages(tiny_llm, messages, message):
    with pytest.raises(ParameterError, match=message) as info:
        tiny_llm.chat(messages, PARAMS)
    assert info.value.param == "messages"


def test_prompt_logprobs_score_every_token_after_the_first(tiny_llm):
    ids = [5, 9, 11, 40]
    scores = tiny_llm.prompt_logprobs(ids, top_n=2)
    assert scores[0] is None and [s.token_id for s in scores[1:]] == ids[1:]
    assert all(len(s.top) == 2 and s.logprob <= 0 for s in scores[1:])
    with pytest.raises(ParameterError, match="outside the vocabulary"):
        tiny_llm.prompt_logprobs([tiny_llm.config.vocab_size])
