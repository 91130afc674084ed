"""The reader's mappings of row files, kept across loads.

Mapping a row costs more than the round trip that names it: a fresh mapping of a 10 MB tmpfs or memfd
row takes ~150 page faults on first touch (tmpfs pages are 4 KiB unless the host enables shmem
huge pages), about as long again as copying the bytes. A process that loads the same row again (a
shared system prompt) reuses the mapping it already has, page tables and all; so does one that loads
a new row written into the file of a row that left a full tier (``storage``: files are reused).

Why this is safe:

- An entry holds its own read-only fd, so its inode stays the one it mapped, and is checked with
  ``fstat`` before each reuse (inode number and size as the daemon states them; the reader then
  checks the row's head and key as for any load).
- It is used only under a lease, and the daemon never changes or deletes a leased row. When it
  deletes a row it first truncates the file to zero, so an entry left behind holds no memory.
- Mappings are ``PROT_READ``: a stray write faults instead of silently diverging from the row.
- A view of a row keeps its mapping alive (``mmap.close`` refuses while one exists), however late
  the caller drops it.

Entries with no row open on them are unmapped when the cache is over ``MAX_MAPPINGS`` or
``MAX_MAPPED_BYTES``, and after ``IDLE_UNMAP_S`` unused (which also bounds how long a crashed daemon's
RAM rows, which it had no chance to truncate, stay pinned). Unmapping runs on a background thread:
tearing down a 100 MB mapping takes ~10 ms the loader need not wait for.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from erllama.cachestore.codec import CorruptRow
from erllama.protocol import CacheTier

log = logging.getLogger(__name__)

MAX_MAPPINGS: Final = 64
MAX_MAPPED_BYTES: Final = 8 * 1024**3
IDLE_UNMAP_S: Final = 60.0


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI), to read the address of a read-only buffer: ctypes'
    ``from_buffer`` insists on a writable one."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),  # a reference PyBuffer_Release drops; never read here
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def make_read_only(mm: mmap.mmap) -> None:
    """Turn a writable mapping read-only (``mprotect``): what a writer keeps of a row it stored."""
    if _libc.mprotect(_address_of(mm), len(mm), mmap.PROT_READ) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _address_of(mm: mmap.mmap) -> int:
    view = _PyBuffer()
    if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(mm), ctypes.byref(view), 0) != 0:
        raise BufferError("no buffer")
    try:
        return int(view.buf)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


@dataclass(slots=True, eq=False)
class RowMapping:
    """One read-only mapping of a row file and the fd that pins its inode."""

    tier: CacheTier
    ino: int
    fd: int
    mm: mmap.mmap
    address: int
    users: int = 0
    last_used: float = 0.0

    @property
    def length(self) -> int:
        return len(self.mm)

    def view(self, offset: int, length: int) -> memoryview:
        """A read-only view of ``length`` bytes at ``offset``. While any view (or a slice of one) is
        alive the mapping cannot be unmapped: ``mmap.close`` refuses, and the mapping goes with the
        last view instead."""
        return memoryview(self.mm)[offset : offset + length].toreadonly()

    def array(self, offset: int, length: int) -> ctypes.Array[ctypes.c_uint8]:
        """The same bytes as a ctypes array, for C callees (read-only memory: do not write). Unlike a
        view it does not keep the mapping alive: use it only while the row is open."""
        return (ctypes.c_uint8 * length).from_address(self.address + offset)


def _unmap(m: RowMapping) -> None:
    try:
        m.mm.close()  # munmap runs without the GIL
    except BufferError:
        log.debug("row mapping still viewed; it is unmapped with its last view")
    os.close(m.fd)


class MappingCache:
    """Process-wide cache of row mappings keyed by (tier, inode). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[CacheTier, int], RowMapping] = OrderedDict()
        self._bytes = 0
        self._pid = os.getpid()
        self._retired: queue.SimpleQueue[RowMapping] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def acquire(self, tier: CacheTier, path: str, ino: int, size: int) -> RowMapping:
        """A mapping of the row the daemon named (``path``, inode ``ino``, ``size`` bytes), reused when
        this process has one. Raises ``OSError`` if the path cannot be opened, ``CorruptRow`` if the
        file there is not that row."""
        with self._lock:
            self._after_fork()
            m = self._entries.get((tier, ino))
            if m is not None:
                st = os.fstat(m.fd)
                if st.st_ino == ino and st.st_size == size and m.length >= size:
                    self._entries.move_to_end((tier, ino))
                    m.users += 1
                    m.last_used = time.monotonic()
                    return m
                self._drop(m)  # the inode was truncated (deleted) or regrown: map it afresh
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_ino != ino or st.st_size != size:
                raise CorruptRow("the file at the row's path is not the row the store means")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        m = RowMapping(tier, ino, fd, mm, _address_of(mm), users=1, last_used=time.monotonic())
        with self._lock:
            self._insert(m)
        return m

    def adopt(self, tier: CacheTier, ino: int, fd: int, mm: mmap.mmap) -> None:
        """Keep a writer's (read-only by now) mapping of the row it just stored, with the fd it opened."""
        m = RowMapping(tier, ino, fd, mm, _address_of(mm), last_used=time.monotonic())
        with self._lock:
            self._after_fork()
            self._insert(m)

    def _insert(self, m: RowMapping) -> None:
        old = self._entries.pop((m.tier, m.ino), None)
        if old is not None:
            self._bytes -= old.length
            self._drop(old)
        self._entries[(m.tier, m.ino)] = m
        self._bytes += m.length
        self._ensure_unmapper()  # it also unmaps entries that sit idle
        self._trim(time.monotonic())

    def release(self, m: RowMapping) -> None:
        """A row opened on ``m`` was closed."""
        with self._lock:
            m.users -= 1
            m.last_used = time.monotonic()
            if self._entries.get((m.tier, m.ino)) is not m and m.users == 0:
                self._retire(m)  # dropped from the cache while it was in use
            self._trim(m.last_used)

    def clear(self) -> None:
        """Forget every entry: idle ones are unmapped before this returns (on this thread), the others
        when their rows close."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self._bytes = 0
        for m in entries:
            if m.users == 0:
                _unmap(m)

    def __len__(self) -> int:
        return len(self._entries)

    def _trim(self, now: float) -> None:
        for m in list(self._entries.values()):  # oldest first
            over = len(self._entries) > MAX_MAPPINGS or self._bytes > MAX_MAPPED_BYTES
            if not over and now - m.last_used < IDLE_UNMAP_S:
                break
            self._drop(m)

    def _drop(self, m: RowMapping) -> None:
        """Forget ``m`` and unmap it now if idle (else its last ``release`` does)."""
        if self._entries.get((m.tier, m.ino)) is m:
            del self._entries[(m.tier, m.ino)]
            self._bytes -= m.length
        if m.users == 0:
            self._retire(m)

    def _retire(self, m: RowMapping) -> None:
        self._ensure_unmapper()
        self._retired.put(m)

    def _ensure_unmapper(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._unmapper, name="cachestore-unmap", daemon=True)
            self._thread.start()

    def _unmapper(self) -> None:
        while True:
            try:
                m = self._retired.get(timeout=IDLE_UNMAP_S / 2)
            except queue.Empty:
                with self._lock:
                    self._trim(time.monotonic())
                continue
            _unmap(m)

    def _after_fork(self) -> None:
        """A forked child has its own copies of the parent's mappings and fds: it drops the idle ones
        and starts with an empty cache (and its own unmap thread)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        for m in self._entries.values():
            if m.users == 0:
                _unmap(m)
        self._entries.clear()
        self._bytes = 0
        self._retired = queue.SimpleQueue()
        self._thread = None


MAPPINGS: Final = MappingCache()
