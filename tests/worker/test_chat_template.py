"""Chat templates render like llama-cpp-python's formatter; bad input and bad templates are typed errors."""

from __future__ import annotations

import copy
import datetime

import llama_cpp as L
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from erllama.models import default_model_path
from erllama.protocol import ErllamaError
from erllama.worker.chat_template import (
    MAX_MESSAGES,
    ChatTemplate,
    render_chat,
    validate_tools,
)

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word, with «quotes» and ünïcode."},
]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS_AWARE = (
    "{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
PLAIN = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def smol() -> dict[str, str]:
    """The default model's own template (GGUF ``tokenizer.chat_template``) and BOS/EOS texts.

    Read through llama.cpp with ``vocab_only``: the gguf package's reader parses every token
    array into Python objects and takes ~10 s for this file.
    """
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(default_model_path()).encode(), mp)
    assert model
    try:
        vocab = L.llama_model_get_vocab(model)
        return {
            "template": L.llama_model_chat_template(model, None).decode(),
            "bos": L.llama_vocab_get_text(vocab, L.llama_vocab_bos(vocab)).decode(),
            "eos": L.llama_vocab_get_text(vocab, L.llama_vocab_eos(vocab)).decode(),
        }
    finally:
        L.llama_model_free(model)


def reference(smol: dict[str, str], messages: list[dict], add_generation_prompt: bool = True) -> str:
    fmt = Jinja2ChatFormatter(smol["template"], smol["eos"], smol["bos"], add_generation_prompt)
    return fmt(messages=messages).prompt


def render(smol: dict[str, str], messages, **kw) -> str:
    kw.setdefault("system", None)
    kw.setdefault("tools", None)
    kw.setdefault("add_generation_prompt", True)
    return render_chat(smol["template"], messages, bos_token=smol["bos"], eos_token=smol["eos"], **kw)


# --- same text as llama-cpp-python ---------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_two_turn_conversation_renders_exactly_like_llama_cpp_python(smol, add_generation_prompt):
    ours = render(smol, TWO_TURNS, add_generation_prompt=add_generation_prompt)
    assert ours == reference(smol, TWO_TURNS, add_generation_prompt)
    assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_system_argument_renders_like_a_leading_system_message(smol):
    ours = render(smol, TWO_TURNS, system="Be terse.")
    assert ours == reference(smol, [{"role": "system", "content": "Be terse."}, *TWO_TURNS])
    assert "SmolLM" not in ours  # the template's default system prompt is replaced


def test_system_argument_is_merged_into_an_existing_system_message(smol):
    msgs = [{"role": "system", "content": "Speak French."}, *TWO_TURNS]
    ours = render(smol, msgs, system="Be terse.")
    assert ours == reference(smol, [{"role": "system", "content": "Be terse.\n\nSpeak French."}, *TWO_TURNS])
    assert ours.count("<|im_start|>system") == 1


def test_tools_are_listed_in_the_system_message_when_the_template_ignores_tools(smol):
    ours = render(smol, TWO_TURNS, system="Be terse.", tools=[TOOL])
    content = (
        "Be terse.\n\nAvailable tools:\n  - get_weather: Weather in a city\n"
        '    parameters: {"properties": {"city": {"type": "string"}}, "type": "object"}'
    )
    assert ours == reference(smol, [{"role": "system", "content": content}, *TWO_TURNS])


def test_tools_alone_make_a_system_message_of_their_listing(smol):
    ours = render(smol, TWO_TURNS[:1], tools=[{"name": "now", "description": "the time"}])
    assert ours.startswith("<|im_start|>system\nAvailable tools:\n  - now: the time<|im_end|>\n")


def test_a_template_that_reads_tools_gets_them_and_no_folded_listing():
    ct = ChatTemplate(TOOLS_AWARE, bos_token="<s>", eos_token="</s>")
    assert ct.uses_tools
    out = ct.render(TWO_TURNS[:1], system="sys", tools=[TOOL])
    assert out.startswith('TOOLS=[{"type": "function", "function": {"name": "get_weather"')
    assert "Available tools" not in out
    assert "[system]sys\n" in out


def test_erllama_style_tools_are_normalized_to_openai_form():
    tools = validate_tools([{"name": "f", "description": "d", "schema": {"type": "object"}}])
    assert tools == [
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    ]


def test_caller_messages_are_not_mutated_by_folding(smol):
    msgs = [{"role": "system", "content": "x"}, *TWO_TURNS]
    before = copy.deepcopy(msgs)
    render(smol, msgs, system="y", tools=[TOOL])
    assert msgs == before


def test_environment_features_of_transformers_templates_are_available():
    tpl = (
        "{{ bos_token }}{{ strftime_now('%Y') }}|{{ messages[0].content | tojson }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% generation %}gen{% endgeneration %}{{ eos_token }}"
    )
    out = render_chat(
        tpl,
        [{"role": "user", "content": "é"}, {"role": "assistant", "content": "x"}],
        system=None,
        tools=None,
        add_generation_prompt=False,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert out == f'<s>{datetime.datetime.now().year}|"é"|user|gen</s>'


def test_trim_and_lstrip_blocks_match_llama_cpp_python():
    tpl = "  {% for m in messages %}\n  {{ m.content }}\n  {% endfor %}\n"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    ours = render_chat(
        tpl, msgs, system=None, tools=None, add_generation_prompt=True, bos_token="", eos_token=""
    )
    assert ours == Jinja2ChatFormatter(tpl, "", "")(messages=msgs).prompt


# --- errors -------------------------------------------------------------------------------------------------


def code_of(fn) -> str:
    with pytest.raises(ErllamaError) as ei:
        fn()
    return ei.value.code


@pytest.mark.parametrize("template", [None, "", "   \n"])
def test_a_model_without_template_is_no_template(template):
    assert (
        code_of(
            lambda: render_chat(
                template,
                TWO_TURNS,
                system=None,
                tools=None,
                add_generation_prompt=True,
                bos_token="",
                eos_token="",
            )
        )
        == "no_template"
    )


def test_content_blocks_are_invalid_content(smol):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert code_of(lambda: render(smol, msgs)) == "invalid_content"


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"content": "x"}],
        [{"role": "", "content": "x"}],
        [{"role": 3, "content": "x"}],
        [{"role": "r" * 65, "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": "x", "weird": 1}],
        [{"role": "user", "content": "x", "name": 1}],
        [{"role": "assistant", "content": "", "tool_calls": "not a list"}],
        [{"role": "assistant", "content": "", "tool_calls": [{"f": object()}]}],
        [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1),
        [{"role": "user", "content": "x" * (9 * 1024 * 1024)}] * 2,
    ],
    ids=lambda m: repr(m)[:40],
)
def test_malformed_messages_are_invalid_params(smol, messages):
    assert code_of(lambda: render(smol, messages)) == "invalid_params"


@pytest.mark.parametrize(
    "tools",
    [
        "f",
        [1],
        [{"description": "no name"}],
        [{"name": "f", "description": 3}],
        [{"name": "f", "schema": []}],
        [{"type": "function", "function": "f"}],
    ],
)
def test_malformed_tools_are_invalid_params(smol, tools):
    assert code_of(lambda: render(smol, TWO_TURNS, tools=tools)) == "invalid_params"


def test_non_string_system_is_invalid_params(smol):
    assert code_of(lambda: render(smol, TWO_TURNS, system=["x"])) == "invalid_params"


def test_template_raise_exception_is_invalid_params_with_its_message():
    tpl = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    with pytest.raises(ErllamaError) as ei:
        render_chat(
            tpl,
            [{"role": "assistant", "content": "x"}],
            system=None,
            tools=None,
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
        )
    assert ei.value.code == "invalid_params"
    assert "first must be user" in ei.value.message


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content }",  # does not compile
        "{% if %}",
        "{{ messages[7].content.upper() }}",  # undefined attribute call at render time
        "{{ messages.append(1) }}",  # the immutable sandbox refuses mutation
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox refuses internals
        "{{ 1 // 0 }}",
        "{% for i in range(10**9) %}{% endfor %}",  # the sandbox caps range()
    ],
)
def test_broken_or_hostile_templates_are_template_failed_not_crashes(template):
    err = code_of(
        lambda: render_chat(
            template,
            TWO_TURNS,
            system=None,
            tools=None,
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
        )
    )
    assert err == "template_failed"
