"""Single-instance lock: one Luna host per user, held as a TCP listener on the lock port.

Binding 127.0.0.1:<lock_port> exclusively (SO_EXCLUSIVEADDRUSE on Windows; on POSIX
SO_REUSEADDR, which never lets a second listener bind but skips the TIME_WAIT left by
closed lock connections) is atomic, works on every OS, and is released by the kernel when
the process dies -- no stale lock files. A second instance that fails to bind connects instead and
sends ``show``; the owner's ``on_message`` callback gets it (the tray then notifies).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)

ALREADY_RUNNING = "Luna Daemon is already running!"
_MAX_MSG = 64


class InstanceLock:
    def __init__(self, host: str, port: int, on_message: Callable[[str], None] | None = None):
        self.host, self.port = host, port
        self.on_message = on_message
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """True if this process now holds the lock; False if another instance does."""
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

    def _serve(self) -> None:
        sock = self._sock
        if sock is None:  # released before this thread started
            return
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
                    conn.sendall(b"ok\n")
                except OSError:
                    continue
            if msg and self.on_message is not None:
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


def notify_running(host: str, port: int, message: str = "show", timeout: float = 2.0) -> bool:
    """Ask the running instance to act (e.g. show its status). True if it answered."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(message.encode("ascii") + b"\n")
            s.shutdown(socket.SHUT_WR)  # we close first: TIME_WAIT stays on our side
            return s.recv(16).startswith(b"ok")
    except OSError:
        return False
