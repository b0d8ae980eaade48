"""Shared-memory segments for the tensor transport (``multiprocessing.shared_memory``).

Who owns what (see docs/protocol.md, "Shared memory"):

* The **client** creates a segment per connection (:class:`ClientSegment`, an unguessable
  ``luna_<24 hex>`` name), registers it on that authenticated connection (op
  ``shm_register``) and unlinks it when the connection is dropped.
* The **daemon** attaches it by name only at registration (:meth:`SegmentTable.attach`,
  which checks the name format strictly and, on POSIX, that the opened object is a
  regular file of this user of exactly the claimed size), keeps it for that connection
  only and releases it (close + unlink) when the connection ends, whatever the reason:
  a SIGKILLed client cannot unlink its own segments, the daemon knows their names.

Every tensor descriptor that names a segment is checked against the size of the segment
registered on *that* connection (``protocol.decode_tensors``), so a client can never
make the daemon read or write outside memory it mapped for that client.

Nothing here does socket I/O or imports torch. Tensors are copied in and out with
``memoryview`` slice assignment (one single-threaded memcpy): torch's parallel ``copy_``
leaves its worker threads spinning after each copy, which on a 2-CPU machine steals the
CPU the other side of the exchange needs (measured: 2-3x slower exchanges).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import stat
import sys
import threading
import weakref
from multiprocessing import resource_tracker, shared_memory
from typing import Any

from luna_daemon.protocol import ALIGN, ErrorCode, LunaError, shown

log = logging.getLogger(__name__)

# 24 hex digits = 96 random bits; "luna_" + 24 = 29 chars: macOS caps POSIX shm names at
# 31 (PSHMNAMLEN), Linux at 255.
NAME_RE = re.compile(r"luna_[0-9a-f]{24}")
MIN_SEGMENT = 64 * 1024
# Client segments are whole multiples of this: every system's page size divides it (macOS
# arm64 has 16 KiB pages and may report a shared-memory object's size rounded up to them).
_GRANULE = 64 * 1024
# Requests whose tensors total less than this travel in the TCP body (a small copy costs
# less than the registration round trip and the descriptors); replies likewise.
DEFAULT_MIN_BYTES = 64 * 1024
_DEV_SHM = "/dev/shm"
# Python 3.13 added SharedMemory(track=...); before it, attaching registers the segment
# with this process's resource_tracker, which then unlinks it when *this* process exits
# (and warns about a "leak"): wrong for a segment someone else owns.
_HAS_TRACK = sys.version_info >= (3, 13)
# Segments this process created: attaching one of them in the same process (a daemon and
# its client in one process, as in tests) must not unregister the creator's tracking --
# the tracker keeps one entry per name, and it is what unlinks them if this process dies.
_created: set[str] = set()


class _SharedMemory(shared_memory.SharedMemory):
    """SharedMemory whose finalizer stays quiet while a result tensor still owns part of
    the mapping (at interpreter exit, say): the mapping then goes with that tensor."""

    def __del__(self) -> None:
        try:
            self.close()
        except (BufferError, OSError):
            pass


# Every live client segment, destroyed at exit: a client that exits without closing (a
# script, ComfyUI quitting) unlinks its names itself instead of leaving them to the
# resource_tracker, which would warn about "leaked" objects.
_live: weakref.WeakSet[ClientSegment] = weakref.WeakSet()


@atexit.register
def _destroy_all() -> None:
    for seg in list(_live):
        seg.destroy()


def new_name() -> str:
    return f"luna_{secrets.token_hex(12)}"


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _untrack(seg: shared_memory.SharedMemory) -> None:
    """Undo the resource_tracker registration that attaching (Python <= 3.12) or a
    failed unlink left behind, so that the tracker never unlinks or warns about it."""
    if os.name == "posix" and not _HAS_TRACK:
        try:
            resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 -- the tracker may already be gone at exit
            pass


def _close(seg: shared_memory.SharedMemory) -> None:
    try:
        seg.close()
    except BufferError:
        # A result tensor still owns a region of it (ClientSegment.lend): the mapping is
        # unmapped when the last such tensor is freed. Forget the mmap here so that
        # SharedMemory.__del__ does not try (and fail) again.
        seg._mmap = None  # type: ignore[attr-defined]
        log.debug("segment %s still lent to a tensor; unmapped when it is freed", seg.name)
    except OSError:
        pass


class ClientSegment:
    """A segment created (and owned) by a client for one connection.

    ``buf`` is a writable memoryview of all ``size`` bytes. :meth:`destroy` closes and unlinks
    it; if the process dies first, its resource_tracker unlinks it (and the daemon does
    when it sees the connection close).

    Results are handed to the caller by :meth:`lend`: a big result tensor *owns* its
    region of the segment (no copy out, no fresh pages to fault in: for a 388 MB video
    that is most of the cost), and :meth:`in_use` tells the client to take a new segment
    for the next call while such a tensor lives. Small results are copied out instead, so
    that a small tensor never pins a big segment."""

    def __init__(self, size: int):
        self.size = max(MIN_SEGMENT, -(-size // _GRANULE) * _GRANULE)
        self._seg = _SharedMemory(name=new_name(), create=True, size=self.size)
        self.name = self._seg.name.lstrip("/")
        _created.add(self.name)
        fd = getattr(self._seg, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            # Allocate every page now: on a full tmpfs (Docker's 64 MB /dev/shm) this fails
            # here with ENOSPC, instead of a SIGBUS when a page is first written, in the
            # daemon or here. The daemon refuses segments that are not fully allocated.
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError:
                self.destroy()
                raise
        # SharedMemory's own view, not a slice of it: a slice alive at interpreter exit
        # makes SharedMemory.__del__ fail with BufferError.
        self.buf: memoryview | None = self._seg.buf
        self._lent: list[weakref.ref] = []
        _live.add(self)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> memoryview:
        assert self.buf is not None
        return self.buf[key]

    def lend(self, offset: int, nbytes: int) -> Any:
        """A uint8 numpy array over the region, to become a result tensor
        (``torch.from_numpy``) that owns it; or None: copy it out (a region under half the
        segment). The array lives as long as any tensor made from it (torch keeps it as
        its storage's owner), and it keeps the mapping mapped (it holds a view of it)."""
        if self.buf is None or nbytes * 2 < self.size:
            return None
        import numpy

        arr = numpy.frombuffer(self.buf[offset:offset + nbytes], dtype=numpy.uint8)
        self._lent.append(weakref.ref(arr))
        return arr

    def in_use(self) -> bool:
        """Does a tensor still own a region lent from this segment?"""
        self._lent = [r for r in self._lent if r() is not None]
        return bool(self._lent)

    def destroy(self) -> None:
        """Close and unlink (idempotent). A region a tensor still owns stays mapped, and
        valid, until that tensor is freed."""
        if self not in _live:
            return
        _live.discard(self)
        self.buf = None
        _close(self._seg)
        try:
            self._seg.unlink()
        except FileNotFoundError:
            _untrack(self._seg)  # the daemon unlinked it first (its connection closed)
        except OSError:
            pass
        _created.discard(self.name)


class Attached:
    """A client's segment as the daemon maps it."""

    def __init__(self, name: str, seg: shared_memory.SharedMemory, size: int):
        self.name, self._seg, self.size = name, seg, size
        # The whole mapping (== size on Linux; on Windows/macOS it may be rounded up to
        # whole pages, all of them the client's): descriptors are checked against len(buf).
        self.buf: memoryview | None = seg.buf

    def release(self) -> None:
        """Unmap and unlink. Unlinking a segment the client still maps is harmless: its
        mapping stays valid; the name is gone, and with it every way to attach it again."""
        self.buf = None
        _close(self._seg)
        if os.name == "posix":
            try:
                # Not SharedMemory.unlink(): on Python <= 3.12 it also sends the tracker an
                # "unregister" for a name we already unregistered (the tracker then prints a
                # KeyError traceback), or, for a segment of this very process, removes the
                # creator's tracking. _posixshmem is the module SharedMemory itself uses.
                import _posixshmem  # type: ignore[import-not-found]

                _posixshmem.shm_unlink("/" + self.name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.debug("could not unlink segment %s: %s", self.name, exc)


class SegmentTable:
    """The daemon's attached segments, by name: one name is attached by at most one
    connection at a time (a client of another connection that learned the name cannot
    register it too). Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._names: set[str] = set()

    def attach(self, name: Any, size: Any) -> Attached:
        """Map the client's segment ``name`` of ``size`` bytes, after checking it.
        Raises LunaError(bad_args) with what to do; nothing stays mapped on failure."""
        if type(name) is not str or not NAME_RE.fullmatch(name):
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment name {shown(name)} is not 'luna_' + 24 lowercase hex digits")
        if type(size) is not int or not MIN_SEGMENT <= size <= self.max_bytes or size % ALIGN:
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment size {shown(size)} must be a multiple of {ALIGN} "
                            f"between {MIN_SEGMENT} and max_body_bytes={self.max_bytes}")
        with self._lock:
            if name in self._names:
                raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} is already registered on another connection; "
                                "create a new segment for each connection")
            self._names.add(name)
        try:
            return self._open(name, size)
        except BaseException:
            with self._lock:
                self._names.discard(name)
            raise

    def _open(self, name: str, size: int) -> Attached:
        before = None
        if sys.platform.startswith("linux"):
            # Check before opening (a FIFO or another user's object is never mapped) and
            # again on the descriptor we opened (the name could have been replaced between).
            try:
                before = os.lstat(os.path.join(_DEV_SHM, name))
            except FileNotFoundError:
                raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} does not exist (unlinked?); create and register a new one") from None
            except OSError as exc:
                raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} cannot be checked: {exc.strerror}") from None
            self._check_stat(name, before, size)
        try:
            seg = _SharedMemory(name=name, **({"track": False} if _HAS_TRACK else {}))
        except FileNotFoundError:
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} does not exist (unlinked?); create and register a new one") from None
        except (OSError, ValueError) as exc:
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} cannot be opened: {exc}") from None
        if name not in _created:
            _untrack(seg)  # right away: the tracker must never unlink a client's segment
        try:
            fd = getattr(seg, "_fd", -1)
            if os.name == "posix" and fd >= 0:
                st = os.fstat(fd)
                self._check_stat(name, st, size)
                if before is not None and (st.st_ino, st.st_dev) != (before.st_ino, before.st_dev):
                    raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} was replaced while it was registered")
            elif seg.size < size:  # Windows: the mapping's size, rounded up to pages
                raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} has {seg.size} bytes, not the {size} claimed")
            return Attached(name, seg, size)
        except BaseException:
            _close(seg)
            raise

    @staticmethod
    def _check_stat(name: str, st: os.stat_result, size: int) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} is not a shared-memory object")
        if st.st_uid != os.getuid():
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} belongs to another user")
        if st.st_size != size:
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} has {st.st_size} bytes, not the {size} claimed")
        if sys.platform.startswith("linux") and st.st_blocks * 512 < size:
            # Pages not allocated yet could fault (SIGBUS) on a full tmpfs when written.
            raise LunaError(ErrorCode.BAD_ARGS, f"shm segment {name} is not fully allocated (posix_fallocate it before registering)")

    def release(self, seg: Attached) -> None:
        seg.release()
        with self._lock:
            self._names.discard(seg.name)

    def count(self) -> int:
        with self._lock:
            return len(self._names)
