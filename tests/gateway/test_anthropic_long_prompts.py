"""Long prompts through the ``anthropic`` SDK: a stream pings while its prompt is being prefilled (and only
then), and a coding agent's long system prompt, resent every turn, is restored from the cache but for the
turn's new tokens. Both run on the default model loaded with its whole 8k context (``LONG_MODEL``)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from erllama import Client
from tests.conftest import BrokerProcess
from tests.gateway.conftest import API_KEY, LONG_MODEL, SPARE_MODEL, GatewayProcess, start_gateway

GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more; the API still takes them
PING_INTERVAL_S = 1.0  # the gateway's, so that a prefill of a few seconds shows several
# ~1,400 tokens: three ticks of at most 512 prompt tokens (the worker's default prefill budget), so the
# prefilled count grows between the gateway's looks; ~10 s of prefill on 2 cores
PING_PROMPT_CHARS = 12_000
AGENT_SYSTEM_CHARS = 30_000
AGENT_TURNS = 5
COUNTING = "1, 2, 3, 4, 5, 6,"
# a random-word prompt may well make the model end its turn at once: the reply is constrained to a few
# tokens the model still chooses among, so that every turn has a reply (and a replay record)
REPLY_GRAMMAR = r'root ::= "The colour is " ("red" | "green" | "blue" | "white") "."'
QUESTION = "Name one colour."
_WORD = re.compile(r"^ [a-z]{2,}$")


@pytest.fixture(scope="module")
def longgw(gw_broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        gw_broker.endpoint,
        "--ping-interval-s",
        str(PING_INTERVAL_S),
        "--replay-dir",
        str(tmp_path_factory.mktemp("replay")),
        env={"ERLLAMA_API_KEYS": API_KEY},
    )
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def ant(longgw: GatewayProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=longgw.url, api_key=API_KEY, max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def vocabulary(gw_broker: BrokerProcess) -> list[str]:
    """The model's whole-word tokens (`` word``): text of random words, drawn from them."""
    with Client(gw_broker.endpoint, timeout_s=120) as c:
        (newline,) = c.tokenize(LONG_MODEL, "\n", add_special=False)
        n_vocab = int(c.model_info(LONG_MODEL)["model"]["n_vocab"])
        spaced = [t for i in range(n_vocab) for t in (i, newline)]
        pieces = c.detokenize(LONG_MODEL, spaced).split("\n")
    return sorted({p for p in pieces if _WORD.match(p)})


def random_words(vocabulary: list[str], n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        out.append(rng.choice(vocabulary))
        size += len(out[-1])
    return "".join(out).strip()


@pytest.fixture
def erl(gw_broker: BrokerProcess) -> Iterator[Client]:
    with Client(gw_broker.endpoint, timeout_s=120) as c:
        yield c


def raw_events(ant: anthropic.Anthropic, **body: Any) -> list[str]:
    """The names of a stream's server-sent events as they came, pings included (the SDK's parsed stream
    drops them)."""
    with ant.messages.with_streaming_response.create(stream=True, **body) as resp:
        return [sse.event or "" for sse in anthropic.Stream.raw_events(resp.http_response)]


def test_a_stream_pings_while_its_long_prompt_is_prefilled_and_stops_at_the_first_token(
    ant: anthropic.Anthropic, vocabulary: list[str]
):
    names = raw_events(
        ant,
        model=LONG_MODEL,
        system=random_words(vocabulary, PING_PROMPT_CHARS, seed=1),
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        extra_body={**GREEDY, "grammar": REPLY_GRAMMAR},
    )
    first_block = names.index("content_block_start")
    assert names[0] == "message_start"
    assert names[1:first_block] and set(names[1:first_block]) == {"ping"}
    assert "ping" not in names[first_block:]
    assert names[-2:] == ["message_delta", "message_stop"]


def test_a_short_prompt_answered_at_once_gets_no_ping(ant: anthropic.Anthropic):
    names = raw_events(
        ant,
        model=LONG_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=4,
        extra_body=GREEDY,
    )
    assert "ping" not in names
    assert names[:2] == ["message_start", "content_block_start"]


def test_a_stream_waiting_behind_a_reply_being_generated_gets_no_ping(ant: anthropic.Anthropic, erl: Client):
    """The spare model's one sequence generates another request's reply (no prompt is being prefilled):
    the waiting stream gets nothing until its own first token."""
    running = erl.infer(SPARE_MODEL, COUNTING, max_tokens=400)
    next(iter(running))  # it holds the spare model's only sequence, generating
    try:
        names = raw_events(
            ant,
            model=SPARE_MODEL,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=2,
            extra_body=GREEDY,
        )
    finally:
        running.cancel()
        running.collect()
    assert "ping" not in names
    assert names[:2] == ["message_start", "content_block_start"]


def test_a_30k_character_system_prompt_resent_over_five_turns_restores_all_but_each_new_turn(
    ant: anthropic.Anthropic, vocabulary: list[str]
):
    """A coding agent's shape: one long system prompt, the whole conversation resent every turn. Turn k's
    prompt is turn k-1's record (its prompt and the tokens sampled for it, replayed exactly) followed by
    the new turn (the end of the previous reply's turn, the new user message, the assistant header). The
    cache holds turn k-1's record but its last token (sampled, never decoded, so never in the KV), so turn
    k restores at least ``len(record) - 1`` tokens: all but the new turn's and that one."""
    system = random_words(vocabulary, AGENT_SYSTEM_CHARS, seed=16)
    messages: list[dict[str, Any]] = []
    record = 0  # the previous turn's prompt + reply, in tokens
    for k in range(1, AGENT_TURNS + 1):
        messages.append({"role": "user", "content": f"Question {k}: {QUESTION}"})
        prompt = ant.messages.count_tokens(model=LONG_MODEL, system=system, messages=messages).input_tokens
        raw = ant.messages.with_raw_response.create(
            model=LONG_MODEL,
            system=system,
            messages=messages,
            max_tokens=16,
            extra_body={**GREEDY, "grammar": REPLY_GRAMMAR},
        )
        r = raw.parse()
        if k > 1:
            assert int(raw.headers["x-erllama-replayed-tokens"]) == record
            assert record - 1 <= r.usage.cache_read_input_tokens < prompt, (k, prompt, record, r.usage)
        record = prompt + r.usage.output_tokens
        messages.append({"role": "assistant", "content": [b.model_dump() for b in r.content]})
