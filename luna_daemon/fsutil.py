"""Files: atomic writes, and the one safe way to read a file a client named.

Reading (every model, LoRA, sidecar, config, tokenizer file, upload, config file):

* Only **regular files** are opened. A FIFO, socket or device node is refused *before*
  anything opens it (``stat``), and the opened descriptor is checked again (``fstat``: still
  a regular file, still the same inode), so a file swapped in between is caught too. The
  open itself is non-blocking: opening a FIFO could otherwise wait forever for a writer --
  and inside a library that holds the GIL while it waits (safetensors), freeze the process.
* **Sizes** are checked against the caller's budget from ``fstat`` before a byte is read;
  small files (sidecars, configs, tokenizer files, manifests) are capped at
  :data:`SMALL_FILE_CAP`.
* While :func:`confined_to` is active in a thread, every path checked here must resolve
  (symlinks followed) inside one of its roots, else ``forbidden_path``; the registry
  confines each model load and ``lora_load`` to the model roots.
* Every failure is a :class:`LunaError` with a code that says what to do
  (:func:`file_error`): ``not_found``, ``forbidden_path``, ``bad_args``, ``too_large``,
  ``model_error``; never a bare ``OSError``.

A library that opens files by name (safetensors, transformers, ComfyUI) is handed either
:attr:`RegularFile.os_path` -- on Linux ``/proc/self/fd/N``, which names exactly the open,
checked file -- or, where it needs the real name (ComfyUI picks its reader by the file
extension), the checked path while the checked descriptor is held open.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from luna_daemon.protocol import ErrorCode, LunaError

# Sidecar JSONs, configs, tokenizer files (a CLIP tokenizer.json is ~2-4 MB), manifests,
# the config file: generous for any real one, small enough that reading one is harmless.
SMALL_FILE_CAP = 16 * 1024 * 1024
# The safetensors library's own header limit; a larger header is not a safetensors file.
SAFETENSORS_MAX_HEADER = 100_000_000

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
# Linux: /proc/self/fd/N opens the very inode behind descriptor N, whatever its name is now.
_PROC_FD = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")
_WINERROR_CANT_RESOLVE_FILENAME = 1921  # Windows' symlink loop


# ----------------------------------------------------------------------------- writing
def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path`` and move it over ``path``.

    The temporary name is unique per thread, so concurrent writers of one path never
    share it; it is removed if anything fails."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- errors
def short(path: Any, limit: int = 400) -> str:
    """A path for a message: long ones (a 5,000-character name) are cut in the middle."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"


def file_error(exc: BaseException, path: Any, what: str = "file") -> LunaError:
    """The typed error for a failed file operation on ``path`` (``what`` names it)."""
    if isinstance(exc, LunaError):
        return exc
    p = short(path)
    if isinstance(exc, ValueError):  # embedded NUL, unencodable surrogates
        return LunaError(ErrorCode.BAD_ARGS, f"{what} path {p!r} cannot be used: {exc}")
    if not isinstance(exc, OSError):
        return LunaError(ErrorCode.MODEL_ERROR, f"{what} {p}: {type(exc).__name__}: {exc}")
    code = exc.errno
    if code == errno.ENOENT:
        return LunaError(ErrorCode.NOT_FOUND, f"{what} not found: {p}")
    if code == errno.ENOTDIR:
        return LunaError(ErrorCode.NOT_FOUND, f"{what} not found: {p} (a part of the path is a file, not a folder)")
    if code == errno.ELOOP or getattr(exc, "winerror", None) == _WINERROR_CANT_RESOLVE_FILENAME:
        return LunaError(ErrorCode.BAD_ARGS, f"{what} {p}: too many levels of symbolic links (a symlink loop); fix the link")
    if code == errno.ENAMETOOLONG:
        return LunaError(ErrorCode.BAD_ARGS, f"{what} path is too long for the file system: {p}")
    if code == errno.EISDIR:
        return LunaError(ErrorCode.BAD_ARGS, f"{what} {p} is a folder; point at the file")
    if code in (errno.EACCES, errno.EPERM):
        return LunaError(ErrorCode.FORBIDDEN_PATH, f"the daemon may not read {p} (permission denied); "
                                                   f"make it readable by the user the daemon runs as")
    if code in (errno.ENXIO, getattr(errno, "EOPNOTSUPP", -1), getattr(errno, "ENODEV", -1)):
        return LunaError(ErrorCode.BAD_ARGS, f"{what} {p} is not a regular file; only regular files are read")
    return LunaError(ErrorCode.MODEL_ERROR, f"{what} {p}: cannot read: {exc.strerror or exc}")


@contextmanager
def errors_as(cls: type[LunaError]) -> Iterator[None]:
    """Re-raise a :class:`LunaError` from inside as ``cls`` (same code and message) -- for a
    layer that promises its own subclass (the engines' ``EngineError``). Also a decorator."""
    try:
        yield
    except LunaError as exc:
        if isinstance(exc, cls):
            raise
        raise cls(exc.code, exc.message) from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _require_regular(st: os.stat_result, path: Any, what: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise LunaError(ErrorCode.BAD_ARGS, f"{what} {short(path)} is a folder; point at the file")
    raise LunaError(ErrorCode.BAD_ARGS, f"{what} {short(path)} is {_kind(st.st_mode)}, not a regular file; "
                                        f"only regular files are read")


def _require_size(size: int, path: Any, what: str, max_bytes: int | None, limit_name: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise LunaError(ErrorCode.TOO_LARGE, f"{what} {short(path)} is {size / 1e6:.1f} MB, more than "
                                             f"{limit_name} ({max_bytes / 1e6:.1f} MB)")


# ----------------------------------------------------------------------------- confinement
_confinement = threading.local()


@contextmanager
def confined_to(roots: Sequence[Path]) -> Iterator[None]:
    """While active in this thread, every path this module checks must resolve inside one
    of ``roots`` (already resolved folders) -- ``forbidden_path`` otherwise. Nests: the
    innermost confinement applies."""
    outer = getattr(_confinement, "roots", None)
    _confinement.roots = tuple(roots)
    try:
        yield
    finally:
        _confinement.roots = outer


def within(real: Path, roots: Sequence[Path]) -> bool:
    """``real`` (a resolved path) is one of ``roots`` or lies below one."""
    return any(real == r or r in real.parents for r in roots)


def real_path(path: Any, what: str = "file") -> Path:
    """``path`` with every symlink resolved (as far as it exists), as an absolute path."""
    try:
        return Path(os.path.realpath(os.fspath(path)))
    except (OSError, ValueError) as exc:
        raise file_error(exc, path, what) from None


def check_inside(path: Any, what: str = "file") -> Path:
    """The resolved ``path``; ``forbidden_path`` if a confinement is active and it leaves the roots."""
    real = real_path(path, what)
    roots = getattr(_confinement, "roots", None)
    if roots is not None and not within(real, roots):
        shown = short(path) if str(path) == str(real) else f"{short(path)} (-> {short(real)})"
        raise LunaError(ErrorCode.FORBIDDEN_PATH, f"{what} {shown} is outside the configured model_roots "
                                                  f"({', '.join(map(str, roots))}); a symlink may not lead out of them")
    return real


def present(path: Any, what: str = "file") -> bool:
    """Whether anything (a file, folder, FIFO, dangling link ...) is at ``path``.

    Optional files (sidecars, configs) are read when *present*, so a FIFO or a link out of
    the roots under such a name is reported instead of silently skipped."""
    try:
        os.lstat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as exc:
        raise file_error(exc, path, what) from None


def is_folder(path: Any, what: str = "folder") -> bool:
    """``path`` is (or links to) a folder inside the roots. Nothing there, or a file: False.
    Never raises for a missing path; a link out of the roots is ``forbidden_path``."""
    if not present(path, what):
        return False
    real = check_inside(path, what)
    try:
        return stat.S_ISDIR(os.stat(real).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as exc:
        raise file_error(exc, path, what) from None


def stat_regular(path: Any, what: str = "file", *, max_bytes: int | None = None,
                 limit_name: str = "the limit") -> os.stat_result:
    """``stat`` of ``path``, which must be a regular file (inside the roots when confined)
    of at most ``max_bytes``; nothing is opened."""
    return _stat_regular(path, what, max_bytes, limit_name)[1]


def _stat_regular(path: Any, what: str, max_bytes: int | None, limit_name: str) -> tuple[Path, os.stat_result]:
    real = check_inside(path, what)
    try:
        st = os.stat(real)
    except (OSError, ValueError) as exc:
        raise file_error(exc, path, what) from None
    _require_regular(st, path, what)
    _require_size(st.st_size, path, what, max_bytes, limit_name)
    return real, st


# ----------------------------------------------------------------------------- reading
@dataclass
class RegularFile:
    """An open, checked regular file (see :func:`open_regular`)."""

    path: Path   # as the caller named it
    real: Path   # resolved
    fd: int
    size: int

    @property
    def os_path(self) -> str:
        """A name that opens this very file (``/proc/self/fd/N`` on Linux, else the real path)."""
        return f"/proc/self/fd/{self.fd}" if _PROC_FD else str(self.real)

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer only at the end of the file)."""
        os.lseek(self.fd, offset, os.SEEK_SET)
        chunks, left = [], n
        while left > 0:
            chunk = os.read(self.fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The whole file from the start, ``size`` bytes at a time (constant memory)."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        while True:
            chunk = os.read(self.fd, size)
            if not chunk:
                return
            yield chunk


@contextmanager
def open_regular(path: Any, what: str = "file", *, max_bytes: int | None = None,
                 limit_name: str = "the limit") -> Iterator[RegularFile]:
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes``.

    Checked before opening (``stat``) and after (``fstat``: regular, same inode as
    checked, size), opened non-blocking. The descriptor is closed when the block ends."""
    real, st = _stat_regular(path, what, max_bytes, limit_name)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except (OSError, ValueError) as exc:
        raise file_error(exc, path, what) from None
    try:
        st2 = os.fstat(fd)
        _require_regular(st2, path, what)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise LunaError(ErrorCode.MODEL_ERROR, f"{what} {short(path)} was replaced while it was being opened; retry")
        _require_size(st2.st_size, path, what, max_bytes, limit_name)
        yield RegularFile(Path(path), real, fd, st2.st_size)
    finally:
        os.close(fd)


def read_small(path: Any, what: str = "file", cap: int = SMALL_FILE_CAP) -> bytes:
    """The whole content of a small regular file (at most ``cap`` bytes, else ``too_large``)."""
    shown = f"{cap / (1024 * 1024):g} MiB" if cap >= 1024 * 1024 else f"{cap} bytes"
    with open_regular(path, what, max_bytes=cap, limit_name=f"the {shown} limit for such files") as f:
        try:
            return f.read_at(0, f.size)
        except OSError as exc:
            raise file_error(exc, path, what) from None


def read_json(path: Any, what: str = "file", cap: int = SMALL_FILE_CAP) -> Any:
    """Parsed JSON of a small regular file; invalid JSON is ``model_error``."""
    try:
        return json.loads(read_small(path, what, cap).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LunaError(ErrorCode.MODEL_ERROR, f"{what} {short(path)} is not valid JSON: {exc}") from None


def check_folder_files(folder: Any, what: str = "file") -> None:
    """Every file in ``folder`` (recursively) is a regular file, inside the roots when
    confined -- for a folder a library reads by name. Links to folders must stay inside the
    roots too; they are not descended into (the library reads a few known names)."""
    try:
        walker = list(os.walk(folder, followlinks=False, onerror=_raise))
    except (OSError, ValueError) as exc:
        raise file_error(exc, folder, what) from None
    for top, dirs, files in walker:
        for name in dirs:
            p = Path(top) / name
            if os.path.islink(p):
                check_inside(p, what)
        for name in files:
            stat_regular(Path(top) / name, what)


def _raise(exc: OSError) -> None:
    raise exc


# ----------------------------------------------------------------------------- safetensors
# Bits per element of every dtype the safetensors format defines (sub-byte ones included).
_ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header. ``tensors``: name -> (dtype, shape, start, end), the
    offsets relative to the data section, which starts at byte ``data_start`` of the file."""

    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]
    metadata: dict[str, str]
    data_start: int

    def nbytes(self, names: Any = None) -> int:
        """Bytes of the named tensors' data (all tensors when ``names`` is None)."""
        keys = self.tensors if names is None else names
        return sum(self.tensors[k][3] - self.tensors[k][2] for k in keys)


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def safetensors_header(read_at: Callable[[int, int], bytes], total_size: int) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file of ``total_size`` bytes.

    The checks are the safetensors library's own: an 8-byte little-endian header length
    within the file and the library's limit, a UTF-8 JSON object, known dtypes, shapes of
    non-negative ints, and data offsets that tile the data section exactly (no gap, no
    overlap, nothing past the end, each span = elements x dtype size). Raises ValueError
    saying what is wrong; only the header is read (``read_at(offset, n)``)."""
    if total_size < 8:
        raise ValueError(f"{total_size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    if n < 2 or n > SAFETENSORS_MAX_HEADER:
        raise ValueError(f"header length {n} is not a safetensors header (at most {SAFETENSORS_MAX_HEADER})")
    if 8 + n > total_size:
        raise ValueError(f"header length {n} runs past the end of the {total_size}-byte file (truncated?)")
    raw = read_at(8, n)
    if len(raw) != n:
        raise ValueError("the file ended inside the header (truncated?)")
    if raw[:1] != b"{":
        raise ValueError("the header is not a JSON object")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("the header is not a JSON object")  # noqa: TRY004 - a malformed file, not a caller's bug
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("__metadata__ must map strings to strings")
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r}: entry is not an object")  # noqa: TRY004 - a malformed file
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPE_BITS:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
            raise ValueError(f"tensor {name!r}: shape must be a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_nonneg_int(o) for o in offsets):
            raise ValueError(f"tensor {name!r}: data_offsets must be two non-negative integers")
        tensors[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    data_len = total_size - 8 - n
    cursor = 0
    for name, (dtype, shape, start, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != cursor or end < start:
            raise ValueError(f"tensor {name!r}: data_offsets [{start}, {end}] leave a gap or overlap another tensor")
        elements = 1
        for d in shape:
            elements *= d
        bits = elements * _ST_DTYPE_BITS[dtype]
        if bits % 8 or end - start != bits // 8:
            raise ValueError(f"tensor {name!r}: {end - start} bytes do not hold shape {list(shape)} of {dtype}")
        cursor = end
    if cursor != data_len:
        raise ValueError(f"the tensors cover {cursor} bytes but the file holds {data_len} data bytes (truncated or padded?)")
    return SafetensorsHeader(tensors, dict(metadata), 8 + n)


def safetensors_header_of(data: bytes | bytearray | memoryview) -> SafetensorsHeader:
    """:func:`safetensors_header` of a safetensors serialisation held in memory."""
    view = memoryview(data).cast("B")
    return safetensors_header(lambda off, n: bytes(view[off:off + n]), len(view))
