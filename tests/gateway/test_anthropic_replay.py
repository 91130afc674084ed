"""Exact replay through the ``anthropic`` SDK: an agent's turns sent back are rebuilt from the tokens the
model sampled, their KV prefix is restored, and a tampered or unknown block is rendered instead.

Each reply's record (gateway/replay.py) holds the exact tokens of its turn: the prompt, then the sampled
reply. A turn replayed exactly has a prompt that starts with the previous turn's whole record."""

from __future__ import annotations

import array
import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from erllama.transport import CACHESTORE_SOCKET_NAME, ipc_endpoint
from tests.conftest import REAL_MODEL_ID, BrokerProcess, remove_runtime, short_tmpdir, start_broker, wait_for
from tests.gateway.conftest import API_KEY, TOOL_MARKERS, GatewayProcess, start_gateway

MODEL = REAL_MODEL_ID
SIGNING_KEY = "replay-test-key"
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"],
    },
}
SYSTEM = "You are a weather assistant. " + " ".join(f"Rule {i}: be brief and exact." for i in range(30))
GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more; the API still takes them
THINK_GRAMMAR = r'root ::= "<think>" [a-z ]{8,40} "</think>" " The answer is " [0-9] "."'


class Gateway:
    """One gateway process at a time over one replay directory; ``restart`` keeps the directory."""

    def __init__(self, broker: BrokerProcess, directory: Path):
        self.broker = broker
        self.dir = directory
        self.proc = self._start()

    def _start(self) -> GatewayProcess:
        env = {"ERLLAMA_API_KEYS": API_KEY, "ERLLAMA_THINKING_SIGNING_KEY": SIGNING_KEY}
        return start_gateway(self.broker.endpoint, "--replay-dir", str(self.dir), env=env)

    def restart(self) -> None:
        self.proc.stop()
        self.proc = self._start()

    def sdk(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.proc.url, api_key=API_KEY, max_retries=0, timeout=120)

    def records(self) -> dict[Path, list[int]]:
        out = {}
        for path in self.dir.glob("*.rec"):
            record = msgspec.msgpack.decode(path.read_bytes())
            out[path] = array.array("i", record["tokens"]).tolist()
        return out


class Service(Gateway):
    """The whole service over one runtime directory: a broker, its cache store (no shm tier: rows live
    in RAM, then on disk), the model's worker and the gateway, its replay records beside the KV rows
    (``<dir>/kv`` and ``<dir>/replay``, as ``~/.cache/erllama/kv`` and ``~/.cache/erllama/replay`` by
    default). No signing key is configured: the gateway's own, kept in the replay directory, must last."""

    def __init__(self, runtime_dir: Path):
        self.runtime_dir = runtime_dir
        super().__init__(self._start_broker(), runtime_dir / "replay")

    def _start_broker(self) -> BrokerProcess:
        bp = start_broker(self.runtime_dir, "--no-default-model", "--cache-shm", "0")
        bp.client(timeout_s=120).load_model(
            MODEL, None, n_ctx=2048, n_seq_max=1, tool_call_markers=TOOL_MARKERS
        )
        return bp

    def _start(self) -> GatewayProcess:
        return start_gateway(
            self.broker.endpoint,
            "--replay-dir",
            str(self.dir),
            "--cachestore",
            ipc_endpoint(self.runtime_dir, CACHESTORE_SOCKET_NAME),
            env={"ERLLAMA_API_KEYS": API_KEY},
        )

    def processes(self) -> list[psutil.Process]:
        broker = psutil.Process(self.broker.proc.pid)
        return [psutil.Process(self.proc.proc.pid), broker, *broker.children(recursive=True)]

    def restart(self) -> None:
        """Stop every process (the broker stops its worker and cache store), then start them all again."""
        before = self.processes()
        names = {p.name() for p in before}
        assert {"erllama-worker", "erllama-cachest"} <= names and len(before) == 4, names
        self.stop()
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in before), 60)
        self.broker = self._start_broker()
        self.proc = self._start()

    def stop(self) -> None:
        self.proc.stop()
        self.broker.stop()

    def disk_hits(self) -> float:
        """Cache hits served from the disk tier, from the gateway's ``/metrics``."""
        r = httpx.get(f"{self.proc.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        return sum(
            s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
            if s.name == "erllama_cache_hits_total" and s.labels.get("tier") == "disk"
        )


@pytest.fixture(scope="module")
def gw(gw_broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(gw_broker, tmp_path_factory.mktemp("replay"))
    try:
        yield g
    finally:
        g.proc.stop()


class Turn:
    """One request's reply, the tokens of its record (prompt + sampled reply), and how many of its prompt
    tokens the gateway took from an earlier record (``x-erllama-replayed-tokens``)."""

    def __init__(self, gw: Gateway, messages: list[dict[str, Any]], **kwargs: Any):
        before = gw.records()
        with gw.sdk() as c:
            raw = c.messages.with_raw_response.create(model=MODEL, system=SYSTEM, messages=messages, **kwargs)
        self.reply = raw.parse()
        self.replayed = int(raw.headers["x-erllama-replayed-tokens"])
        after = gw.records()
        (path,) = set(after) - set(before)
        self.record = after[path]


def turn(gw: Gateway, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[Any, list[int]]:
    t = Turn(gw, messages, **kwargs)
    return t.reply, t.record


def prompt_of(r: Any) -> int:
    u = r.usage
    return int(u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens)


def test_a_three_turn_tool_conversation_is_replayed_exactly_and_restored_from_the_cache(gw: Gateway):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Rome?"}]
    call = {"type": "tool", "name": "get_weather"}
    r1, rec1 = turn(gw, messages, tools=[WEATHER], tool_choice=call, max_tokens=100, extra_body=GREEDY)
    assert r1.stop_reason == "tool_use"
    (use,) = [b for b in r1.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Rome", "Oslo")
    assert use.id.startswith("toolu_")

    messages.append({"role": "assistant", "content": [b.model_dump() for b in r1.content]})
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 degrees."}
    messages.append({"role": "user", "content": [result]})
    r2, rec2 = turn(gw, messages, tools=[WEATHER], max_tokens=12, extra_body=GREEDY)
    assert rec2[: len(rec1)] == rec1  # the prompt is turn 1's exact tokens, then the tool result
    assert r2.usage.cache_read_input_tokens >= 0.9 * prompt_of(r2)

    messages.append({"role": "assistant", "content": [b.model_dump() for b in r2.content]})
    messages.append({"role": "user", "content": "And tomorrow?"})
    r3, rec3 = turn(gw, messages, tools=[WEATHER], max_tokens=12, extra_body=GREEDY)
    assert rec3[: len(rec2)] == rec2
    assert r3.usage.cache_read_input_tokens >= 0.9 * prompt_of(r3)


def test_an_edited_tool_call_or_unknown_id_is_rendered_instead(gw: Gateway):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    call = {"type": "tool", "name": "get_weather"}
    r1, _ = turn(gw, messages, tools=[WEATHER], tool_choice=call, max_tokens=100, extra_body=GREEDY)
    blocks = [b.model_dump() for b in r1.content]
    for b in blocks:
        if b["type"] == "tool_use":
            b["id"] = "toolu_guessed000000000000000"
    messages += [
        {"role": "assistant", "content": blocks},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": blocks[-1]["id"], "content": "Snow."}],
        },
    ]
    assert Turn(gw, messages, tools=[WEATHER], max_tokens=4, extra_body=GREEDY).replayed == 0


def test_a_thinking_block_is_signed_and_replays_and_a_tampered_one_does_not(gw: Gateway):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is 2+2? Think first."}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    extra = {"grammar": THINK_GRAMMAR}
    r1, rec1 = turn(gw, messages, thinking=thinking, max_tokens=60, extra_body={**GREEDY, **extra})
    think, text = r1.content
    assert think.type == "thinking" and text.type == "text" and text.text.startswith(" The answer is ")
    want = hmac.new(SIGNING_KEY.encode(), b"thinking\x00" + think.thinking.encode(), hashlib.sha256)
    assert think.signature == want.hexdigest()

    follow = {"role": "user", "content": "And 3+3?"}
    sent = [b.model_dump() for b in r1.content]
    _, rec2 = turn(
        gw, [*messages, {"role": "assistant", "content": sent}, follow], max_tokens=4, extra_body=GREEDY
    )
    assert rec2[: len(rec1)] == rec1

    sent[0]["signature"] = "0" * len(think.signature)
    _, rec3 = turn(
        gw, [*messages, {"role": "assistant", "content": sent}, follow], max_tokens=4, extra_body=GREEDY
    )
    assert rec3[: len(rec1)] != rec1  # rendered: the template leaves the unverified thinking out


def test_a_gateway_restart_between_turns_still_replays_exactly(gw: Gateway):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = {"type": "tool", "name": "get_weather"}
    r1, rec1 = turn(gw, messages, tools=[WEATHER], tool_choice=call, max_tokens=100, extra_body=GREEDY)
    (use,) = [b for b in r1.content if b.type == "tool_use"]
    gw.restart()
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in r1.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Rain."}]},
    ]
    r2, rec2 = turn(gw, messages, tools=[WEATHER], max_tokens=4, extra_body=GREEDY)
    assert rec2[: len(rec1)] == rec1
    assert r2.usage.cache_read_input_tokens >= 0.9 * prompt_of(r2)


def test_openai_tool_calls_sent_back_are_replayed_exactly_too(gw: Gateway):
    tool = {"type": "function", "function": {"name": WEATHER["name"], "parameters": WEATHER["input_schema"]}}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the weather in Rome?"},
    ]
    rec: list[list[int]] = []
    with openai.OpenAI(base_url=f"{gw.proc.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as oai:
        for choice in ({"type": "function", "function": {"name": "get_weather"}}, "none"):
            before = gw.records()
            r = oai.chat.completions.create(
                model=MODEL, messages=messages, tools=[tool], tool_choice=choice, max_tokens=60, temperature=0
            )
            (path,) = set(gw.records()) - set(before)
            rec.append(gw.records()[path])
            message = r.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if message.tool_calls:
                messages.append(
                    {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "Sunny."}
                )
    assert rec[1][: len(rec[0])] == rec[0]


def test_a_restart_of_the_whole_service_between_turns_still_replays_exactly_from_disk():
    """Gateway, broker, worker and cache store all stop after turn 1 and start again over the same
    directories: turn 2's prompt starts with turn 1's exact tokens (the replay record and the signing key
    came back from disk) and restores them (the KV row came back from the disk tier)."""
    rdir = short_tmpdir("erl-gwr-")
    service = Service(rdir)
    try:
        messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Oslo?"}]
        call = {"type": "tool", "name": "get_weather"}
        t1 = Turn(service, messages, tools=[WEATHER], tool_choice=call, max_tokens=100, extra_body=GREEDY)
        (use,) = [b for b in t1.reply.content if b.type == "tool_use"]
        service.restart()
        messages += [
            {"role": "assistant", "content": [b.model_dump() for b in t1.reply.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Fog."}]},
        ]
        t2 = Turn(service, messages, tools=[WEATHER], max_tokens=4, extra_body=GREEDY)
        assert t2.replayed == len(t1.record) and t2.record[: len(t1.record)] == t1.record
        assert t2.reply.usage.cache_read_input_tokens >= 0.9 * prompt_of(t2.reply)
        assert service.disk_hits() == 1
    finally:
        service.stop()
        remove_runtime(rdir)
