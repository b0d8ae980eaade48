"""Listening sockets with the same safety rules everywhere (daemon port, monitor port),
and who holds a port when binding or talking to it shows that something else does."""

from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass


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


@dataclass(frozen=True)
class PortHolder:
    """The process listening on a port, as far as this user may see it.

    ``pid`` / ``name`` are None when the OS hides the owner (another user's process, or
    psutil denied access); ``str()`` then says "another program"."""

    pid: int | None = None
    name: str | None = None
    cmdline: tuple[str, ...] = ()

    @property
    def is_luna(self) -> bool:
        """The holder's command line runs this package (a Luna daemon / tray / serve)."""
        return any("luna_daemon" in part or part.endswith("luna-daemon") for part in self.cmdline)

    def __str__(self) -> str:
        if self.pid is None:
            return "another program"
        return f"{self.name or 'a process'} (pid {self.pid})"


def port_holder(port: int) -> PortHolder | None:
    """Who listens on TCP ``port`` on this machine; None when nothing listens there.

    Never raises: when the OS refuses to list sockets (macOS without root, hardened
    /proc) the answer is an anonymous ``PortHolder()`` ("another program") -- the caller
    already knows the port is taken, it just cannot name the holder."""
    try:
        import psutil  # imported here: only failure paths need it (keeps the CLI light)

        conns = psutil.net_connections(kind="tcp")
    except Exception:  # psutil.AccessDenied, PermissionError, psutil missing on an odd install
        return PortHolder()
    pids = [c.pid for c in conns if c.status == "LISTEN" and c.laddr and c.laddr.port == port]
    if not pids:
        return None
    pid = next((p for p in pids if p is not None), None)
    if pid is None:
        return PortHolder()  # listed, but owned by a process this user may not inspect
    try:
        proc = psutil.Process(pid)
        name = proc.name()
    except Exception:  # gone meanwhile, or AccessDenied on its details
        return PortHolder(pid)
    try:
        cmdline = tuple(proc.cmdline())
    except Exception:
        cmdline = ()
    return PortHolder(pid, name, cmdline)
