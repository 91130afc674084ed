"""Host resources: GPU memory through NVML.

pynvml is imported lazily (it prints a FutureWarning on import and needs libnvidia-ml, which
machines without an NVIDIA driver do not have); every failure to reach a GPU is ``no_gpu``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from erllama.protocol import ErllamaError, ErrorCode

log = logging.getLogger(__name__)


def _nvml() -> Any:
    with warnings.catch_warnings():
        # The "pynvml" distribution warns that it is deprecated in favour of nvidia-ml-py;
        # both provide the same module, and the warning is noise for our users.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            import pynvml
        except ImportError as exc:
            raise ErllamaError(ErrorCode.NO_GPU, f"pynvml is not installed: {exc}") from None
    return pynvml


def gpu_devices() -> list[dict[str, Any]]:
    """Each NVIDIA device: ``index``, ``name``, ``total_bytes``, ``free_bytes``. Raises ``no_gpu`` as
    ``vram_info`` does."""
    nvml = _nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise ErllamaError(ErrorCode.NO_GPU, f"NVML is unavailable: {exc}") from None
    try:
        devices = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "total_bytes": int(mem.total),
                    "free_bytes": int(mem.free),
                }
            )
        if not devices:
            raise ErllamaError(ErrorCode.NO_GPU, "NVML found no GPU")
        return devices
    except nvml.NVMLError as exc:
        raise ErllamaError(ErrorCode.NO_GPU, f"NVML query failed: {exc}") from None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)


def vram_info() -> dict[str, int]:
    """GPU memory summed over every NVIDIA device: ``total_b``, ``free_b``, ``used_b`` (bytes), ``devices``.

    Raises ``ErllamaError("no_gpu")`` when NVML cannot start (no driver, no library) or finds no device.
    """
    nvml = _nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise ErllamaError(ErrorCode.NO_GPU, f"NVML is unavailable: {exc}") from None
    try:
        count = nvml.nvmlDeviceGetCount()
        if count <= 0:
            raise ErllamaError(ErrorCode.NO_GPU, "NVML found no GPU")
        total = free = used = 0
        for i in range(count):
            mem = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i))
            total += int(mem.total)
            free += int(mem.free)
            used += int(mem.used)
        return {"total_b": total, "free_b": free, "used_b": used, "devices": count}
    except nvml.NVMLError as exc:
        raise ErllamaError(ErrorCode.NO_GPU, f"NVML query failed: {exc}") from None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:  # shutting down a half-initialised NVML is not worth failing over
            log.debug("nvmlShutdown: %s", exc)
