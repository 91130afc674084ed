"""A call to a model's worker (tokenize, apply_chat_template, embed, ...) sent while the model is still
loading waits for it, as an ``infer`` does, instead of answering ``model_not_found``; a load that fails
fails the calls that waited with the load's own error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from erllama import AsyncClient, ErllamaError
from tests.conftest import BrokerProcess


def test_a_tokenize_sent_right_after_a_load_waits_for_the_model(broker: BrokerProcess):
    async def main() -> tuple[object, list[int], list[int]]:
        async with AsyncClient(broker.endpoint, timeout_s=60.0) as c:
            # one socket: the broker sees the load before the calls, and the model is still loading then
            return await asyncio.gather(
                c.load_model("stub", backend="stub", n_ctx=256, n_seq_max=1),
                c.tokenize("stub", "hello world"),
                c.tokenize("stub", "hi"),
            )

    _, first, second = asyncio.run(main())
    assert first and second


def test_calls_waiting_for_a_load_that_fails_get_its_error(broker: BrokerProcess, tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)

    async def main() -> list[str]:
        async with AsyncClient(broker.endpoint, timeout_s=60.0) as c:
            outcomes = await asyncio.gather(
                c.load_model("bad", str(bad), n_ctx=256, n_seq_max=1),
                c.tokenize("bad", "hello"),
                return_exceptions=True,
            )
        return [o.code if isinstance(o, ErllamaError) else repr(o) for o in outcomes]

    load_code, call_code = asyncio.run(main())
    assert load_code in ("load_failed", "malformed_gguf") and call_code == load_code


def test_a_call_for_a_model_never_loaded_is_still_model_not_found(broker: BrokerProcess):
    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout_s=60.0) as c:
            await c.tokenize("nothing", "hello")

    with pytest.raises(ErllamaError) as exc:
        asyncio.run(main())
    assert exc.value.code == "model_not_found"
