"""The attacker's side of the wire: raw connections where every read has a deadline.

The reader parses only the 20-byte prefix itself (an attacker does not use the daemon's
decoder); whole answer frames are decoded with ``protocol.decode_bytes`` only where their
tensors matter. Each request ends as an :class:`Outcome`: ``ok``, ``error`` (with its
code), ``closed`` (the daemon closed or reset the connection) or ``hung``.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

PREFIX = struct.Struct(">4sBBHIQ")
MAGIC = b"LUNA"
ANSWER_CAP = 4 * 1024 * 1024   # bytes of answers a reader keeps per connection
HOST = "127.0.0.1"


class Closed(Exception):
    """The daemon closed (or reset) the connection."""


class Hung(Exception):
    """No answer within the deadline, connection still open."""


class Garbled(Exception):
    """Bytes that are not a Luna frame came back."""


class Wire:
    """One raw client connection (not thread-safe)."""

    def __init__(self, port: int, connect_timeout: float = 5.0, cap: int = ANSWER_CAP):
        self.sock = socket.create_connection((HOST, port), timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.cap = cap

    def send(self, data: bytes, timeout: float = 10.0) -> bool:
        """Send everything; False when the daemon closed/reset first (an answer may still
        be waiting to be read). Raises Hung when it stopped reading for ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
            return True
        except socket.timeout:
            raise Hung("the daemon stopped reading") from None
        except OSError:
            return False

    def half_close(self) -> None:
        """No more bytes from us: the daemon sees EOF after the last one (never waits)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def fill(self, deadline: float) -> None:
        """Receive more bytes into ``buf`` before ``deadline`` (monotonic)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise Hung()
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(256 * 1024)
        except socket.timeout:
            raise Hung() from None
        except OSError as exc:
            raise Closed(str(exc)) from None
        if not chunk:
            raise Closed("eof")
        self.buf += chunk
        if len(self.buf) > self.cap + (1 << 16):
            raise Garbled(f"more than {self.cap} bytes of answers")

    def read_frame(self, deadline: float) -> bytes:
        """The next whole response frame (prefix + header + body)."""
        while len(self.buf) < PREFIX.size:
            self.fill(deadline)
        magic, version, kind, flags, hlen, blen = PREFIX.unpack_from(self.buf)
        if magic != MAGIC or version != 1 or kind != 2 or flags or hlen > 1 << 20 or blen > self.cap:
            raise Garbled(f"not a Luna response prefix: {bytes(self.buf[:PREFIX.size])!r}")
        total = PREFIX.size + hlen + blen
        while len(self.buf) < total:
            self.fill(deadline)
        frame, self.buf = bytes(self.buf[:total]), self.buf[total:]
        return frame

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def answer_header(frame: bytes) -> dict:
    """The JSON header of a response frame (no tensors decoded)."""
    import orjson

    hlen = PREFIX.unpack_from(frame)[4]
    try:
        header = orjson.loads(frame[PREFIX.size:PREFIX.size + hlen])
    except orjson.JSONDecodeError as exc:
        raise Garbled(f"answer header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise Garbled("answer header is not an object")
    return header


def error_code(header: dict) -> str | None:
    """None for an ok answer, else the error code (``"?"`` when it has none)."""
    if header.get("ok") is True:
        return None
    err = header.get("error")
    return str(err.get("code")) if isinstance(err, dict) and err.get("code") else "?"


def request_bytes(op: str, args: dict | None = None, token: str | None = None, req_id: Any = 1) -> bytes:
    """A well-formed request frame (tensors in ``args`` travel in the body)."""
    from luna_daemon import protocol

    buffers, _ = protocol.request(req_id, op, args, token)
    return b"".join(bytes(b) for b in buffers)


@dataclass
class Outcome:
    """How one request ended: ``ok``, ``error`` (``code``), ``closed`` or ``hung``."""

    kind: str
    code: str | None = None
    message: str = ""
    seconds: float = 0.0
    result: Any = None


def await_answer(w: Wire, deadline_s: float, *, decode: bool = False) -> Outcome:
    """The answer to a request already sent on ``w``; ``decode`` resolves its tensors."""
    t0 = time.monotonic()
    try:
        frame = w.read_frame(t0 + deadline_s)
        header = answer_header(frame)
    except Hung:
        return Outcome("hung", seconds=time.monotonic() - t0)
    except Closed as exc:
        return Outcome("closed", message=str(exc), seconds=time.monotonic() - t0)
    except Garbled as exc:
        return Outcome("error", "garbled", str(exc), time.monotonic() - t0)
    code = error_code(header)
    if code is not None:
        return Outcome("error", code, str((header.get("error") or {}).get("message", "")), time.monotonic() - t0)
    result = header.get("result")
    if decode:
        from luna_daemon import protocol

        result = protocol.parse_response(protocol.decode_bytes(frame))[2]
    return Outcome("ok", result=result, seconds=time.monotonic() - t0)


def call(port: int, op: str, args: dict | None, token: str | None, deadline_s: float, *,
         decode: bool = False, wire: Wire | None = None) -> Outcome:
    """One request on a fresh (or the given) connection, classified, within ``deadline_s``."""
    t0 = time.monotonic()
    try:
        w = wire or Wire(port)
    except OSError as exc:
        return Outcome("closed", message=f"connect: {exc}")
    try:
        if not w.send(request_bytes(op, args, token)):
            # Refused while we sent; the refusal may still be readable.
            o = await_answer(w, 2.0, decode=decode)
            return o if o.kind != "hung" else Outcome("closed", message="closed while sending")
        o = await_answer(w, max(0.0, deadline_s - (time.monotonic() - t0)), decode=decode)
        o.seconds = time.monotonic() - t0
        return o
    except Hung:
        return Outcome("hung", seconds=time.monotonic() - t0)
    finally:
        if wire is None:
            w.close()


class HttpAnswer(NamedTuple):
    status: int | None  # None: no HTTP answer (closed without one, or hung)
    data: bytes
    hung: bool          # neither an answer nor a close within the deadline


def http_raw(port: int, request: bytes, deadline_s: float = 5.0, cap: int = ANSWER_CAP) -> HttpAnswer:
    """Send raw HTTP bytes and read until the server closes (``Connection: close``);
    at most ``cap`` bytes of the answer are kept."""
    try:
        w = Wire(port, connect_timeout=deadline_s, cap=cap)
    except OSError:
        return HttpAnswer(None, b"", False)
    hung = False
    try:
        try:
            w.send(request, deadline_s)
        except Hung:
            return HttpAnswer(None, b"", True)
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                w.fill(deadline)
            except Hung:
                hung = True
                break
            except (Closed, Garbled):
                break
        data = bytes(w.buf)
    finally:
        w.close()
    try:
        return HttpAnswer(int(data.split(b" ", 2)[1]), data, hung)
    except (IndexError, ValueError):
        return HttpAnswer(None, data, hung)


def http_get(port: int, path: str, headers: dict[str, str] | None = None, *, deadline_s: float = 5.0,
             cap: int = ANSWER_CAP) -> tuple[int | None, bytes]:
    """GET with a correct Host header; (status, body)."""
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    req = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    status, data, _ = http_raw(port, req.encode("latin-1"), deadline_s, cap)
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
