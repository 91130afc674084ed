"""The model fingerprint: the identity a cache row is filed under.

It must change whenever the KV bytes of the same tokens, or the layout of a saved state, would: a
different model file, the loaded LoRA adapters with their scales, and what the backend reports as
its state layout (``Backend.state_layout``: KV cache types, flash attention, which stores V
transposed when off, the number of KV streams, which a restore checks, sliding-window fullness, and
the llama.cpp build itself, by the content of its libraries). Nothing else goes in: a context size
or a batch size does not change a state's bytes, so rows stay shared across them. Hashing a 100 MB
file takes a noticeable fraction of a second, so content hashes are remembered per (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES: Final = 8 * 1024 * 1024
FINGERPRINT_VERSION: Final = b"erllama-fp-2"  # 2: payloads are kvrow envelopes (state + next-token logits)


def hash_cache_path() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "erllama" / "model-hashes.json"


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(model: Path, cache_file: Path | None = None) -> str:
    """The file's sha256, from the cache when path, size and mtime match."""
    cache_file = cache_file or hash_cache_path()
    st = model.stat()
    key = str(model.resolve())
    cache = _read_hash_cache(cache_file)
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    h = hashlib.sha256()
    with open(model, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".model-hashes.")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_file)  # two workers writing at once: either complete file wins
    except OSError as exc:
        log.warning("cannot remember the model hash in %s: %s", cache_file, exc)
    return digest


def files_sha256(paths: Sequence[Path]) -> str:
    """One hash over several files' content hashes (a library and the libraries it loads)."""
    h = hashlib.sha256()
    for path in sorted({p.resolve() for p in paths}):
        h.update(f"{path.name}:{file_sha256(path)};".encode())
    return h.hexdigest()


def fingerprint(
    model_identity: str, layout: Mapping[str, Any], adapters: Sequence[tuple[str, float]] = ()
) -> bytes:
    """32 bytes naming the KV layout of this model as loaded. ``model_identity`` is the file's
    content hash (or the stub's name), ``layout`` the backend's ``state_layout()``, ``adapters`` the
    (adapter content hash, scale) pairs in effect."""
    h = hashlib.sha256(FINGERPRINT_VERSION)
    parts = {
        "model": model_identity,
        "layout": dict(layout),
        "adapters": [[a, round(float(s), 6)] for a, s in sorted(adapters)],
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.digest()
