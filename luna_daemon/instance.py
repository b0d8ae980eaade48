"""Single-instance lock: one Luna host per user, held as a TCP listener on the lock port.

Binding 127.0.0.1:<lock_port> exclusively (SO_EXCLUSIVEADDRUSE on Windows; on POSIX
SO_REUSEADDR, which never lets a second listener bind but skips the TIME_WAIT left by
closed lock connections) is atomic, works on every OS, and is released by the kernel when
the process dies -- no stale lock files.

The lock speaks a one-line exchange: a peer sends one line (``show``, or ``hello`` to
only ask who is there) and the owner answers ``ok LUNA-LOCK <pid> <version>``. A second
launch that fails to bind sends ``show`` (the owner's ``on_message`` gets it; the tray
then notifies) and, from the answer, tells a running Luna host from a foreign program
that happens to hold the port.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from luna_daemon import __version__
from luna_daemon.netutil import PortHolder, port_holder

log = logging.getLogger(__name__)

ALREADY_RUNNING = "Luna Daemon is already running!"
LOCK_GREETING = "LUNA-LOCK"
_MAX_MSG = 64
_MAX_ANSWER = 128


class InstanceLock:
    def __init__(self, host: str, port: int, on_message: Callable[[str], None] | None = None):
        self.host, self.port = host, port
        self.on_message = on_message
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """True if this process now holds the lock; False if something else holds the port
        (another instance, or a foreign program: :meth:`refusal` says which)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if sys.platform == "win32":
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_EXCLUSIVEADDRUSE", -5), 1)
        else:
            # Without it a lock connection the owner closed first (TIME_WAIT, ~60 s) makes
            # the next launch believe another instance runs. A live listener still blocks.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(8)
        except OSError:
            sock.close()
            return False
        sock.settimeout(0.25)  # here, not in _serve: release() may close it before that runs
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="luna-lock", daemon=True)
        self._thread.start()
        return True

    def refusal(self) -> str:
        """Why :meth:`acquire` failed, as the text a launch prints and logs.

        Asks the holder to ``show`` itself: a Luna host answers and is named by pid; a
        foreign program is named by process (psutil) with what to do."""
        return refusal_message(self.port, who_holds_lock(self.host, self.port, "show"))

    def _serve(self) -> None:
        sock = self._sock
        if sock is None:  # released before this thread started
            return
        answer = f"ok {LOCK_GREETING} {os.getpid()} {__version__}\n".encode("ascii")
        while self._sock is not None:
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    msg = conn.recv(_MAX_MSG).decode("ascii", "replace").strip()
                    conn.sendall(answer)
                except OSError:
                    continue
            # "hello" only asks who holds the lock (doctor, a launch's probe): no action.
            if msg and msg != "hello" and self.on_message is not None:
                try:
                    self.on_message(msg)
                except Exception:
                    log.exception("lock message handler failed")

    def release(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)

    def __enter__(self) -> "InstanceLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class LockOwner:
    """Who answered on the lock port. ``luna``: a Luna host (``pid``, ``version`` from its
    answer); otherwise ``holder`` names the foreign process as far as the OS lets us see."""

    luna: bool
    pid: int | None = None
    version: str | None = None
    holder: PortHolder | None = None

    def __str__(self) -> str:
        if self.luna:
            return f"Luna Daemon {self.version or ''} (pid {self.pid})".replace("  ", " ")
        return str(self.holder or PortHolder())


def who_holds_lock(host: str, port: int, message: str = "hello", timeout: float = 2.0) -> LockOwner | None:
    """Send ``message`` to the lock port and read the answer. None when nothing listens.

    A program that accepts but does not answer the greeting within ``timeout`` seconds,
    or answers anything else, is foreign. Never raises for network errors."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            answer = b""
            try:
                s.sendall(message.encode("ascii") + b"\n")
                s.shutdown(socket.SHUT_WR)  # we close first: TIME_WAIT stays on our side
                while b"\n" not in answer and len(answer) < _MAX_ANSWER:
                    chunk = s.recv(_MAX_ANSWER)
                    if not chunk:
                        break
                    answer += chunk
            except OSError:  # timeout, reset: what arrived so far decides
                pass
    except OSError:
        return None  # refused: nothing listens (the holder may just have exited)
    parts = answer.decode("ascii", "replace").split()
    if len(parts) >= 4 and parts[0] == "ok" and parts[1] == LOCK_GREETING and parts[2].isdigit():
        return LockOwner(True, int(parts[2]), parts[3])
    if parts == ["ok"]:  # a Luna host from before the greeting
        return LockOwner(True)
    holder = port_holder(port) or PortHolder()
    return LockOwner(False, holder.pid, holder=holder)


def refusal_message(port: int, owner: LockOwner | None) -> str:
    """The one text for "the lock port is taken", by who holds it."""
    if owner is None:
        return (f"port {port} (lock_port) was in use a moment ago but nothing answers on it now "
                "(the other instance may just have exited): start again")
    if owner.luna:
        return ALREADY_RUNNING if owner.pid is None else f"{ALREADY_RUNNING} (pid {owner.pid})"
    return (f"port {port} (lock_port) is held by {owner}, not Luna Daemon: stop it or set lock_port "
            f"(config.toml, LUNA_LOCK_PORT or --lock-port)")


def notify_running(host: str, port: int, message: str = "show", timeout: float = 2.0) -> bool:
    """Ask the running instance to act (e.g. show its status). True if a Luna host answered."""
    owner = who_holds_lock(host, port, message, timeout)
    return owner is not None and owner.luna
