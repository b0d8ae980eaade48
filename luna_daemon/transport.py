"""Blocking socket I/O shared by the server and the client (no protocol logic).

:class:`Channel` wraps one connected socket. ``read_frame`` reads one frame with two
clocks: ``idle_timeout`` for the first byte (a connection may sit idle between requests)
and ``frame_timeout`` for the rest once a frame has started (a slow-loris peer cannot
hold a thread forever). Lengths are validated by :func:`protocol.parse_prefix` *before*
the header and body buffers are allocated, and a reader that passes ``admit`` sees the
decoded header of a frame with a body before any body buffer exists (the server refuses
bodies of unauthenticated requests there). torch is imported only to receive a big body.

Speed matters here (``ping`` must stay within 2x the raw loopback round trip):

* a small receive buffer lets one ``recv`` pick up prefix + header (+ a small body) of a
  frame; large bodies are received straight into their final buffer with one
  ``recv_into(..., MSG_WAITALL)`` (POSIX; no ``data += chunk`` copying, no syscall per
  arriving batch), and on Linux with the socket's wake-up threshold (``SO_RCVLOWAT``)
  raised to 1 MiB while more than 2 MiB is still due (see ``_LOWAT``);
* between a frame's first bytes and the receive of its big body only the prefix is
  checked and the buffer chosen; the frame is decoded while the body's last MiB is
  still arriving (see ``read_frame``);
* on POSIX the socket stays in blocking mode and the timeouts are the kernel's
  ``SO_RCVTIMEO`` / ``SO_SNDTIMEO``, set only when they change (Python's ``settimeout``
  would add a ``poll`` syscall before every ``recv``); small answers leave with one
  non-blocking ``send``, big ones with a blocking scatter-gather ``sendmsg`` of the header
  and the tensors' own memory;
* ``peer_gone`` (before every pooled call) is one ``poll(0)`` that raises nothing.
"""

from __future__ import annotations

import errno
import math
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from luna_daemon import protocol
from luna_daemon.protocol import Frame, Limits, Prefix

# admit(prefix, header): called before a frame's body is received; raises to refuse it.
Admit = Callable[[Prefix, dict[str, Any]], None]

_BUF = 64 * 1024
_KERNEL_TIMEOUTS = sys.platform != "win32" and hasattr(socket, "SO_RCVTIMEO")
# Big bodies are received with MSG_WAITALL where the kernel enforces the deadline
# (SO_RCVTIMEO bounds the whole call, not each wait): one syscall fills the final buffer
# instead of one per arriving batch (~40 for a 12 MB image on loopback). Elsewhere
# recv_into takes at most _CHUNK per call: it keeps deadline checks responsive and avoids
# WSAENOBUFS on Windows for huge single receives.
_WAITALL = socket.MSG_WAITALL if _KERNEL_TIMEOUTS and hasattr(socket, "MSG_WAITALL") else 0
_CHUNK = 1024**3 if _WAITALL else 8 * 1024 * 1024
# While a big body arrives, a receiver asleep in recv is woken for every batch of
# segments the sender queues (on loopback every ~64 KiB): each wake-up costs the sending
# CPU an inter-processor interrupt (a VM exit on a VM) and the receiver a context switch.
# With SO_RCVLOWAT at 1 MiB the kernel wakes it only once that much is queued: a 12 MB
# body took ~30% less time on the 2-vCPU VM (luna-daemon bench, raw sockets both ways).
# The threshold is raised only while more than 2x its value is still due and never
# covers a body's last _LOWAT bytes, so no wait can be for bytes that will not come
# (EOF, errors and SO_RCVTIMEO wake the receiver regardless); it is back at 1 before
# the next frame is read. Linux only: other systems' SO_RCVLOWAT differ (or refuse it).
_LOWAT = 1024 * 1024 if _WAITALL and sys.platform.startswith("linux") and hasattr(socket, "SO_RCVLOWAT") else 0
_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)
_REUSE_MAX = 64 * 1024 * 1024  # the biggest body buffer a channel keeps for reuse


def _storage_use_count() -> Callable[[Any], int] | None:
    """How many tensors (views, numpy arrays) share a tensor's storage, or None where this
    torch lacks the (internal) counter: then body buffers are never reused."""
    try:
        import torch

        count = torch._C._storage_Use_Count
        probe = torch.empty(1, dtype=torch.uint8)
        base = count(probe.untyped_storage()._cdata)
        view = probe[:]
        if count(probe.untyped_storage()._cdata) != base + 1:
            return None
        del view
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return None
    return lambda t: count(t.untyped_storage()._cdata)


_use_count: Any = False  # False: not looked up yet (it needs torch: the first big body does it)


def _counter() -> Callable[[Any], int] | None:
    global _use_count
    if _use_count is False:
        _use_count = _storage_use_count()
    return _use_count


# A non-blocking peek where the platform has MSG_DONTWAIT (not Windows).
_PEEK_NOWAIT = (socket.MSG_PEEK | socket.MSG_DONTWAIT) if hasattr(socket, "MSG_DONTWAIT") else None


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Can ``sock`` be read (data or EOF) within ``timeout`` seconds?

    ``poll`` where it exists: ``select`` fails for descriptor numbers over FD_SETSIZE
    (1024), which a client inside a busy ComfyUI process can reach."""
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(sock, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
        return bool(p.poll(max(0, math.ceil(timeout * 1000))))
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop the first ``sent`` bytes from ``views`` (what one sendmsg took)."""
    while sent and views:
        if sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


class PeerClosed(ConnectionError):
    """The peer closed the connection cleanly between frames."""


class FrameTimeout(TimeoutError):
    """A frame did not arrive completely within ``frame_timeout``."""


class IdleTimeout(TimeoutError):
    """No frame started within ``idle_timeout``."""


def _timeval(seconds: float | None) -> bytes:
    if seconds is None:
        return struct.pack("ll", 0, 0)  # 0 = no timeout
    seconds = max(seconds, 0.001)  # 0 would mean "forever"
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))


class Channel:
    """One connected socket plus a receive buffer. Not thread-safe (one user at a time)."""

    def __init__(self, sock: socket.socket, *, reuse_bodies: bool = False):
        """``reuse_bodies`` (the client): receive the next big body of the same size into
        the last one's buffer when nothing aliases it any more (see ``_body_buffer``)."""
        self.sock = sock
        self._reuse = reuse_bodies
        self._rx: Any = None  # (uint8 tensor, its storage's use count when unaliased) or None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray(_BUF)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._rcv: float | None | bool = False  # False = never set
        self._asked: float | None | bool = False  # last value asked of _recv_timeout
        self._poll: Any = None  # select.poll object for peer_gone, made on first use
        self._snd: float | None | bool = False  # SO_SNDTIMEO now set (False = never set)
        self._lowat = 1  # SO_RCVLOWAT now set (the kernel's default: 1)
        self._lowat_max = _LOWAT  # 0: not used on this socket
        if _KERNEL_TIMEOUTS:
            sock.settimeout(None)

    # ------------------------------------------------------------ timeouts
    def _recv_timeout(self, seconds: float | None) -> None:
        if seconds == self._asked:  # the idle timeout: the same value on every frame
            return
        self._asked = seconds
        if _KERNEL_TIMEOUTS:
            # Round so that a shrinking deadline does not cost a syscall per recv.
            rounded = None if seconds is None else max(0.001, round(seconds, 2))
            if rounded != self._rcv:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(rounded))
                self._rcv = rounded
        else:
            self.sock.settimeout(seconds)

    def _recv_into(self, view: memoryview, flags: int = 0) -> int:
        try:
            return self.sock.recv_into(view, 0, flags)
        except (socket.timeout, BlockingIOError):
            raise TimeoutError from None
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise TimeoutError from None
            raise

    # ------------------------------------------------------------ reading
    def _fill(self, deadline: float | None) -> None:
        """Receive at least one more byte into the buffer."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameTimeout("frame not complete before frame_timeout")
            self._recv_timeout(remaining)
        try:
            k = self._recv_into(self._view[self._end:])
        except TimeoutError:
            raise FrameTimeout("frame not complete before frame_timeout") from None
        if k == 0:
            raise ConnectionResetError("peer closed the connection mid-frame")
        self._end += k

    def _read_exact_into(self, view: memoryview, deadline: float | None,
                         tail: Callable[[], None] | None = None) -> None:
        """Fill ``view`` from the buffer and the socket by ``deadline``. ``tail``, if given,
        is called once when the raised wake-up threshold ends, i.e. with the last
        _LOWAT bytes of a big body still on their way (not at all for smaller bodies)."""
        n = len(view)
        got = min(n, self._end - self._start)
        if got:
            view[:got] = self._view[self._start:self._start + got]
            self._start += got
        try:
            while got < n:
                remaining_bytes = n - got
                if remaining_bytes < _BUF // 2:
                    # (never with a raised threshold: a raised call stops _LOWAT > _BUF // 2 short)
                    self._fill(deadline)
                    k = min(remaining_bytes, self._end - self._start)
                    view[got:got + k] = self._view[self._start:self._start + k]
                    self._start += k
                    got += k
                    continue
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise FrameTimeout(f"frame not complete before frame_timeout ({got}/{n} bytes)")
                    self._recv_timeout(left)
                end = got + _CHUNK
                if remaining_bytes >= 2 * self._lowat_max > 0:
                    # This call stops _LOWAT short of the end: at every wait inside it more
                    # than _LOWAT bytes are still due, so the raised threshold is reached.
                    end = min(end, n - self._lowat_max)
                    if self._lowat != self._lowat_max:
                        self._set_lowat(self._lowat_max)
                elif self._lowat != 1:
                    self._set_lowat(1)
                    if tail is not None:
                        tail()
                        tail = None
                try:
                    k = self._recv_into(view[got:end], _WAITALL)
                except TimeoutError:
                    raise FrameTimeout(f"frame not complete before frame_timeout ({got}/{n} bytes)") from None
                if k == 0:
                    raise ConnectionResetError(f"peer closed the connection mid-frame ({got}/{n} bytes)")
                got += k
        finally:
            if self._lowat != 1:  # between frames it is always 1 (a ping must wake at once)
                self._set_lowat(1)

    def _set_lowat(self, n: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        except OSError:  # closed, or a kernel / sandbox without it: not used again here
            self._lowat_max = 0
            return
        self._lowat = n

    def read_frame(self, limits: Limits, *, idle_timeout: float | None, frame_timeout: float | None,
                   admit: Admit | None = None, segments: protocol.Segments = None) -> Frame:
        """Read one complete frame. Raises PeerClosed, IdleTimeout, FrameTimeout,
        ConnectionError, or LunaError for an invalid frame (before reading its body).

        ``admit(prefix, header)``, if given, is called for every frame that has a body,
        with the decoded (not yet marker-resolved) header, before the body is received:
        whatever it raises propagates and the rest of the frame is left unread (the
        caller must close the connection). A small frame may already sit whole in the
        64 KiB receive buffer by then; no body buffer has been allocated for it.

        ``segments``: the shared-memory segments a descriptor may name (see
        ``protocol.decode_tensors``); None: none may."""
        if self._start == self._end:
            self._start = self._end = 0
            if idle_timeout != self._asked:  # (inlined: the same value on every frame)
                self._recv_timeout(idle_timeout)
            try:
                k = self.sock.recv_into(self._view)
            except (socket.timeout, BlockingIOError):
                raise IdleTimeout("connection idle") from None
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise IdleTimeout("connection idle") from None
                raise
            if k == 0:
                raise PeerClosed("peer closed the connection")
            self._end = k
        # The frame clock starts with the frame's first byte; monotonic() is only read
        # when the frame did not arrive with that first recv (the usual small frame does).
        deadline = None
        if self._end - self._start < protocol.PREFIX_SIZE:
            deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
            while self._end - self._start < protocol.PREFIX_SIZE:
                self._fill(deadline)
        pre = protocol.parse_prefix(self._buf, limits, self._start)
        start = self._start + protocol.PREFIX_SIZE
        end = start + pre.header_len
        if end + pre.body_len <= self._end and pre.body_len < _BUF // 2:
            # The usual small frame: prefix, header and body all came in the buffer.
            header_bytes = self._buf[start:end]
            body = self._buf[end:end + pre.body_len]
            self._start = end + pre.body_len
            if admit is None or not pre.body_len:  # ping and other control ops: one decode
                return protocol.decode_frame(pre, header_bytes, body, None, segments)
            header = protocol.decode_header(header_bytes)
            admit(pre, header)
            return protocol.decode_frame(pre, header_bytes, body, header, segments)
        if deadline is None and frame_timeout is not None:
            deadline = time.monotonic() + frame_timeout
        self._start = start
        if end <= self._end:
            header_bytes = self._buf[start:end]
            self._start = end
        else:
            header_bytes = bytearray(pre.header_len)
            self._read_exact_into(memoryview(header_bytes), deadline)
        header = None
        if admit is not None and pre.body_len:
            header = protocol.decode_header(header_bytes)
            admit(pre, header)
        if not pre.body_len:
            return protocol.decode_frame(pre, header_bytes, bytearray(), header, segments)
        # Nothing more before the body is received: a receiver that starts reading a big
        # body late -- ~0.3 ms of Python, as decoding the frame first took -- made the
        # whole 12 MB transfer ~1 ms slower on loopback (the kernel's receive-window
        # dynamics; raw sockets, the benchmark's placements), far more than the work
        # itself. Late in the body it is the other way round: the frame is decoded while
        # its last MiB is on its way (``tail``), which hides the decoding (~0.1 ms on
        # caches the copy has just flushed) instead of adding it after the last byte.
        # A decode error is raised only once the whole body is in, so the peer reads the
        # error answer instead of a reset of a connection it is still sending on.
        body = self._body_buffer(pre.body_len)
        done: list = []

        def decode() -> None:
            try:
                done.append(protocol.decode_frame(pre, header_bytes, body, header, segments))
            except protocol.LunaError as exc:
                done.append(exc)

        self._read_exact_into(memoryview(body.numpy()), deadline, decode)
        if not done:
            decode()
        if isinstance(done[0], protocol.LunaError):
            raise done[0]
        return done[0]

    def _body_buffer(self, n: int) -> Any:
        """A uint8 tensor of ``n`` bytes to receive a body into. Not zero-filled (a
        bytearray would be): every byte is received, and the frame is dropped if any is
        missing.

        With ``reuse_bodies``, the previous body's buffer when it has the same size and no
        tensor, view or numpy array aliases its storage any more (the caller dropped the
        last result): a fresh 12 MB buffer costs page faults on every receive, and glibc
        may return it to the kernel on every free. A result the caller still holds keeps
        its buffer (a new one is made), so results stay valid after later calls."""
        import torch  # only a big body needs it (a no-op once imported)

        count = _counter() if self._reuse else None
        rx, self._rx = self._rx, None
        if rx is not None and count is not None and rx[0].numel() == n and count(rx[0]) == rx[1]:
            body = rx[0]
        else:
            body = torch.empty(n, dtype=torch.uint8)
        if count is not None and n <= _REUSE_MAX:  # bounded: one such buffer per channel
            self._rx = (body, count(body))
        return body

    def wait_readable(self, check: Callable[[], None], deadline: float | None, interval: float = 0.1) -> None:
        """Block until data can be read, calling ``check()`` about every ``interval``
        seconds; whatever ``check`` raises propagates (the caller abandons the frame).
        Raises IdleTimeout when ``deadline`` (monotonic) passes first."""
        while self._start == self._end:
            check()
            wait = interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise IdleTimeout("no answer before the deadline")
            if _readable(self.sock, wait):
                return

    def peer_gone(self) -> bool:
        """Non-blocking check: has the peer closed its end? (Buffered data = still there.)"""
        if self._end > self._start:
            return False
        try:
            # The client checks every pooled connection before reuse, so this is on every
            # call's path. The usual answer (nothing to read: the peer is there) costs one
            # poll(0) on a poll object kept per channel: a MSG_PEEK | MSG_DONTWAIT recv
            # is one syscall too, but raises BlockingIOError then (2.5x the cost).
            if self._poll is None:
                if not hasattr(select, "poll"):
                    if not _readable(self.sock, 0):
                        return False
                    return self.sock.recv(1, socket.MSG_PEEK) == b""
                self._poll = select.poll()
                self._poll.register(self.sock, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
            if not self._poll.poll(0):
                return False
            if _PEEK_NOWAIT is not None:
                return self.sock.recv(1, _PEEK_NOWAIT) == b""
            # poll said readable, so this recv cannot block.
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):  # ValueError: the socket was closed (fileno -1)
            return True

    # ------------------------------------------------------------ writing
    def send(self, buffers: list, timeout: float | None) -> None:
        """Send every buffer in order within ``timeout`` seconds (socket.timeout past it);
        big tensor buffers are not copied.

        Small frames go out with one non-blocking ``send`` (they fit the socket buffer
        unless the peer stopped reading). On POSIX the rest is a blocking scatter-gather
        ``sendmsg`` of the header and the tensors' own memory, bounded by a kernel
        ``SO_SNDTIMEO``: the kernel sleeps until the peer has drained the socket buffer,
        where a Python timeout would return to poll() for every buffer's worth (~4 times
        per 12 MB image). The small sends pass MSG_DONTWAIT, so the send timeout never
        touches them. Windows keeps Python's poll-based socket timeout.
        """
        if _KERNEL_TIMEOUTS and len(buffers) == 1 and len(buffers[0]) <= _BUF:
            # The common small answer (header only): one syscall, no list building.
            data = buffers[0]
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            views = [memoryview(data).cast("B")[sent:]]
        else:
            views = [m for m in (memoryview(b).cast("B") for b in buffers) if m.nbytes]
        total = sum(v.nbytes for v in views)
        if _KERNEL_TIMEOUTS and total <= _BUF and len(views) > 1:
            data = b"".join(views)
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == total:
                return
            views = [memoryview(data)[sent:]]
        if _KERNEL_TIMEOUTS:
            self._send_blocking(views, timeout)
            return
        self.sock.settimeout(timeout)
        try:
            if len(views) == 1 or not hasattr(self.sock, "sendmsg"):
                for v in views:
                    self.sock.sendall(v)
                return
            while views:
                _advance(views, self.sock.sendmsg(views[:_IOV_MAX]))
        finally:
            self._asked = False  # the socket timeout is the send's now: recv sets its own

    def _send_blocking(self, views: list[memoryview], timeout: float | None) -> None:
        """POSIX: blocking sendmsg under a kernel send timeout, until ``views`` are sent."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while views:
            seconds = None
            if deadline is not None:
                seconds = deadline - time.monotonic()
                if seconds <= 0:
                    raise TimeoutError("timed out")  # = socket.timeout, what callers catch
            # Rounded like the receive timeout, so a shrinking deadline rarely costs a syscall.
            rounded = None if seconds is None else max(0.001, round(seconds, 2))
            if rounded != self._snd:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(rounded))
                self._snd = rounded
            try:
                sent = self.sock.sendmsg(views[:_IOV_MAX])
            except BlockingIOError:  # the kernel timeout passed before any byte left
                continue
            _advance(views, sent)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
