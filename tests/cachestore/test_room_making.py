"""The order of events when a write needs room made in a full RAM tier, driven step by step: the
store runs in this process and its background jobs run only when the test says so."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest

from erllama.cachestore.codec import CHECKSUM_OFFSET, encode_checksum, row_key
from erllama.cachestore.config import StoreConfig
from erllama.cachestore.publish import Publisher
from erllama.cachestore.storage import Storage
from erllama.cachestore.store import Store
from erllama.protocol import CacheReply, CacheTier, ErllamaError, ErrorCode
from tests.cachestore.cachestore_support import payload_for

FP = b"room-fp"
ROW = 64 * 1024


class Jobs:
    """``Store.submit`` that queues the blocking work until ``run`` is called."""

    def __init__(self) -> None:
        self.queue: list[Callable[[], None]] = []

    def __call__(
        self, fn: Callable[..., Any], on_done: Callable[[Future[Any]], None], *args: Any, **kw: Any
    ) -> None:
        def job() -> None:
            fut: Future[Any] = Future()
            try:
                fut.set_result(fn(*args, **kw))
            except Exception as exc:  # noqa: BLE001 - a Future carries whatever its job raised
                fut.set_exception(exc)
            on_done(fut)

        self.queue.append(job)

    def run(self) -> None:
        while self.queue:
            self.queue.pop(0)()


class Reply:
    ident = b"writer"

    def __init__(self) -> None:
        self.answers: list[dict[str, Any] | ErllamaError] = []

    def ok(self, reply: CacheReply, frame: Any = None) -> None:
        fields = msgspec.structs.asdict(reply)  # the reply's own fields, as a peer decodes them
        self.answers.append({k: v for k, v in fields.items() if k not in ("v", "rid")})

    def error(self, err: ErllamaError) -> None:
        self.answers.append(err)


class World:
    def __init__(self, root: Path, colder_bytes: int = 8 * ROW):
        config = StoreConfig(
            endpoint="ipc://unused",
            shm_dir=root / "shm",
            disk_dir=root / "disk",
            ram_bytes=ROW + ROW // 2,  # one row
            shm_bytes=colder_bytes,
            disk_bytes=colder_bytes,
        )
        self.jobs = Jobs()
        self.store = Store(config, Storage(config.shm_dir, config.disk_dir), self.jobs)
        self.store.restore()
        self.publisher = Publisher(self.store)

    def reserve(self, seed: int) -> Reply:
        reply = Reply()
        self.publisher.reserve(
            reply, FP, bytes(4) + seed.to_bytes(4, "little"), ROW, "cold", os.getpid(), "ram"
        )
        return reply

    def fill_and_commit(self, reply: Reply, seed: int) -> None:
        """What a writer does with its reservation's answer."""
        (answer,) = reply.answers
        assert isinstance(answer, dict), answer
        payload = payload_for(seed, ROW)
        crc = zlib.crc32(payload, answer["head_crc"])
        fd = os.open(answer["path"], os.O_RDWR)
        try:
            os.pwrite(fd, payload, answer["offset"])
            os.pwrite(fd, encode_checksum(crc), CHECKSUM_OFFSET)
        finally:
            os.close(fd)
        done = Reply()
        self.publisher.commit(done, answer["res"], crc, None)
        self.jobs.run()
        assert done.answers == [{"status": "stored", "key": answer["key"], "tier": "ram"}]

    def save(self, seed: int) -> None:
        reply = self.reserve(seed)
        self.jobs.run()
        self.fill_and_commit(reply, seed)


def key_of(seed: int) -> bytes:
    return row_key(FP, [0, seed])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.jobs.run()


def test_the_write_waits_for_the_file_of_the_row_leaving_and_gets_it(world: World) -> None:
    world.save(1)
    reply = world.reserve(2)
    assert reply.answers == []  # waiting: the row in RAM is being moved to shm
    world.jobs.run()
    assert world.store.counters.recycled_files == 1 and world.store.counters.demotions == 1
    world.fill_and_commit(reply, 2)
    assert world.store.index.get(key_of(1)).tier is CacheTier.SHM
    assert world.store.index.get(key_of(2)).tier is CacheTier.RAM


def test_a_move_cancelled_by_a_load_leaves_the_waiting_write_a_new_file(world: World) -> None:
    world.save(1)
    reply = world.reserve(2)
    reader = Reply()
    world.store.load(reader, key_of(1), os.getpid(), False)  # during the move: it is called off
    world.jobs.run()
    assert isinstance(reply.answers[0], dict) and world.store.counters.recycled_files == 0
    world.fill_and_commit(reply, 2)
    world.store.release(Reply(), reader.answers[0]["lease"], False)  # now the store can make room
    world.jobs.run()
    tiers = {world.store.index.get(key_of(seed)).tier for seed in (1, 2)}
    assert tiers == {CacheTier.RAM, CacheTier.SHM}  # which one stays is the eviction score's call
    assert world.store.tiers[CacheTier.RAM].excess() <= 0


def test_a_write_that_ends_while_it_waits_is_answered_and_takes_no_file(world: World) -> None:
    world.save(1)
    reply = world.reserve(2)
    world.publisher.drop_client(Reply.ident)  # the writer said bye
    (answer,) = reply.answers
    assert isinstance(answer, ErllamaError) and answer.code == ErrorCode.EXPIRED
    world.jobs.run()  # the move lands; nobody waits for its file, so it is deleted
    assert world.store.counters.recycled_files == 0
    world.save(3)  # and the key and the room are free again
    assert world.store.index.get(key_of(3)).tier is CacheTier.RAM


def test_a_row_evicted_for_room_hands_its_file_over_at_once(tmp_path: Path) -> None:
    world = World(tmp_path, colder_bytes=0)  # RAM only: rows that leave are evicted, not moved
    world.save(1)
    reply = world.reserve(2)
    assert world.jobs.queue  # no move to wait for: the temp is being made from the evicted row's file
    world.jobs.run()
    assert world.store.counters.recycled_files == 1 and world.store.counters.evictions == 1
    world.fill_and_commit(reply, 2)
    assert key_of(1) not in world.store.index and world.store.index.get(key_of(2)).tier is CacheTier.RAM
