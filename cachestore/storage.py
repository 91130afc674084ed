"""Where row bytes live: memfds (RAM tier), files under /dev/shm (shm) and in the cache
directory (disk). Everything here is blocking I/O and runs on the daemon's I/O threads, never on the
loop that answers lookups; the loop owns the index and calls these with explicit locations.

Publication is crash-safe: a row is written to a temp (``<tier dir>/tmp/``), verified, fsynced when
the tier is the disk, then renamed to ``<tier dir>/<hex key>.kvr`` (atomic) and the directory fsynced.
A reader can only ever open a complete, verified row; a crash leaves at most a temp, deleted at start.
A RAM-tier row is a memfd. Readers keep their mappings of rows between loads (``mapping``), so:

- Deleting a row also truncates it to zero, on every tier: a reader's idle mapping of a deleted file
  must not hold its memory or disk space. (A row still leased when it is removed, one found corrupt
  while read, is unlinked without truncation.)
- A RAM or shm row leaving its tier can instead become the temp of the next row written there
  (``recycle``): the pages stay allocated and every reader that mapped the old row reads the new one
  through the page tables it already has, with no page faults. RAM rows are therefore not sealed:
  the daemon must be able to reuse them. A writer turns its mapping of the temp read-only before it
  commits (``PendingRow``), so it cannot change a row after verification either.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from erllama.cachestore.codec import (
    CHECKSUM_OFFSET,
    ROW_SUFFIX,
    USAGE_OFFSET,
    CorruptRow,
    RowHeader,
    encode_checksum,
    read_head,
    verify_fd,
)
from erllama.protocol import CacheTier, ErllamaError, ErrorCode
from erllama.transport import ensure_private_dir

log = logging.getLogger(__name__)

TMP_DIR_NAME: Final = "tmp"
COPY_CHUNK_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Location:
    """Where one row's bytes are: a path readers open (for RAM ``/proc/<pid>/fd/<memfd>``) and, for
    RAM, the memfd itself (owned by the daemon's index)."""

    tier: CacheTier
    path: str
    fd: int = -1
    ino: int = 0  # the inode: a reader checks it opened this row, a delete that the path still is it


@dataclass(frozen=True, slots=True)
class TempRow:
    """A row being written: ``fd`` open read-write, ``path`` what the writer opens."""

    tier: CacheTier
    path: str
    fd: int
    reused: bool = False  # the file of a row that left the tier (``recycle``)

    @property
    def ino(self) -> int:
        return os.fstat(self.fd).st_ino


def _memfd_path(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


def io_error(exc: OSError) -> ErllamaError:
    """The typed error for a failed filesystem operation."""
    code = ErrorCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.IO_ERROR
    return ErllamaError(code, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


class Storage:
    """Blocking operations on the tiers' bytes. Thread-safe: each call works on its own fds and names."""

    def __init__(self, shm_dir: Path | None, disk_dir: Path):
        self.dirs: dict[CacheTier, Path] = {CacheTier.DISK: disk_dir}
        if shm_dir is not None:
            self.dirs[CacheTier.SHM] = shm_dir

    def prepare(self, tier: CacheTier) -> None:
        """Create the tier's directories (0700) and delete every temp a previous life left behind."""
        ensure_private_dir(self.dirs[tier])
        tmp = self.dirs[tier] / TMP_DIR_NAME
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        ensure_private_dir(tmp)

    def final_path(self, tier: CacheTier, key: bytes) -> Path:
        return self.dirs[tier] / f"{key.hex()}{ROW_SUFFIX}"

    def _new_temp(self, tier: CacheTier, key: bytes, tag: str, size: int) -> TempRow:
        if tier is CacheTier.RAM:
            fd = os.memfd_create("erllama-row", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
            return TempRow(tier, _memfd_path(fd), fd)
        path = self._temp_path(tier, key, tag)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Allocate up front: on tmpfs a writer's store through a mapping past capacity is SIGBUS,
            # here it is a clean ENOSPC for the reservation instead.
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return TempRow(tier, str(path), fd)

    def _temp_path(self, tier: CacheTier, key: bytes, tag: str) -> Path:
        tmp = self.dirs[tier] / TMP_DIR_NAME
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)  # someone may have removed it under us
        return tmp / f"{key.hex()}.{tag}.tmp"

    def create_temp(
        self, tier: CacheTier, key: bytes, tag: str, size: int, head: bytes, reuse: Location | None = None
    ) -> TempRow:
        """A temp of ``size`` bytes with the row's head written (checksum still 0): ``reuse``, the
        location of a row that just left ``tier``, if given and still there, else a new file."""
        temp = self._recycle(reuse, key, tag, size) if reuse is not None else None
        if temp is None:
            temp = self._new_temp(tier, key, tag, size)
        try:
            os.pwrite(temp.fd, head, 0)
        except OSError:
            self.discard(temp)
            raise
        return temp

    def _recycle(self, loc: Location, key: bytes, tag: str, size: int) -> TempRow | None:
        """Turn an unindexed row's inode into a temp (its bytes past the head are stale until the
        writer overwrites them; the checksum at commit covers all of them). None if it is gone."""
        if loc.tier is CacheTier.RAM:
            temp = TempRow(loc.tier, loc.path, loc.fd, reused=True)
        else:
            try:
                fd = self._open_row(loc, os.O_RDWR)
            except OSError as exc:
                log.info("could not reuse %s (%s): writing a new temp", loc.path, exc)
                return None
            if fd is None:
                return None
            path = str(self._temp_path(loc.tier, key, tag))
            try:
                os.rename(loc.path, path)
            except OSError as exc:
                os.close(fd)
                log.info("could not reuse %s (%s): writing a new temp", loc.path, exc)
                return None
            temp = TempRow(loc.tier, path, fd, reused=True)
        fd = temp.fd
        try:
            os.ftruncate(fd, size)
            if loc.tier is not CacheTier.RAM:
                os.posix_fallocate(fd, 0, size)  # as for a new temp: ENOSPC now rather than SIGBUS later
        except OSError:
            self.discard(temp)
            raise
        return temp

    def discard(self, temp: TempRow) -> None:
        """Delete a temp. Not truncated: a writer whose reservation ended may still map it, and must
        not die of SIGBUS (readers' idle mappings of a reused one let go within ``IDLE_UNMAP_S``)."""
        os.close(temp.fd)
        if temp.tier is not CacheTier.RAM:
            try:
                os.unlink(temp.path)
            except FileNotFoundError:
                pass

    def publish(
        self,
        temp: TempRow,
        key: bytes,
        *,
        verify: bool = True,
        expected_crc: int | None = None,
        inline: tuple[int, memoryview] | None = None,
    ) -> tuple[Location, RowHeader]:
        """Verify the temp and make it the row ``key`` (atomically visible; durable on disk). ``inline`` =
        (payload offset, payload) writes a payload sent as a frame first. On any failure the temp is
        discarded and the error raised."""
        try:
            if inline is not None:
                offset, payload = inline
                if os.pwrite(temp.fd, payload, offset) != len(payload):
                    raise ErllamaError(ErrorCode.IO_ERROR, "short write of an inline payload")
                if expected_crc is not None:
                    os.pwrite(temp.fd, encode_checksum(expected_crc), CHECKSUM_OFFSET)
            # A copy of a verified row made by the kernel is not re-checked: that would double its cost.
            use_mmap = temp.tier is not CacheTier.DISK
            header = (
                verify_fd(temp.fd, key, use_mmap=use_mmap, expected_crc=expected_crc)
                if verify
                else read_head(temp.fd)
            )
            if temp.tier is CacheTier.RAM:
                return Location(temp.tier, temp.path, temp.fd, temp.ino), header
            if temp.tier is CacheTier.DISK:
                os.fsync(temp.fd)
            final = self.final_path(temp.tier, key)
            ino = temp.ino
            os.replace(temp.path, final)
            if temp.tier is CacheTier.DISK:
                self._fsync_dir(final.parent)
            os.close(temp.fd)
            return Location(temp.tier, str(final), ino=ino), header
        except BaseException:
            self.discard(temp)
            raise

    def _fsync_dir(self, path: Path) -> None:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def copy_row(
        self, src: Location, dest: CacheTier, key: bytes, size: int, usage: bytes, tag: str, *, verify: bool
    ) -> tuple[Location, RowHeader]:
        """Copy a row into another tier (promotion or demotion) with its current usage counters;
        ``verify`` when the source has not been verified in this daemon's life."""
        temp = self._new_temp(dest, key, tag, size)
        try:
            src_fd = src.fd if src.tier is CacheTier.RAM else os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy_fd(src_fd, temp.fd, size)
            finally:
                if src.tier is not CacheTier.RAM:
                    os.close(src_fd)
            os.pwrite(temp.fd, usage, USAGE_OFFSET)
        except BaseException:
            self.discard(temp)
            raise
        return self.publish(temp, key, verify=verify)

    def delete(self, loc: Location, truncate: bool = True) -> None:
        """Remove a row's bytes: truncated to zero (freeing them even where a reader still maps the
        file), then closed (RAM) or unlinked. ``truncate=False`` for a row someone still leases (one
        found corrupt while read): its reader keeps a valid mapping until it lets go."""
        if loc.tier is CacheTier.RAM:
            try:
                if truncate:
                    os.ftruncate(loc.fd, 0)
            finally:
                os.close(loc.fd)
            return
        fd = self._open_row(loc, os.O_WRONLY)
        if fd is None:
            return
        try:
            # Unlinked before it is truncated: a daemon killed in between must not leave an empty file
            # under a row's name (the restart would count it corrupt). The open fd still truncates it.
            os.unlink(loc.path)
        except FileNotFoundError:
            pass
        try:
            if truncate:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    @staticmethod
    def _open_row(loc: Location, flags: int) -> int | None:
        """The shm or disk file at ``loc.path`` opened with ``flags``, or None if it is gone or is no
        longer this row: the same key may have been stored again at that path since ``loc`` left the
        index. Other errors raise."""
        try:
            fd = os.open(loc.path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if loc.ino and os.fstat(fd).st_ino != loc.ino:
            os.close(fd)
            return None
        return fd

    def verify(self, loc: Location, key: bytes) -> RowHeader:
        """The full check of a stored row (first load after a restart, a reader's complaint)."""
        if loc.tier is CacheTier.RAM:
            return verify_fd(loc.fd, key, use_mmap=True)
        fd = os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return verify_fd(fd, key, use_mmap=loc.tier is CacheTier.SHM)
        finally:
            os.close(fd)

    def present(self, loc: Location, size: int) -> bool:
        """Cheap check before handing out a path: the file is still there with its size."""
        if loc.tier is CacheTier.RAM:
            return True
        try:
            return os.stat(loc.path).st_size == size
        except OSError:
            return False

    def read_row(self, loc: Location, size: int) -> bytearray:
        """The whole row as bytes (the inline fallback for readers that cannot map it)."""
        buf = bytearray(size)
        fd = loc.fd if loc.tier is CacheTier.RAM else os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            view, done = memoryview(buf), 0
            while done < size:
                n = os.preadv(fd, [view[done:]], done)
                if n == 0:
                    raise CorruptRow("row file shrank while it was read")
                done += n
        finally:
            if loc.tier is not CacheTier.RAM:
                os.close(fd)
        return buf

    def write_usage(self, items: list[tuple[str, bytes]]) -> None:
        """Write hit counts and last-use times back into row files (best effort: a lost update only
        makes a row look colder after a restart)."""
        for path, usage in items:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.pwrite(fd, usage, USAGE_OFFSET)
            except OSError as exc:
                log.debug("usage write to %s failed: %s", path, exc)
            finally:
                os.close(fd)

    def fs_free_bytes(self, tier: CacheTier) -> int:
        st = os.statvfs(self.dirs[tier])
        return st.f_bavail * st.f_frsize

    def scan(self, tier: CacheTier) -> tuple[list[tuple[RowHeader, Location]], int]:
        """Every valid row file of a tier (head, key and size checked; the payload checksum is checked
        on first load) and how many bad ones were deleted."""
        found: list[tuple[RowHeader, Location]] = []
        bad = 0
        with os.scandir(self.dirs[tier]) as it:
            for de in it:
                if not de.name.endswith(ROW_SUFFIX) or not de.is_file(follow_symlinks=False):
                    continue
                try:
                    fd = os.open(de.path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        header = read_head(fd)
                        st = os.fstat(fd)
                    finally:
                        os.close(fd)
                    if st.st_size != header.size or de.name != f"{header.key.hex()}{ROW_SUFFIX}":
                        raise CorruptRow("size or name does not match the row's header")
                    found.append((header, Location(tier, de.path, ino=st.st_ino)))
                except (CorruptRow, OSError) as exc:
                    log.warning("deleting bad row file %s: %s", de.path, exc)
                    bad += 1
                    try:
                        os.unlink(de.path)
                    except OSError:
                        pass
        return found, bad


def _copy_fd(src: int, dst: int, size: int) -> None:
    """Kernel-side copy of ``size`` bytes from offset 0 (sendfile), falling back to read/write."""
    done = 0
    try:
        while done < size:
            n = os.sendfile(dst, src, done, min(COPY_CHUNK_BYTES, size - done))
            if n == 0:
                raise CorruptRow("row file shrank while it was copied")
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or done:
            raise
    os.lseek(dst, 0, os.SEEK_SET)
    while done < size:
        chunk = os.pread(src, min(COPY_CHUNK_BYTES, size - done), done)
        if not chunk:
            raise CorruptRow("row file shrank while it was copied")
        os.pwrite(dst, chunk, done)
        done += len(chunk)
