"""render_chat: the same text as transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from seriatim.text.chat_template import render_chat
from seriatim.weights.gguf_file import read_gguf_metadata

# SmolLM2-135M-Instruct's template, as its GGUF stores it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Exercises what the environment provides: whitespace control, loop controls, namespace, dict, tojson,
# raise_exception, strftime_now, special tokens, tools, and keys transformers drops or adds.
FEATURES_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'skip' %}{% continue %}{% endif %}
    {% if message['role'] == 'stop' %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    <{{ message['role'] }}>{{ message['content'] }}
    {% if message.tool_calls is defined %}calls={{ message.tool_calls | tojson }}{% endif %}
    {% if message.reasoning_content is defined %}think={{ message.reasoning_content }}{% endif %}
{{ eos_token }}
{% endfor %}
{% if tools %}tools={{ tools | tojson(indent=2) }}{% endif %}
{% if tools is none %}no tools{% endif %}
{{ dict(a=1, b='<é>') | tojson }} {{ ns.count }} {{ strftime_now('%Y') }} {{ custom | default('?') }}
{% if add_generation_prompt %}<assistant>{% endif %}"""

RAISE_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}"
    "{% endif %}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 你好 🦀 \"quoted\" <tag>?\n  indented"},
    ],
    [
        {"role": "user", "content": "call it", "tool_calls": None},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": "<ü>"}}]},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "done", "reasoning": "because"},
        {"role": "stop", "content": "end"},
        {"role": "user", "content": "never shown"},
    ],
]


@pytest.fixture(scope="module")
def reference() -> Any:
    """A minimal transformers tokenizer: apply_chat_template only needs its special tokens."""
    transformers = pytest.importorskip("transformers")
    hf = HFTokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>")])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>")


def expected(reference: Any, template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    kwargs.setdefault("add_generation_prompt", True)  # render_chat's default; transformers' is False
    return reference.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, FEATURES_TEMPLATE])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(
    reference: Any, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    ours = render_chat(
        template, messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
    )
    assert ours == expected(reference, template, messages, add_generation_prompt=add_generation_prompt)


def test_extra_variables_reach_the_template(reference: Any) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <now>"}}]
    messages = CONVERSATIONS[0]
    ours = render_chat(FEATURES_TEMPLATE, messages, bos_token="<s>", eos_token="</s>", tools=tools, custom="yes")
    assert ours == expected(reference, FEATURES_TEMPLATE, messages, tools=tools, custom="yes")
    assert '"description": "Météo <now>"' in ours  # tojson neither escapes HTML nor non-ASCII


def test_undefined_special_tokens_stay_undefined() -> None:
    template = "{% if bos_token is defined %}B{% endif %}{{ messages[0]['content'] }}"
    assert render_chat(template, CONVERSATIONS[0]) == "Hi!"
    assert render_chat(template, CONVERSATIONS[0], bos_token="<s>") == "BHi!"


def test_raise_exception(reference: Any) -> None:
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat(RAISE_TEMPLATE, good) == expected(reference, RAISE_TEMPLATE, good) == "[a][b]"
    bad = [{"role": "assistant", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must start with a user turn"):
        render_chat(RAISE_TEMPLATE, bad)
    with pytest.raises(jinja2.TemplateError, match="must start with a user turn"):
        expected(reference, RAISE_TEMPLATE, bad)


def test_missing_template_or_messages() -> None:
    for template in (None, ""):
        with pytest.raises(ValueError, match="no chat template"):
            render_chat(template, CONVERSATIONS[0])
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat(SMOLLM2_TEMPLATE, [])


def test_the_sandbox_holds() -> None:
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.__class__.__mro__ }}", CONVERSATIONS[0])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{% set ns = namespace(_x=1) %}", CONVERSATIONS[0])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.append(1) }}", CONVERSATIONS[0])  # immutable


def test_generation_tags_render_their_body() -> None:
    template = "{% for m in messages %}{% generation %}<{{ m['content'] }}>{% endgeneration %}{% endfor %}"
    assert render_chat(template, CONVERSATIONS[0]) == "<Hi!>"


def test_templates_compile_once() -> None:
    from seriatim.text.chat_template import _compile

    template = "{{ messages | length }} {{ add_generation_prompt }}"
    render_chat(template, CONVERSATIONS[0])
    hits = _compile.cache_info().hits
    assert render_chat(template, CONVERSATIONS[1], add_generation_prompt=False) == "4 False"
    assert _compile.cache_info().hits == hits + 1


@pytest.mark.real_model
def test_smollm2_gguf_template(reference: Any, smollm2_gguf_path: Path) -> None:
    template = read_gguf_metadata(smollm2_gguf_path)["tokenizer.chat_template"]
    assert template == SMOLLM2_TEMPLATE
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt)
            assert ours == expected(reference, template, messages, add_generation_prompt=add_generation_prompt)
