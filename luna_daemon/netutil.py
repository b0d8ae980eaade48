"""Listening sockets with the same safety rules everywhere (daemon port, monitor port)."""

from __future__ import annotations

import errno
import socket
import sys


class PortInUse(OSError):
    """The port is taken. The message names the port and what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def bind_listener(host: str, port: int, *, what: str, setting: str, hint: str = "", backlog: int = 128) -> socket.socket:
    """Bind and listen on ``host:port``; raise PortInUse naming ``what``/``setting`` if taken.

    On Windows SO_REUSEADDR would let a second process steal a bound port, so
    SO_EXCLUSIVEADDRUSE is used; on POSIX SO_REUSEADDR only skips TIME_WAIT (quick
    restart) and never allows two live listeners on one port.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if sys.platform == "win32":
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_EXCLUSIVEADDRUSE", -5), 1)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1), errno.EACCES):
            raise PortInUse(
                exc.errno,
                f"{what} port {port} on {host} is already in use (another Luna Daemon or another program is listening). "
                f"{hint + ' ' if hint else ''}Or choose another port with '{setting}' in the config file / "
                f"LUNA_{setting.upper()} / --{setting.replace('_', '-')}.",
            ) from None
        raise
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (benchmarks and tests start servers on it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
