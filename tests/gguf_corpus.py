"""A corpus of malformed GGUF files made from the real model, for the worker's load-error paths.

Each variant is one deliberate defect: truncations at several depths, flipped header bytes,
wrong or absurd counts, lengths and offsets that point past the end of the file, tensors whose
shape or type no longer matches the architecture, metadata rewritten with the ``gguf``
package's writer. Most variants only need the file's first ~1.8 MB (header, metadata, tensor
infos) to be real: llama.cpp rejects them before it reads a weight, so the rest is left as a
sparse hole and the whole corpus costs a few MB of disk and well under a second to build. The
one variant that must load and then run (``f16_output_norm``) is a full copy.

Run as a script to build the corpus into a directory and list it::

    python -m tests.gguf_corpus /tmp/corpus
"""

from __future__ import annotations

import enum
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, GGUFWriter

GGUF_HEADER_BYTES: Final = 24  # magic u32, version u32, n_tensors u64, n_kv u64
VERSION_OFFSET: Final = 4
N_TENSORS_OFFSET: Final = 8
N_KV_OFFSET: Final = 16
INVALID_GGML_TYPE: Final = 4  # Q4_2, removed from ggml long ago: ggml_type_size() is 0
COPY_CHUNK_BYTES: Final = 1 << 20


class Expect(enum.StrEnum):
    """What a variant is expected to do when a worker loads it."""

    # erllama's own check_gguf_header says malformed_gguf; llama.cpp never sees it
    HEADER_REJECT = "header_reject"
    LLAMA_REJECT = "llama_reject"  # llama.cpp refuses it (NULL model): the error quotes llama.cpp's log
    DECODE_ABORT = "decode_abort"  # loads fine; llama.cpp aborts (GGML_ABORT) in the first llama_decode


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    path: Path
    defect: str
    expect: Expect
    says: str  # a phrase the load error must contain: llama.cpp's own words, or erllama's header check's


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things are in the source file."""

    size: int
    data_offset: int
    kv_offsets: dict[str, int]  # key -> offset of the field (its key length)
    tensor_info_offsets: dict[str, int]  # tensor name -> offset of its info (its name length)
    tensor_dims: dict[str, list[int]]
    tensor_types: dict[str, GGMLQuantizationType]
    tensor_data_offsets: dict[str, int]  # absolute offsets
    tensor_names: list[str]
    n_tensors: int
    n_kv: int


_SCALAR_FORMATS: Final = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(slots=True)
class _Cursor:
    """A small GGUF parser. ``gguf.GGUFReader`` builds a numpy view per string, which takes ~10 s for
    this vocabulary (49k tokens, 48k merges); a plain struct walk takes a fraction of a second."""

    buf: bytes
    pos: int = 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        s = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype is GGUFValueType.STRING:
            return self.string()
        if vtype is GGUFValueType.ARRAY:
            sub = GGUFValueType(self.take("<I"))
            return [self.value(sub) for _ in range(self.take("<Q"))]
        return self.take(_SCALAR_FORMATS[vtype])


def read_metadata(src: Path) -> tuple[list[tuple[str, GGUFValueType, GGUFValueType | None, Any]], Layout]:
    """Parse the header, every KV pair (key, type, array element type, value) and the tensor infos."""
    size = src.stat().st_size
    with open(src, "rb") as f:
        head = f.read(GGUF_HEADER_BYTES)
        _, _, n_tensors, n_kv = struct.unpack("<4sIQQ", head)
        # The metadata of any sane file is a small fraction of it; read generously, once.
        c = _Cursor(head + f.read(64 * COPY_CHUNK_BYTES), GGUF_HEADER_BYTES)
    kvs: list[tuple[str, GGUFValueType, GGUFValueType | None, Any]] = []
    kv_offsets: dict[str, int] = {}
    for _ in range(n_kv):
        at = c.pos
        key = c.string()
        vtype = GGUFValueType(c.take("<I"))
        sub = (
            GGUFValueType(struct.unpack_from("<I", c.buf, c.pos)[0]) if vtype is GGUFValueType.ARRAY else None
        )
        kvs.append((key, vtype, sub, c.value(vtype)))
        kv_offsets[key] = at
    infos: dict[str, int] = {}
    dims: dict[str, list[int]] = {}
    types: dict[str, GGMLQuantizationType] = {}
    rel_offsets: dict[str, int] = {}
    names: list[str] = []
    for _ in range(n_tensors):
        at = c.pos
        name = c.string()
        nd = c.take("<I")
        dims[name] = [c.take("<Q") for _ in range(nd)]
        types[name] = GGMLQuantizationType(c.take("<I"))
        rel_offsets[name] = c.take("<Q")
        infos[name] = at
        names.append(name)
    alignment = next((v for k, _, _, v in kvs if k == "general.alignment"), GGUF_DEFAULT_ALIGNMENT)
    data_offset = -(-c.pos // alignment) * alignment
    layout = Layout(
        size=size,
        data_offset=data_offset,
        kv_offsets=kv_offsets,
        tensor_info_offsets=infos,
        tensor_dims=dims,
        tensor_types=types,
        tensor_data_offsets={n: data_offset + o for n, o in rel_offsets.items()},
        tensor_names=names,
        n_tensors=n_tensors,
        n_kv=n_kv,
    )
    return kvs, layout


def read_layout(src: Path) -> Layout:
    return read_metadata(src)[1]


def tensor_nbytes(dims: list[int], qtype: GGMLQuantizationType) -> int:
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    return int(np.prod(dims)) // block * type_bytes


# --- file surgery ---------------------------------------------------------------------------------------


def _copy_prefix(src: Path, dst: Path, n: int) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        remaining = n
        while remaining > 0:
            chunk = fi.read(min(COPY_CHUNK_BYTES, remaining))
            if not chunk:
                break
            fo.write(chunk)
            remaining -= len(chunk)


def sparse_copy(src: Path, dst: Path, real_bytes: int, size: int) -> None:
    """``dst`` is ``size`` bytes long; only its first ``real_bytes`` are the source's, the rest a hole."""
    _copy_prefix(src, dst, min(real_bytes, size))
    os.truncate(dst, size)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _string_value_offset(layout: Layout, key: str) -> int:
    """Offset of a string KV's u64 length: key length (u64), key bytes, value type (u32)."""
    return layout.kv_offsets[key] + 8 + len(key.encode()) + 4


def _scalar_value_offset(layout: Layout, key: str) -> int:
    return layout.kv_offsets[key] + 8 + len(key.encode()) + 4


def _array_count_offset(layout: Layout, key: str) -> int:
    """Offset of an array KV's u64 element count (after its u32 element type)."""
    return layout.kv_offsets[key] + 8 + len(key.encode()) + 4 + 4


def _tensor_info_fields(layout: Layout, name: str) -> tuple[int, int, int]:
    """Offsets of a tensor info's first dimension, its type and its data offset."""
    base = layout.tensor_info_offsets[name] + 8 + len(name.encode())
    n_dims = len(layout.tensor_dims[name])
    dims_at = base + 4
    type_at = dims_at + 8 * n_dims
    return dims_at, type_at, type_at + 4


def rewrite_with_gguf_writer(
    src: Path,
    dst: Path,
    drop_keys: frozenset[str] = frozenset(),
    set_keys: dict[str, tuple[Any, GGUFValueType]] | None = None,
    copy_data: bool = False,
) -> None:
    """Re-emit the source's metadata and tensor infos through ``gguf.GGUFWriter`` with some keys dropped
    or changed. The tensor data region is copied only if ``copy_data``; otherwise it is a sparse hole
    of the right length (tensor offsets are relative to the data start, so they stay valid)."""
    kvs, lay = read_metadata(src)
    arch = next(v for k, _, _, v in kvs if k == "general.architecture")
    w = GGUFWriter(dst, arch)
    for key, vtype, sub, value in kvs:
        if key == "general.architecture" or key in drop_keys:
            continue
        w.add_key_value(key, value, vtype, sub_type=sub)
    for key, (value, vtype) in (set_keys or {}).items():
        w.add_key_value(key, value, vtype)
    for name in lay.tensor_names:
        qtype = lay.tensor_types[name]
        # Shapes go in numpy order (the writer reverses them back); a non-uint8 dtype with an explicit
        # raw_dtype keeps the element shape as is.
        w.add_tensor_info(
            name,
            list(reversed(lay.tensor_dims[name])),
            np.dtype(np.float32),
            tensor_nbytes(lay.tensor_dims[name], qtype),
            raw_dtype=qtype,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    data_start = fout.tell()
    w.close()
    data_len = lay.size - lay.data_offset
    if copy_data:
        with open(src, "rb") as fi, open(dst, "ab") as fo:
            fi.seek(lay.data_offset)
            shutil.copyfileobj(fi, fo, COPY_CHUNK_BYTES)
    else:
        os.truncate(dst, data_start + data_len)


# --- the corpus -----------------------------------------------------------------------------------------

Builder = Callable[[Path, Path, Layout], None]


def _truncated(at: Callable[[Layout], int]) -> Builder:
    def build(src: Path, dst: Path, lay: Layout) -> None:
        n = at(lay)
        sparse_copy(src, dst, min(n, lay.data_offset), n)

    return build


def _header_patch(offset: int, data: Callable[[Layout], bytes]) -> Builder:
    def build(src: Path, dst: Path, lay: Layout) -> None:
        sparse_copy(src, dst, lay.data_offset, lay.size)
        patch(dst, offset, data(lay))

    return build


def _metadata_patch(where: Callable[[Layout], int], data: Callable[[Layout], bytes]) -> Builder:
    def build(src: Path, dst: Path, lay: Layout) -> None:
        sparse_copy(src, dst, lay.data_offset, lay.size)
        patch(dst, where(lay), data(lay))

    return build


def _last_tensor(lay: Layout) -> str:
    return lay.tensor_names[-1]


def _build_empty(src: Path, dst: Path, lay: Layout) -> None:
    dst.write_bytes(b"")


def _build_unknown_architecture(src: Path, dst: Path, lay: Layout) -> None:
    sparse_copy(src, dst, lay.data_offset, lay.size)
    at = _string_value_offset(lay, "general.architecture")
    with open(dst, "r+b") as f:
        f.seek(at)
        (n,) = struct.unpack("<Q", f.read(8))
        name = f.read(n)
        f.seek(at + 8)
        f.write(name[:-1] + b"x")  # same length: "llama" -> "llamx"


def _build_missing_block_count(src: Path, dst: Path, lay: Layout) -> None:
    rewrite_with_gguf_writer(src, dst, drop_keys=frozenset({"llama.block_count"}))


def _build_f16_output_norm(src: Path, dst: Path, lay: Layout) -> None:
    """A well-formed file whose final RMS-norm weight is stored as F16 (values converted exactly as a
    converter would). The GGUF parser and llama.cpp's loader accept it; ggml's CPU multiply has no
    kernel for f32 x f16 -> f32 and aborts inside the first ``llama_decode``."""
    shutil.copyfile(src, dst)
    name = "output_norm.weight"
    assert lay.tensor_types[name] is GGMLQuantizationType.F32 and name == _last_tensor(lay)
    n = int(np.prod(lay.tensor_dims[name]))
    data_at = lay.tensor_data_offsets[name]
    with open(dst, "r+b") as f:
        f.seek(data_at)
        values = np.frombuffer(f.read(4 * n), dtype="<f4")
        f.seek(data_at)
        f.write(values.astype("<f2").tobytes())
    _, type_at, _ = _tensor_info_fields(lay, name)
    patch(dst, type_at, struct.pack("<I", GGMLQuantizationType.F16))


VARIANTS: Final[list[tuple[str, str, Expect, str, Builder]]] = [
    ("empty", "a zero-length file", Expect.HEADER_REJECT, "too short for a GGUF header", _build_empty),
    (
        "truncated_in_header",
        "cut 16 bytes in, inside the fixed header",
        Expect.HEADER_REJECT,
        "too short for a GGUF header",
        _truncated(lambda lay: 16),
    ),
    (
        "flipped_magic",
        "first magic byte flipped ('GGUF' -> '\\xb8GUF')",
        Expect.HEADER_REJECT,
        "bad magic",
        _header_patch(0, lambda lay: bytes([ord("G") ^ 0xFF])),
    ),
    (
        "flipped_version",
        "a bit of the version flipped (3 -> 259)",
        Expect.HEADER_REJECT,
        "unsupported GGUF version 259",
        _header_patch(VERSION_OFFSET + 1, lambda lay: b"\x01"),
    ),
    (
        "huge_tensor_count",
        "tensor count 2**40",
        Expect.HEADER_REJECT,
        "implausible header",
        _header_patch(N_TENSORS_OFFSET, lambda lay: struct.pack("<Q", 1 << 40)),
    ),
    (
        "huge_kv_count",
        "KV count 2**32",
        Expect.HEADER_REJECT,
        "implausible header",
        _header_patch(N_KV_OFFSET, lambda lay: struct.pack("<Q", 1 << 32)),
    ),
    (
        "truncated_in_kv",
        "cut in the middle of the tokenizer's vocabulary array",
        Expect.LLAMA_REJECT,
        "failed to read key-value pairs",
        _truncated(
            lambda lay: (
                (lay.kv_offsets["tokenizer.ggml.tokens"] + lay.kv_offsets["tokenizer.ggml.token_type"]) // 2
            )
        ),
    ),
    (
        "truncated_in_tensor_info",
        "cut in the middle of the tensor infos",
        Expect.LLAMA_REJECT,
        "failed to read tensor info",
        _truncated(lambda lay: (lay.tensor_info_offsets[lay.tensor_names[0]] + lay.data_offset) // 2),
    ),
    (
        "truncated_at_data_start",
        "header, metadata and tensor infos only: no tensor data",
        Expect.LLAMA_REJECT,
        "data is not within the file bounds",
        _truncated(lambda lay: lay.data_offset),
    ),
    (
        "truncated_mid_data",
        "cut two thirds into the tensor data",
        Expect.LLAMA_REJECT,
        "data is not within the file bounds",
        _truncated(lambda lay: lay.data_offset + 2 * (lay.size - lay.data_offset) // 3),
    ),
    (
        "truncated_one_byte_short",
        "the last byte of the last tensor missing",
        Expect.LLAMA_REJECT,
        "'output_norm.weight' data is not within the file bounds",
        _truncated(lambda lay: lay.size - 1),
    ),
    (
        "tensor_count_plus_one",
        "tensor count one more than the tensor infos present",
        Expect.LLAMA_REJECT,
        "failed to read tensor data",
        _header_patch(N_TENSORS_OFFSET, lambda lay: struct.pack("<Q", lay.n_tensors + 1)),
    ),
    (
        "tensor_count_minus_one",
        "tensor count one less than the tensor infos present",
        Expect.LLAMA_REJECT,
        "tensor 'output_norm.weight' not found",
        _header_patch(N_TENSORS_OFFSET, lambda lay: struct.pack("<Q", lay.n_tensors - 1)),
    ),
    (
        "kv_count_plus_one",
        "KV count one more: the first tensor info is parsed as a KV pair",
        Expect.LLAMA_REJECT,
        "failed to read tensor info",
        _header_patch(N_KV_OFFSET, lambda lay: struct.pack("<Q", lay.n_kv + 1)),
    ),
    (
        "kv_count_large",
        "KV count 60000 (within erllama's sanity bound, far past the real 33)",
        Expect.LLAMA_REJECT,
        "failed to read key-value pairs",
        _header_patch(N_KV_OFFSET, lambda lay: struct.pack("<Q", 60_000)),
    ),
    (
        "kv_string_length_past_eof",
        "general.architecture's string length points far past the end of the file",
        Expect.LLAMA_REJECT,
        "exceeds remaining file size",
        _metadata_patch(
            lambda lay: _string_value_offset(lay, "general.architecture"),
            lambda lay: struct.pack("<Q", 4 * lay.size),
        ),
    ),
    (
        "vocab_array_count_huge",
        "the vocabulary array claims 2**61 entries",
        Expect.LLAMA_REJECT,
        "failed to read key-value pairs",
        _metadata_patch(
            lambda lay: _array_count_offset(lay, "tokenizer.ggml.tokens"),
            lambda lay: struct.pack("<Q", 1 << 61),
        ),
    ),
    (
        "tensor_offset_past_eof",
        "the last tensor's data offset points past the end of the file",
        Expect.LLAMA_REJECT,
        "'output_norm.weight' has offset",
        _metadata_patch(
            lambda lay: _tensor_info_fields(lay, _last_tensor(lay))[2],
            lambda lay: struct.pack("<Q", 2 * lay.size),
        ),
    ),
    (
        "tensor_wrong_shape",
        "output_norm.weight declared [288] instead of [576]",
        Expect.LLAMA_REJECT,
        "'output_norm.weight' has wrong shape",
        _metadata_patch(
            lambda lay: _tensor_info_fields(lay, "output_norm.weight")[0],
            lambda lay: struct.pack("<Q", lay.tensor_dims["output_norm.weight"][0] // 2),
        ),
    ),
    (
        "tensor_too_many_dims",
        "output_norm.weight declared with 5 dimensions (ggml has at most 4)",
        Expect.LLAMA_REJECT,
        "invalid number of dimensions",
        _metadata_patch(
            lambda lay: _tensor_info_fields(lay, "output_norm.weight")[0] - 4,
            lambda lay: struct.pack("<I", 5),
        ),
    ),
    (
        "tensor_invalid_type",
        "output_norm.weight's ggml type set to 4 (a removed type)",
        Expect.LLAMA_REJECT,
        "'output_norm.weight' of type 4",
        _metadata_patch(
            lambda lay: _tensor_info_fields(lay, "output_norm.weight")[1],
            lambda lay: struct.pack("<I", INVALID_GGML_TYPE),
        ),
    ),
    (
        "block_count_plus_one",
        "llama.block_count 31 for a 30-layer file: a layer's tensors are missing",
        Expect.LLAMA_REJECT,
        "tensor 'blk.30.attn_norm.weight' not found",
        _metadata_patch(
            lambda lay: _scalar_value_offset(lay, "llama.block_count"), lambda lay: struct.pack("<I", 31)
        ),
    ),
    (
        "unknown_architecture",
        "general.architecture 'llamx'",
        Expect.LLAMA_REJECT,
        "unknown model architecture: 'llamx'",
        _build_unknown_architecture,
    ),
    (
        "missing_block_count",
        "llama.block_count removed (metadata rewritten with gguf.GGUFWriter)",
        Expect.LLAMA_REJECT,
        "key not found in model: llama.block_count",
        _build_missing_block_count,
    ),
]

DECODE_ABORT_VARIANT: Final = (
    "f16_output_norm",
    "output_norm.weight stored as F16: loads, aborts in llama_decode",
    Expect.DECODE_ABORT,
    "binary_op: unsupported types",
    _build_f16_output_norm,
)


def build_corpus(src: Path, out_dir: Path, names: set[str] | None = None) -> list[Variant]:
    """Write the load-failure variants (all, or those in ``names``) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lay = read_layout(src)
    out: list[Variant] = []
    for name, defect, expect, says, build in VARIANTS:
        if names is not None and name not in names:
            continue
        dst = out_dir / f"{name}.gguf"
        build(src, dst, lay)
        out.append(Variant(name, dst, defect, expect, says))
    return out


def build_decode_abort_model(src: Path, out_dir: Path) -> Variant:
    """The full-size variant that loads and then aborts llama.cpp at decode time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name, defect, expect, says, build = DECODE_ABORT_VARIANT
    dst = out_dir / f"{name}.gguf"
    build(src, dst, read_layout(src))
    return Variant(name, dst, defect, expect, says)


def main(argv: list[str]) -> int:
    from erllama.models import default_model_path

    out_dir = Path(argv[1]) if len(argv) > 1 else Path("gguf-corpus")
    src = default_model_path()
    variants = build_corpus(src, out_dir) + [build_decode_abort_model(src, out_dir)]
    for v in variants:
        st = v.path.stat()
        print(
            f"{v.name:28} {v.expect.value:14} size {st.st_size:>10}  on disk {st.st_blocks * 512:>10}  {v.defect}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
