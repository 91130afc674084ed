"""Write a small random LoRA adapter GGUF for a base model (by default the embedded SmolLM2-135M).

The adapter is for tests of adapter loading and scaling: random low-rank A/B pairs for a few
weight matrices, with the metadata llama.cpp's ``llama_adapter_lora_init`` checks
(``general.type = adapter``, ``general.architecture`` equal to the base model's,
``adapter.type = lora``, ``adapter.lora.alpha``).

Shapes, as llama.cpp checks them (src/llama-adapter.cpp): for a base weight with ggml shape
``ne = [n_in, n_out]``, ``<name>.lora_a`` has ``ne = [n_in, rank]`` and ``<name>.lora_b`` has
``ne = [rank, n_out]``. numpy arrays are row-major with the dimensions reversed, so A is written
as an array of shape ``(rank, n_in)`` and B as ``(n_out, rank)``. The delta is
``scale * alpha / rank * B @ A``; ``--alpha`` defaults to the rank, so the user scale is the factor.

Usage: python scripts/make_lora.py --out lora.gguf [--model BASE.gguf] [--rank 8]
       [--layers all|0-3,7] [--targets attn_q,attn_v] [--seed 0] [--scale-init 0.05]
Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Final

import gguf
import numpy as np

DEFAULT_RANK: Final = 8
DEFAULT_TARGETS: Final = "attn_q,attn_v"
DEFAULT_SCALE_INIT: Final = 0.05
ADAPTER_NAME: Final = "erllama-random-lora"
MAX_RANK: Final = 1024

# GGUF metadata value types with a fixed size in bytes (string = 8, array = 9 are variable).
_FIXED_SIZE_BYTES: Final = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", f.read(4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", f.read(8))[0]


def _string(f: BinaryIO) -> bytes:
    return f.read(_u64(f))


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        f.seek(_u64(f), 1)
    elif vtype == _ARRAY:
        itype, n = _u32(f), _u64(f)
        if itype in _FIXED_SIZE_BYTES:
            f.seek(n * _FIXED_SIZE_BYTES[itype], 1)
        else:
            for _ in range(n):
                _skip_value(f, itype)
    else:
        f.seek(_FIXED_SIZE_BYTES[vtype], 1)


def read_base(path: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The base model's architecture and every tensor's ggml shape (``ne``), from the GGUF header only.

    gguf's GGUFReader decodes every token string of the vocabulary (seconds for a 49k vocab);
    this walks the header and skips the values it does not need.
    """
    arch = ""
    shapes: dict[str, tuple[int, ...]] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or _u32(f) not in (2, 3):
            raise ValueError(f"{path} is not a GGUF v2/v3 file")
        n_tensors, n_kv = _u64(f), _u64(f)
        for _ in range(n_kv):
            key, vtype = _string(f), _u32(f)
            if key == b"general.architecture" and vtype == _STRING:
                arch = _string(f).decode()
            else:
                _skip_value(f, vtype)
        for _ in range(n_tensors):
            name = _string(f).decode()
            ne = tuple(_u64(f) for _ in range(_u32(f)))
            f.seek(4 + 8, 1)  # ggml type, data offset
            shapes[name] = ne
    if not arch:
        raise ValueError(f"{path} has no general.architecture")
    return arch, shapes


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``all``, or a comma list of layer numbers and inclusive ranges (``0-3,7``)."""
    if spec == "all":
        return list(range(n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        first, last = int(lo), int(hi or lo)
        if not 0 <= first <= last < n_layers:
            raise ValueError(f"layers {part!r} outside 0..{n_layers - 1}")
        out.update(range(first, last + 1))
    return sorted(out)


def make_lora(
    out: Path,
    base: Path,
    *,
    rank: int,
    layers: str,
    targets: list[str],
    seed: int,
    scale_init: float,
    alpha: float | None = None,
) -> list[str]:
    """Write the adapter; returns the names of the adapted base weights."""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in 1..{MAX_RANK}")
    arch, shapes = read_base(base)
    n_layers = 1 + max((int(n.split(".")[1]) for n in shapes if n.startswith("blk.")), default=-1)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type("adapter")
    writer.add_name(ADAPTER_NAME)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank if alpha is None else alpha))
    adapted: list[str] = []
    for layer in parse_layers(layers, n_layers):
        for target in targets:
            name = f"blk.{layer}.{target}.weight"
            ne = shapes.get(name)
            if ne is None or len(ne) != 2:
                raise ValueError(f"the base model has no 2-D tensor {name}")
            n_in, n_out = ne
            a = rng.normal(0.0, scale_init, size=(rank, n_in)).astype(np.float32)
            b = rng.normal(0.0, scale_init, size=(n_out, rank)).astype(np.float32)
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
            adapted.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return adapted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="adapter file to write")
    p.add_argument(
        "--model", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M)"
    )
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--alpha", type=float, default=None, help="adapter.lora.alpha (default: the rank)")
    p.add_argument("--layers", default="all", help="'all' or e.g. '0-3,7'")
    p.add_argument(
        "--targets", default=DEFAULT_TARGETS, help="weights per layer, e.g. attn_q,attn_k,attn_v,attn_output"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scale-init", type=float, default=DEFAULT_SCALE_INIT, help="std of the normal init of A and B"
    )
    args = p.parse_args(argv)
    base = args.model
    if base is None:
        from erllama.models import default_model_path

        base = default_model_path()
    try:
        adapted = make_lora(
            args.out,
            base,
            rank=args.rank,
            layers=args.layers,
            targets=[t.strip() for t in args.targets.split(",") if t.strip()],
            seed=args.seed,
            scale_init=args.scale_init,
            alpha=args.alpha,
        )
    except (ValueError, OSError) as exc:
        print(f"make_lora: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: rank {args.rank}, {len(adapted)} weights, {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
