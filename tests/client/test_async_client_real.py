"""``AsyncClient`` shows the behaviours ``Client`` shows, against the session's real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from erllama import AsyncClient, Client, ErllamaError
from tests.conftest import REAL_MODEL_ID, BrokerProcess, wait_for

T = TypeVar("T")
PROMPT = "The capital of France is"


def run(bp: BrokerProcess, body: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """``body`` with a fresh AsyncClient of ``bp``, on a fresh event loop."""

    async def main() -> T:
        async with AsyncClient(bp.endpoint, timeout_s=60.0) as c:
            return await body(c)

    return asyncio.run(main())


def test_complete_returns_the_result_client_returns(real_broker: BrokerProcess, real_client: Client):
    want = real_client.complete(REAL_MODEL_ID, PROMPT, max_tokens=12, temperature=0)
    got = run(real_broker, lambda c: c.complete(REAL_MODEL_ID, PROMPT, max_tokens=12, temperature=0))
    assert got.generated == want.generated and got.reply == want.reply
    assert got.finish_reason == "length" and got.stats.completion_tokens == 12


def test_streamed_events_make_up_the_result(real_broker: BrokerProcess):
    async def body(c: AsyncClient) -> tuple[list[Any], Any]:
        stream = await c.infer(REAL_MODEL_ID, "Write the word café three times:", max_tokens=16)
        return [ev async for ev in stream], stream.result

    events, result = run(real_broker, body)
    assert "".join(e.text for e in events) == result.reply
    assert [t for e in events for t in e.token_ids] == result.generated


def test_concurrent_streams_each_get_only_their_own_tokens(real_broker: BrokerProcess, real_client: Client):
    prompts = ["1, 2, 3,", "The quick brown fox", "def fibonacci(n):", "Once upon a time"]
    want = [real_client.complete(REAL_MODEL_ID, p, max_tokens=10, temperature=0).generated for p in prompts]

    async def one(c: AsyncClient, p: str) -> list[int]:
        stream = await c.infer(REAL_MODEL_ID, p, max_tokens=10, temperature=0)
        return [t async for ev in stream for t in ev.token_ids]

    async def body(c: AsyncClient) -> list[list[int]]:
        return list(await asyncio.gather(*(one(c, p) for p in prompts)))

    assert run(real_broker, body) == want


def test_errors_carry_the_same_codes(real_broker: BrokerProcess):
    async def body(c: AsyncClient) -> list[str]:
        codes = []
        for call in (
            lambda: c.complete("no-such-model", PROMPT),
            lambda: c.complete(REAL_MODEL_ID, PROMPT, temperature=-1),
            lambda: c.tokenize("no-such-model", PROMPT),
        ):
            with pytest.raises(ErllamaError) as err:
                await call()
            codes.append(err.value.code)
        return codes

    assert run(real_broker, body) == ["model_not_found", "invalid_params", "model_not_found"]


def test_admin_calls_answer_as_client_does(real_broker: BrokerProcess, real_client: Client):
    async def body(c: AsyncClient) -> tuple[Any, ...]:
        ids = await c.tokenize(REAL_MODEL_ID, PROMPT)
        return (
            ids,
            await c.detokenize(REAL_MODEL_ID, ids),
            [m["id"] for m in await c.list_models()],
            await c.embed(REAL_MODEL_ID, PROMPT),
            await c.apply_chat_template(REAL_MODEL_ID, [{"role": "user", "content": "hi"}]),
        )

    ids, text, models, emb, chat = run(real_broker, body)
    assert ids == real_client.tokenize(REAL_MODEL_ID, PROMPT)
    assert text == real_client.detokenize(REAL_MODEL_ID, ids)
    assert models == [m["id"] for m in real_client.list_models()]
    assert emb == real_client.embed(REAL_MODEL_ID, PROMPT)
    assert chat == real_client.apply_chat_template(REAL_MODEL_ID, [{"role": "user", "content": "hi"}])


def test_prefill_draft_and_verify_answer_as_client_does(real_broker: BrokerProcess, real_client: Client):
    prefix = real_client.tokenize(REAL_MODEL_ID, "Once upon a time, in a land far away, " * 12)

    async def body(c: AsyncClient) -> tuple[Any, ...]:
        primed = await c.prefill_only(REAL_MODEL_ID, prefix)
        draft = await c.draft_tokens(REAL_MODEL_ID, prefix, 4)
        return (
            primed,
            await c.cached_prefix_len(REAL_MODEL_ID, prefix),
            draft,
            await c.verify(REAL_MODEL_ID, prefix, draft),
        )

    primed, cached, draft, verdict = run(real_broker, body)
    assert primed.generated == [] and cached >= len(prefix) // 2
    assert draft == real_client.draft_tokens(REAL_MODEL_ID, prefix, 4)
    assert verdict == real_client.verify(REAL_MODEL_ID, prefix, draft) and verdict[0] == 4


def test_cancelling_the_awaiting_task_cancels_the_request_at_the_broker(
    real_broker: BrokerProcess, real_client: Client
):
    async def body(c: AsyncClient) -> None:
        stream = await c.infer(REAL_MODEL_ID, "1, 2, 3, 4, 5, 6,", max_tokens=2000)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(real_broker, body)
    wait_for(lambda: real_client.model_info(REAL_MODEL_ID)["running"] == 0, what="the request to stop")
    assert real_client.complete(REAL_MODEL_ID, PROMPT, max_tokens=2).finish_reason == "length"


def test_a_closed_client_fails_its_requests_in_flight(real_broker: BrokerProcess):
    async def body(c: AsyncClient) -> str:
        stream = await c.infer(REAL_MODEL_ID, "1, 2, 3, 4, 5, 6,", max_tokens=2000)
        reader = asyncio.create_task(stream.collect())
        await asyncio.sleep(0)
        await c.close()
        with pytest.raises(ErllamaError) as err:
            await reader
        return err.value.code

    assert run(real_broker, body) == "client_closed"
