"""The OpenAI API through the official ``openai`` SDK, against a real gateway, broker and default model:
each answer is the one the ``Client`` library gives for the same request."""

from __future__ import annotations

import asyncio
import json
import struct

import openai

from erllama import Client
from tests.conftest import REAL_MODEL_ID
from tests.gateway.conftest import API_KEY, GatewayProcess

MODEL = REAL_MODEL_ID
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
            "required": ["city"],
        },
    },
}


def to_float32(vector: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))


def test_chat_completion_is_the_reply_client_chat_gives(oai: openai.OpenAI, erl: Client):
    r = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=8, temperature=0)
    want = erl.chat(MODEL, CONVERSATION, max_tokens=8, temperature=0).collect()
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want.reply
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == want.stats.prompt_tokens
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL


def test_streamed_chat_has_one_id_the_role_first_the_finish_last_then_usage(oai: openai.OpenAI):
    plain = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=8, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=CONVERSATION,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last_choice, usage = chunks
    assert all(c.choices[0].finish_reason is None for c in body)
    assert last_choice.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert "".join(c.choices[0].delta.content or "" for c in body) == plain.choices[0].message.content


def test_completions_plain_and_streamed_with_text_or_token_ids(oai: openai.OpenAI, erl: Client):
    prompt = "The capital of France is"
    want = erl.complete(MODEL, prompt, max_tokens=6, temperature=0)
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == want.reply and r.choices[0].finish_reason == "length"
    ids = oai.completions.create(model=MODEL, prompt=erl.tokenize(MODEL, prompt), max_tokens=6, temperature=0)
    assert ids.choices[0].text == want.reply
    chunks = list(
        oai.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == want.reply
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_repeated_prompt_reports_the_tokens_the_cache_restored(oai: openai.OpenAI):
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig"] * 40) + "."
    first = oai.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
    again = oai.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 100
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # the rows saved are aligned to cold_align_tokens: most of the prompt, not all of it
    assert 0.75 * again.usage.prompt_tokens <= again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens


def test_a_multi_turn_chat_resent_every_turn_restores_most_of_its_prompt(oai: openai.OpenAI):
    system = "You are a patient teacher. " + " ".join(
        f"Rule {i}: answer briefly and kindly." for i in range(20)
    )
    messages = [{"role": "system", "content": system}]
    for turn, question in enumerate(["What is 2+2?", "And 3+3?", "And 4+4?", "And 5+5?"]):
        messages.append({"role": "user", "content": question})
        r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        if turn > 0:
            cached = r.usage.prompt_tokens_details.cached_tokens
            assert cached >= 0.9 * r.usage.prompt_tokens, (turn, cached, r.usage.prompt_tokens)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})


def test_a_forced_tool_call_comes_back_as_message_tool_calls(oai: openai.OpenAI):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome", "Oslo")


def test_a_streamed_tool_call_sends_index_id_and_name_then_the_arguments(oai: openai.OpenAI):
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=40,
            stream=True,
        )
    )
    deltas = [
        d
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for d in c.choices[0].delta.tool_calls
    ]
    opening, *rest = deltas
    assert opening.index == 0 and opening.id.startswith("call_") and opening.function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in rest)
    assert all(d.index == 0 and d.id is None for d in rest)
    assert set(json.loads(arguments)) == {"city"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_call_the_model_makes_on_its_own_is_read_between_its_markers(oai: openai.OpenAI):
    # tool_choice "auto": the model's own choice. llama-server's ``grammar`` extension makes that choice
    # deterministic here; the call travels as the worker's tool-call span, between the model's markers.
    call = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    grammar = 'root ::= "Let me check. <tool_call>' + call.replace('"', '\\"') + '</tool_call>"'
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL],
        max_tokens=60,
        extra_body={"grammar": grammar},
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.strip() == "Let me check."
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather" and json.loads(tool_call.function.arguments) == {
        "city": "Rome"
    }


def test_the_reasoning_of_a_thinking_model_is_reasoning_content(oai: openai.OpenAI):
    # llama-server's grammar extension makes the model "think" between its thinking markers
    grammar = 'root ::= "<think>Two plus two is four.</think> The answer is 4."'
    kwargs: dict = {
        "model": MODEL,
        "messages": CONVERSATION,
        "max_tokens": 40,
        "temperature": 0,  # greedy: the grammar's one sentence, whatever the seed
        "extra_body": {"grammar": grammar},
    }
    message = oai.chat.completions.create(**kwargs).choices[0].message
    assert message.reasoning_content == "Two plus two is four."  # type: ignore[attr-defined]
    assert message.content == " The answer is 4."
    deltas = [c.choices[0].delta for c in oai.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Two plus two is four."
    assert "".join(d.content or "" for d in deltas) == " The answer is 4."


def test_json_schema_output_parses_and_follows_the_schema(oai: openai.OpenAI):
    schema = {
        "type": "object",
        "properties": {
            "capital": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]},
            "is_large": {"type": "boolean"},
        },
        "required": ["capital", "is_large"],
    }
    r = oai.chat.completions.create(
        model=MODEL,
        messages=CONVERSATION,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        max_tokens=60,
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"capital", "is_large"}
    assert data["capital"] in ("Paris", "Lyon", "Nice") and isinstance(data["is_large"], bool)


def test_embeddings_as_floats_and_base64_equal_client_embed(oai: openai.OpenAI, erl: Client):
    texts = ["The capital of France is Paris.", "Bonjour"]
    want = [erl.embed(MODEL, t) for t in texts]
    as_float = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    as_base64 = oai.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
    assert [d.embedding for d in as_float.data] == want
    # base64 carries float32, as OpenAI's does: the same vectors rounded to float32
    assert [d.embedding for d in as_base64.data] == [to_float32(v) for v in want]
    assert [d.index for d in as_float.data] == [0, 1]
    single = oai.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert single.data[0].embedding == want[0] and single.usage.prompt_tokens > 0


def test_models_lists_the_loaded_models_and_retrieves_one(oai: openai.OpenAI):
    ids = {m.id for m in oai.models.list()}
    assert MODEL in ids
    assert oai.models.retrieve(MODEL).id == MODEL


def test_fifty_concurrent_streams_each_get_only_their_own_tokens(gateway: GatewayProcess, erl: Client):
    prompts = [f"{i} + {i} =" for i in range(50)]  # fifty different replies
    want = {p: erl.complete(MODEL, p, max_tokens=5, temperature=0).reply for p in prompts}

    async def one(c: openai.AsyncOpenAI, p: str) -> tuple[str, str]:
        stream = await c.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0, stream=True)
        return p, "".join([chunk.choices[0].text async for chunk in stream])

    async def all_streams() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0) as c:
            return list(await asyncio.gather(*(one(c, p) for p in prompts)))

    got = dict(asyncio.run(all_streams()))
    assert got == want
    assert len(set(want.values())) > 10  # the replies differ, so a mix-up would show


def test_presence_and_frequency_penalties_stop_a_greedy_reply_repeating_the_prompt(oai: openai.OpenAI):
    sentence = "The cat sat on the mat."
    prompt = " ".join([sentence] * 3)

    def reply(**penalties: float) -> str:
        r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, **penalties)
        return r.choices[0].text

    assert sentence in reply()  # greedy, the model repeats the sentence once more
    assert sentence not in reply(frequency_penalty=2.0)
    assert sentence not in reply(presence_penalty=2.0)
