"""A host's cache store announces its rows to the broker's routing index through the host's beats: the
index follows a restart of the store from a snapshot, forgets the host when it leaves, and asks a host
whose events leave a gap for a snapshot."""

from __future__ import annotations

import os
import signal

import zmq

from erllama.blockhash import KV_BLOCK_TOKENS, block_hashes
from erllama.cachestore.client import CacheClient
from erllama.host.link import BrokerLink
from erllama.protocol import (
    CacheTier,
    HostBeat,
    HostJoin,
    HostKvResync,
    HostResources,
    HostWelcome,
    KvEvent,
    KvEventBatch,
    KvEventKind,
    SaveOutcome,
)
from tests.conftest import wait_for
from tests.host.cluster import cluster

FP = b"host-kv-events-fp"


def test_a_hosts_rows_reach_the_brokers_kv_index_follow_a_store_restart_and_leave_with_the_host():
    with cluster(("h1",)) as cl:
        host = cl.start_host("h1", "127.0.0.2")
        c = cl.client(timeout_s=30)
        endpoint = f"ipc://{host.runtime_dir / 'cachestore.sock'}"
        with CacheClient(endpoint, timeout_s=10) as store:
            tokens = list(range(3 * KV_BLOCK_TOKENS + 5))
            assert store.save(FP, tokens, b"kv" * 4096, "cold", tier=CacheTier.DISK) is SaveOutcome.STORED
            stats = store.stats()

        def h1() -> dict[str, object]:
            return c.ping()["kv_index"].get("h1", {})

        wait_for(lambda: h1().get("blocks") == 3, 30, "the host's row in the broker's index")
        assert h1()["publisher"] == stats["kv_events"]["publisher"] and not h1()["stale"]
        assert "" in c.ping()["kv_index"]  # the broker's own machine's store, read by the broker itself

        os.kill(stats["pid"], signal.SIGKILL)  # the host restarts its store: a new publisher, rows from disk
        wait_for(
            lambda: h1().get("publisher") not in (None, stats["kv_events"]["publisher"]),
            60,
            "a snapshot of the restarted store",
        )
        assert h1()["blocks"] == 3 and not h1()["stale"]

        host.proc.send_signal(signal.SIGTERM)  # drains (no workers) and leaves
        assert host.wait() == 0
        wait_for(lambda: "h1" not in c.ping()["kv_index"], 30, "the host's entries dropped")


def test_a_beat_whose_kv_events_leave_a_gap_is_answered_with_a_resync_command():
    with cluster(("h2",)) as cl:
        ctx = zmq.Context()
        curve = (str(cl.keys_dir / "h2.key_secret"), str(cl.keys_dir / "server.key"))
        link = BrokerLink(ctx, "h2", cl.hosts_endpoint, curve)
        try:
            res = HostResources(cores=1, memory_total_bytes=1 << 30, memory_available_bytes=1 << 29)
            link.send(HostJoin(name="h2", pid=os.getpid(), resources=res))
            wait_for(lambda: any(isinstance(m, HostWelcome) for m in link.receive()), 30, "the welcome")
            blocks = block_hashes(FP, list(range(2 * KV_BLOCK_TOKENS)))
            row = KvEvent(KvEventKind.STORED, FP, blocks, 2 * KV_BLOCK_TOKENS, CacheTier.RAM)

            def beat(batch: KvEventBatch) -> None:
                link.send(HostBeat(name="h2", resources=res, cachestore_up=True, kv=batch))

            c = cl.client(timeout_s=30)
            beat(KvEventBatch("pub", 1, 0, True, [row]))
            wait_for(lambda: c.ping()["kv_index"].get("h2", {}).get("blocks") == 2, 30, "the snapshot")
            beat(KvEventBatch("pub", 5, 5, False, [row]))  # events 1..4 never arrived
            wait_for(lambda: any(isinstance(m, HostKvResync) for m in link.receive()), 30, "a resync command")
            assert c.ping()["kv_index"]["h2"]["stale"]
        finally:
            link.close()
            ctx.term()
