"""What a host advertises to the broker: cores and memory (psutil), GPUs (pynvml; none is reported as
``gpu_error = "no_gpu"``, never as a failure) and the room left in its cache store's tiers."""

from __future__ import annotations

import logging
import os
from typing import Any

import msgspec
import psutil

from erllama.protocol import ErllamaError, GpuInfo, HostResources
from erllama.resources import gpu_devices

log = logging.getLogger(__name__)


def kv_free_bytes(stats: dict[str, Any] | None) -> int | None:
    """Free room over the store's enabled tiers (budget - stored - reserved), from its ``stats``."""
    if stats is None:
        return None
    free = 0
    for tier in stats.get("tiers", {}).values():
        if tier.get("enabled"):
            free += max(0, int(tier["budget"]) - int(tier["bytes"]) - int(tier.get("reserved") or 0))
    return free


def gpus() -> tuple[list[GpuInfo], str | None]:
    """The GPUs, or none and the reason (``no_gpu`` on a machine without an NVIDIA driver)."""
    try:
        return [msgspec.convert(d, GpuInfo) for d in gpu_devices()], None
    except ErllamaError as err:
        return [], err.code


def host_resources(
    gpu_list: list[GpuInfo], gpu_error: str | None, store_stats: dict[str, Any] | None
) -> HostResources:
    mem = psutil.virtual_memory()
    return HostResources(
        cores=os.cpu_count() or 1,
        memory_total_bytes=int(mem.total),
        memory_available_bytes=int(mem.available),
        gpus=gpu_list,
        gpu_error=gpu_error,
        kv_free_bytes=kv_free_bytes(store_stats),
    )
