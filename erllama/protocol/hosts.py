"""Messages between the broker and an ``erllama-host`` (one per machine that joins over tcp with CURVE).

A host joins (``HostJoin``) with what it has, is welcomed with the port its workers connect to, then
beats every ``HEARTBEAT_INTERVAL_S`` with its resources and live workers. The broker places a model on
it (``SpawnWorker``); the host spawns the worker, which registers with the broker as every worker does,
and reports the pid (``WorkerSpawned``) and later the end (``WorkerExited``) from its own supervision.
On SIGTERM the host drains (``HostDrain``): no new placements, the broker lets the host's models finish
what they accepted and stops their workers, then the host leaves (``HostLeave``). A refused or unknown
host gets ``Error`` with ``host_refused`` (or ``host_down`` to a host the broker declared dead, which
then joins again). Beats carry the host's cache store's KV events (``kvevents``); when they leave a gap
the broker asks for a snapshot (``HostKvResync``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from erllama.protocol.codes import HostMsgType
from erllama.protocol.kvevents import KvEventBatch
from erllama.protocol.messages import Error, Id, Message


class GpuInfo(msgspec.Struct, frozen=True):
    index: int
    name: str
    total_bytes: int
    free_bytes: int


class HostResources(msgspec.Struct, frozen=True):
    """What a host has: cores, memory (psutil), GPUs (pynvml; none: ``gpu_error`` says why) and the
    room left in its cache store's tiers (``kv_free_bytes``; None while the store has not answered)."""

    cores: int
    memory_total_bytes: int
    memory_available_bytes: int
    gpus: list[GpuInfo] = []
    gpu_error: str | None = None  # e.g. "no_gpu"
    kv_free_bytes: int | None = None


class HostWorker(msgspec.Struct, frozen=True, array_like=True):
    """A worker process the host supervises."""

    model: str
    pid: int


# --- host -> broker -------------------------------------------------------------------------------------


class HostJoin(Message, frozen=True, tag=HostMsgType.JOIN.value):
    name: Id
    pid: int
    resources: HostResources


class HostBeat(Message, frozen=True, tag=HostMsgType.BEAT.value):
    name: Id
    resources: HostResources
    workers: list[HostWorker] = msgspec.field(default_factory=list)
    cachestore_up: bool = False
    kv: KvEventBatch | None = None  # the store's KV events since the last beat (``kvevents``)


class WorkerSpawned(Message, frozen=True, tag=HostMsgType.SPAWNED.value):
    model: Id
    pid: int


class WorkerExited(Message, frozen=True, tag=HostMsgType.EXITED.value):
    model: Id
    pid: int
    detail: dict[str, Any] = msgspec.field(
        default_factory=dict
    )  # exit_status or signal, stderr_tail (as a local worker's crash report)


class HostDrain(Message, frozen=True, tag=HostMsgType.DRAIN.value):
    name: Id


class HostLeave(Message, frozen=True, tag=HostMsgType.LEAVE.value):
    name: Id


# --- broker -> host -------------------------------------------------------------------------------------


class HostWelcome(Message, frozen=True, tag=HostMsgType.WELCOME.value):
    """``worker_port``: the broker's CURVE tcp port for workers, on the address the host reached it at."""

    instance: str
    worker_port: int


class SpawnWorker(Message, frozen=True, tag=HostMsgType.SPAWN.value):
    model: Id
    path: str | None
    options: dict[str, Any]
    replica: int = 0  # which of the model's replicas (a host runs at most one of each model)


class StopWorker(Message, frozen=True, tag=HostMsgType.STOP.value):
    """SIGKILL a worker the broker has given up on (silent, stuck, a load that never ends)."""

    model: Id
    pid: int


class HostKvResync(Message, frozen=True, tag=HostMsgType.KV_RESYNC.value):
    """The broker's index of our store's rows has a gap: read the store from a snapshot again."""

    name: Id


HostMessage = HostJoin | HostBeat | WorkerSpawned | WorkerExited | HostDrain | HostLeave
HostCommand = HostWelcome | SpawnWorker | StopWorker | HostKvResync | Error
