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

``login <token> [page]`` asks the host for a one-time dashboard login link
(``luna-daemon dashboard``). The owner answers its greeting line and then ``login <url>``,
or ``denied token`` / ``denied monitor`` / ``denied page``. The per-install token is the
proof that the asker is the user: any local program can reach this port, and a link
handed out without it would give that program the dashboard (docs/monitor.md). The token
is compared in constant time and never logged; a login message never reaches
``on_message``.
"""

from __future__ import annotations

import logging
import os
import re
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
LOGIN = "login"
_MAX_MSG = 256  # "login <token> <page>": a token_urlsafe(32) token is 43 characters
_MAX_ANSWER = 128
_MAX_LOGIN_ANSWER = 1024
_URL_RE = re.compile(r"http://[\x21-\x7e]{1,900}")

# ``on_login(token, page)`` -> the URL, or the reason word of a refusal ("token", "monitor",
# "page") as ``LoginRefused``.
LoginHandler = Callable[[str, str], str]


class LoginRefused(Exception):
    """The host refused a login-link request; ``reason`` is one word (token, monitor, page)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InstanceLock:
    def __init__(self, host: str, port: int, on_message: Callable[[str], None] | None = None,
                 on_login: LoginHandler | None = None):
        self.host, self.port = host, port
        self.on_message = on_message
        self.on_login = on_login
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
                    msg = _read_line(conn).decode("ascii", "replace").strip()
                    if msg.split(" ", 1)[0] == LOGIN:
                        conn.sendall(answer + self._login_answer(msg).encode("ascii", "replace"))
                        continue  # carries the token: never handed to on_message (it logs)
                    conn.sendall(answer)
                except OSError:
                    continue
            # "hello" only asks who holds the lock (doctor, a launch's probe): no action.
            if msg and msg != "hello" and self.on_message is not None:
                try:
                    self.on_message(msg)
                except Exception:
                    log.exception("lock message handler failed")

    def _login_answer(self, msg: str) -> str:
        parts = msg.split()
        token, page = (parts[1] if len(parts) > 1 else ""), (parts[2] if len(parts) > 2 else "status")
        if self.on_login is None:
            return "denied monitor\n"
        try:
            url = self.on_login(token, page)
        except LoginRefused as exc:
            if exc.reason == "token":
                log.warning("a login-link request on the lock port had a wrong token: refused")
            return f"denied {exc.reason}\n"
        except Exception:
            log.exception("login-link handler failed")
            return "denied monitor\n"
        return f"{LOGIN} {url}\n"

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


def _read_line(conn: socket.socket) -> bytes:
    """One request line (up to _MAX_MSG bytes): a peer may send it in several pieces."""
    data = b""
    while b"\n" not in data and len(data) < _MAX_MSG:
        chunk = conn.recv(_MAX_MSG - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def request_login(host: str, port: int, token: str, page: str = "status", timeout: float = 5.0) -> str:
    """Ask the Luna host on the lock port for a one-time dashboard login URL.

    Raises LoginRefused (``token``: not this install's token; ``monitor``: the host serves
    no dashboard; ``page``; ``old``: a host from before this request),
    ConnectionRefusedError when nothing listens, and NotLunaHost (naming the holder)
    when the port's holder is not a Luna host."""
    if not token or any(c.isspace() for c in token) or not token.isascii():
        raise LoginRefused("token")
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"{LOGIN} {token} {page}\n".encode("ascii"))
            s.shutdown(socket.SHUT_WR)
            answer = b""
            try:
                while answer.count(b"\n") < 2 and len(answer) < _MAX_LOGIN_ANSWER:
                    chunk = s.recv(_MAX_LOGIN_ANSWER)
                    if not chunk:
                        break
                    answer += chunk
            except OSError:
                pass
    except OSError as exc:
        raise ConnectionRefusedError(f"nothing answers on {host}:{port} (lock_port): {exc}") from None
    lines = answer.decode("ascii", "replace").splitlines()
    greeting = lines[0].split() if lines else []
    if len(greeting) < 2 or greeting[0] != "ok" or greeting[1] != LOCK_GREETING:
        raise NotLunaHost(LockOwner(False, holder=port_holder(port) or PortHolder()))
    reply = lines[1].split() if len(lines) > 1 else []
    if len(reply) == 2 and reply[0] == LOGIN and _URL_RE.fullmatch(reply[1]):
        return reply[1]
    if len(reply) == 2 and reply[0] == "denied":
        raise LoginRefused(reply[1])
    raise LoginRefused("old")


class NotLunaHost(ConnectionError):
    """The lock port is held by a program that is not a Luna host (``owner`` names it)."""

    def __init__(self, owner: LockOwner):
        super().__init__(str(owner))
        self.owner = owner


def notify_running(host: str, port: int, message: str = "show", timeout: float = 2.0) -> bool:
    """Ask the running instance to act (e.g. show its status). True if a Luna host answered."""
    owner = who_holds_lock(host, port, message, timeout)
    return owner is not None and owner.luna
