"""The Anthropic Messages API through the official ``anthropic`` SDK, against a real gateway, broker and
the default model (with the tool-call and thinking markers the shared broker loads it with)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from erllama import Client
from tests.conftest import REAL_MODEL_ID, BrokerProcess, wait_for
from tests.gateway.conftest import API_KEY, SPARE_MODEL, GatewayProcess, start_gateway

MODEL = REAL_MODEL_ID
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3, 4, 5, 6,"
GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more; the API still takes them


@pytest.fixture(scope="module")
def claude(gw_broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway of this module's own: aliases, a replay directory, the signing key."""
    gw = start_gateway(
        gw_broker.endpoint,
        "--alias",
        f"claude-*={MODEL}",
        "--replay-dir",
        str(tmp_path_factory.mktemp("replay")),
        env={"ERLLAMA_API_KEYS": API_KEY, "ERLLAMA_THINKING_SIGNING_KEY": "k"},
    )
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def ant(claude: GatewayProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=claude.url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def erl(gw_broker: BrokerProcess) -> Iterator[Client]:
    with Client(gw_broker.endpoint, timeout_s=120) as c:
        yield c


def events_of(gw: GatewayProcess, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The raw SSE stream: (event name, data) pairs in order."""
    out = []
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                out.append((name, data))
    return out


def test_a_message_is_the_reply_client_chat_gives(ant: anthropic.Anthropic, erl: Client):
    r = ant.messages.create(model=MODEL, messages=HELLO, max_tokens=8, extra_body=GREEDY)
    want = erl.chat(MODEL, HELLO, max_tokens=8, temperature=0).collect()
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    (block,) = r.content
    assert block.type == "text" and block.text == want.reply
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 8
    u = r.usage
    assert (
        u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens >= want.stats.prompt_tokens
    )


def test_the_stream_is_anthropics_event_sequence_and_the_same_reply(ant: anthropic.Anthropic, claude):
    plain = ant.messages.create(model=MODEL, messages=HELLO, max_tokens=8, extra_body=GREEDY)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True}
    events = events_of(claude, body)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[1] == "content_block_start"
    assert set(names[2:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(d["index"] == 0 for n, d in events if n.startswith("content_block"))
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 8
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == plain.content[0].text
    with ant.messages.stream(model=MODEL, messages=HELLO, max_tokens=8, extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert final.content[0].text == text and final.stop_reason == "max_tokens"


THINK_GRAMMAR = r'root ::= "<think>" [a-z ]{8,40} "</think>" " The answer is " [0-9] "."'
TOOL_GRAMMAR = r'root ::= "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>"'


def test_a_streamed_thinking_block_ends_with_its_signature_then_the_text_block(claude: GatewayProcess):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 2+2? Think first."}],
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "grammar": THINK_GRAMMAR,
    }
    events = events_of(claude, body)
    blocks = [
        (n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for n, d in events
    ]
    assert blocks[1] == ("content_block_start", 0, "thinking")
    stop0 = blocks.index(("content_block_stop", 0, None))
    assert {b[2] for b in blocks[2 : stop0 - 1]} == {"thinking_delta"}
    assert blocks[stop0 - 1] == ("content_block_delta", 0, "signature_delta")
    assert blocks[stop0 + 1] == ("content_block_start", 1, "text")
    assert [b[0] for b in blocks[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_a_tool_call_the_model_makes_is_a_tool_use_block_streamed_as_input_json(claude: GatewayProcess):
    tool = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [tool],
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "grammar": TOOL_GRAMMAR,  # the model "decides" to call (tool_choice auto)
    }
    events = events_of(claude, body)
    start = next(d for n, d in events if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_time"
    assert start["content_block"]["id"].startswith("toolu_") and start["content_block"]["input"] == {}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas == [{"type": "input_json_delta", "partial_json": "{}"}]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_aliases_serve_claude_names_and_are_listed(ant: anthropic.Anthropic, claude: GatewayProcess):
    r = ant.messages.create(model="claude-sonnet-4-5", messages=HELLO, max_tokens=2, extra_body=GREEDY)
    assert r.model == "claude-sonnet-4-5" and r.usage.output_tokens == 2
    listed = httpx.get(f"{claude.url}/v1/models", headers={"x-api-key": API_KEY}).json()
    alias = next(m for m in listed["data"] if m["id"] == "claude-*")
    assert alias["alias_of"] == MODEL
    models = ant.models.list()  # the Anthropic form, asked for with anthropic-version
    assert {m.id for m in models.data} >= {MODEL, "claude-*"}


def test_count_tokens_is_the_prompt_the_request_renders(ant: anthropic.Anthropic, erl: Client):
    system = "You are terse."
    n = ant.messages.count_tokens(model=MODEL, system=system, messages=HELLO).input_tokens
    assert n == len(erl.apply_chat_template(MODEL, HELLO, system=system))
    r = ant.messages.create(model=MODEL, system=system, messages=HELLO, max_tokens=1)
    u = r.usage
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens >= n


def test_the_billing_line_is_normalised_out_of_the_system_prompt(ant: anthropic.Anthropic):
    def count(billing: str) -> int:
        system = [
            {
                "type": "text",
                "text": f"x-anthropic-billing-header: cc_version=2.0.{billing}; cch=ab{billing};",
            },
            {"type": "text", "text": "You are Claude Code."},
        ]
        return ant.messages.count_tokens(model=MODEL, system=system, messages=HELLO).input_tokens

    plain = ant.messages.count_tokens(model=MODEL, system="You are Claude Code.", messages=HELLO)
    assert count("1") == count("22") == plain.input_tokens


def test_the_claude_code_session_header_becomes_the_sticky_session(ant: anthropic.Anthropic, erl: Client):
    headers = {"X-Claude-Code-Session-Id": "3f0c1a52-session"}
    ant.messages.create(model=MODEL, messages=HELLO, max_tokens=2, extra_headers=headers, extra_body=GREEDY)
    assert erl.end_session(MODEL, "3f0c1a52-session")  # the worker held a sequence for it


# --- errors ---------------------------------------------------------------------------------------------


def test_an_image_block_is_a_400_invalid_request_error(ant: anthropic.Anthropic):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}}
    with pytest.raises(anthropic.BadRequestError) as exc:
        ant.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [image]}])
    assert exc.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": ANY_TEXT},
    }


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_TEXT: Any = _AnyText()


def test_an_unknown_model_is_a_404_not_found_error(ant: anthropic.Anthropic):
    with pytest.raises(anthropic.NotFoundError) as exc:
        ant.messages.create(model="no-such-model", max_tokens=2, messages=HELLO)
    assert exc.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_a_wrong_key_is_a_401_authentication_error(claude: GatewayProcess):
    bad = anthropic.Anthropic(base_url=claude.url, api_key="wrong", max_retries=0)
    with bad, pytest.raises(anthropic.AuthenticationError) as exc:
        bad.messages.create(model=MODEL, max_tokens=2, messages=HELLO)
    assert exc.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_a_full_queue_is_a_529_overloaded_error(ant: anthropic.Anthropic, erl: Client):
    running = erl.infer(SPARE_MODEL, COUNTING, max_tokens=400)
    next(iter(running))  # it holds the spare model's only sequence
    queued = erl.infer(SPARE_MODEL, "Hello", max_tokens=2)  # and this one its queue
    try:
        with pytest.raises(anthropic.InternalServerError) as exc:
            ant.messages.create(model=SPARE_MODEL, max_tokens=2, messages=HELLO, stream=True)
        assert exc.value.status_code == 529
        assert exc.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    finally:
        running.cancel()
        running.collect()
        queued.collect()


def test_a_worker_crash_mid_stream_is_an_error_event(ant: anthropic.Anthropic, erl: Client):
    stream = ant.messages.create(
        model=SPARE_MODEL,
        messages=[{"role": "user", "content": COUNTING}],
        max_tokens=400,
        stream=True,
        extra_body=GREEDY,  # greedy, it counts on to its 400 tokens; sampled, it may end at once
    )
    started = threading.Event()

    def kill_mid_request() -> None:
        started.wait(timeout=120)
        before = erl.model_info(SPARE_MODEL)
        wait_for(
            lambda: erl.model_info(SPARE_MODEL)["tokens_generated"] > before["tokens_generated"],
            what="tokens",
        )
        os.kill(before["worker_pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_request)
    killer.start()
    with pytest.raises(anthropic.APIStatusError) as exc:
        for _ in stream:
            started.set()
    killer.join()
    assert exc.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    wait_for(lambda: erl.model_info(SPARE_MODEL)["state"] == "ready", 120, "the spare model's restart")
