"""The broker's table of hosts (``erllama-host`` processes that joined): what each has, its state, when it
was last heard from, and the workers it reports. A model is placed on a host by name (``ModelEntry.host``);
a later replica or routing change reads the same table to choose among hosts. The broker's own machine is
listed first, as a host that is up for as long as the broker runs (``OwnMachine``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from erllama.broker.registry import ModelEntry
from erllama.host.resources import gpus, host_resources
from erllama.protocol import GpuInfo, HostResources, HostState, HostWorker

LIVE_HOST_STATES = (HostState.JOINING, HostState.UP, HostState.DRAINING)


@dataclass(slots=True)
class HostEntry:
    name: str
    identity: bytes  # its routing id on the host socket
    pid: int
    resources: HostResources
    address: str | None  # the address its connection came from
    state: HostState = HostState.JOINING
    last_seen_s: float = field(default_factory=time.monotonic)
    joined_at: float = field(default_factory=time.time)
    workers: list[HostWorker] = field(default_factory=list)  # as of its last beat
    cachestore_up: bool = False
    joins: int = 1  # 1 + the times it joined again after being declared dead or leaving
    last_error: dict[str, Any] | None = None
    local: bool = False  # the broker's own machine (``OwnMachine``)

    @property
    def live(self) -> bool:
        return self.state in LIVE_HOST_STATES

    def describe(self, models: list[str]) -> dict[str, Any]:
        """One row of ``list_hosts``: from the broker's own table, no round trip."""
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "address": self.address,
            "heartbeat_age_s": round(time.monotonic() - self.last_seen_s, 3),
            "joined_at": self.joined_at,
            "joins": self.joins,
            "resources": msgspec.to_builtins(self.resources),
            "cachestore_up": self.cachestore_up,
            "workers": [{"model": w.model, "pid": w.pid} for w in self.workers],
            "models": models,
            "last_error": self.last_error,
            "local": self.local,
        }


@dataclass(slots=True)
class OwnMachine:
    """The broker's own machine as a host: named (``--name``, default the hostname), always up, its
    workers supervised in-process (``host/supervise.py``), so it sends no beats: what ``list_hosts``
    shows of it is measured when asked."""

    name: str
    gpu_list: list[GpuInfo] = field(default_factory=list)
    gpu_error: str | None = None
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.gpu_list, self.gpu_error = gpus()  # once: pynvml is slow to ask and GPUs do not come and go

    def entry(
        self, workers: list[HostWorker], cachestore_up: bool, store_stats: dict[str, Any] | None
    ) -> HostEntry:
        return HostEntry(
            self.name,
            b"",
            os.getpid(),
            host_resources(self.gpu_list, self.gpu_error, store_stats),
            None,
            HostState.UP,
            joined_at=self.started_at,
            workers=workers,
            cachestore_up=cachestore_up,
            local=True,
        )


def host_rows(hosts: list[HostEntry], models: dict[str, ModelEntry]) -> list[dict[str, Any]]:
    """``list_hosts``: each host's row with the models placed on it (a replica on the broker's own
    machine, whose placements hold None, counts for the ``local`` host)."""
    here = next((h.name for h in hosts if h.local), None)
    placed: dict[str | None, list[str]] = {}
    for e in models.values():
        for host in dict.fromkeys(e.hosts):  # a model with several replicas here is listed once
            placed.setdefault(host or here, []).append(e.model_id)
    return [h.describe(placed.get(h.name, [])) for h in hosts]
