"""Blocking socket helpers shared by the server and the client (I/O only).

``read_frame`` reads one frame with two clocks: ``idle_timeout`` for the first byte (a
connection may sit idle between requests) and ``frame_timeout`` for the rest of the
frame once it has started (a slow-loris peer cannot hold a thread forever). Lengths are
validated by :func:`protocol.parse_prefix` *before* the header and body buffers are
allocated, and the body is received straight into its final ``bytearray`` with
``recv_into`` (no ``data += chunk`` copying).
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Iterable

from luna_daemon import protocol
from luna_daemon.protocol import ErrorCode, Frame, Limits, ProtocolError

# recv_into in chunks of at most this much: large single recv calls on Windows can fail
# with WSAENOBUFS, and smaller ones keep the deadline checks responsive.
_CHUNK = 8 * 1024 * 1024


class PeerClosed(ConnectionError):
    """The peer closed the connection cleanly between frames."""


class FrameTimeout(TimeoutError):
    """A frame did not arrive completely within ``frame_timeout``."""


class IdleTimeout(TimeoutError):
    """No frame started within ``idle_timeout``."""


def configure(sock: socket.socket) -> None:
    """Low-latency settings for request/response traffic."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None, *, first: bool = False) -> None:
    got = 0
    n = len(view)
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameTimeout(f"frame incomplete after timeout ({got}/{n} bytes of a part)")
            sock.settimeout(remaining)
        try:
            k = sock.recv_into(view[got:got + _CHUNK])
        except socket.timeout:
            raise FrameTimeout(f"frame incomplete after timeout ({got}/{n} bytes of a part)") from None
        if k == 0:
            if first and got == 0:
                raise PeerClosed("peer closed the connection")
            raise ConnectionResetError(f"peer closed the connection mid-frame ({got}/{n} bytes)")
        got += k


def read_frame(
    sock: socket.socket,
    limits: Limits,
    *,
    idle_timeout: float | None,
    frame_timeout: float | None,
) -> Frame:
    """Read one complete frame. Raises PeerClosed, IdleTimeout, FrameTimeout,
    ConnectionError or ProtocolError (the latter before reading an invalid frame's body).
    """
    prefix = bytearray(protocol.PREFIX_SIZE)
    view = memoryview(prefix)
    # Wait for the first byte under the idle clock...
    sock.settimeout(idle_timeout)
    try:
        k = sock.recv_into(view[:1])
    except socket.timeout:
        raise IdleTimeout("connection idle") from None
    if k == 0:
        raise PeerClosed("peer closed the connection")
    # ...then the whole frame under the frame clock.
    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
    _recv_into(sock, view[1:], deadline)
    pre = protocol.parse_prefix(prefix, limits)
    header = bytearray(pre.header_len)
    _recv_into(sock, memoryview(header), deadline)
    body = bytearray(pre.body_len)
    if pre.body_len:
        _recv_into(sock, memoryview(body), deadline)
    return protocol.decode_frame(pre, header, body)


def send_buffers(sock: socket.socket, buffers: Iterable, timeout: float | None) -> None:
    """Send every buffer in order. Big tensor buffers are sent without copying."""
    sock.settimeout(timeout)
    bufs = list(buffers)
    if hasattr(sock, "sendmsg") and sys.platform != "win32":
        # One syscall for header + small pads + tensors where possible; loop on partial sends.
        views = [memoryview(b).cast("B") for b in bufs if len(memoryview(b))]
        while views:
            sent = sock.sendmsg(views[:512])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        return
    for b in bufs:
        sock.sendall(b)


def error_to_frame(req_id: object, exc: ProtocolError) -> list:
    return protocol.error_response(req_id, exc.code, exc.message)


__all__ = [
    "ErrorCode", "FrameTimeout", "IdleTimeout", "PeerClosed", "configure", "read_frame", "send_buffers", "error_to_frame",
]
