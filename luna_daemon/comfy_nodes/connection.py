"""One daemon connection per ComfyUI process.

* :func:`get_connection` returns the process-wide :class:`Connection`: Luna's
  :class:`~luna_daemon.settings.Settings` (config file + ``LUNA_*`` variables, read once) and
  one thread-safe :class:`~luna_daemon.client.DaemonClient` made from them. Nothing connects
  before the first call.
* Every call goes through :meth:`Connection.call`. When the daemon cannot be reached it
  raises :class:`~luna_daemon.client.DaemonUnavailable` whose message says how to start it
  (:data:`START_HINT`), after trying to start it first when ``start_daemon_if_missing`` is
  set: the tray launcher is started detached (no console, own session) and the call waits
  for the daemon's ping. The tray's single-instance lock (port 19299) keeps that to one
  daemon even when several ComfyUI instances start it at once.
* ``comfy_fallback = "local"`` is read here (:attr:`Connection.fallback_local`); the loader
  nodes act on it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("luna_daemon.comfy")

START_HINT = "start the Luna Daemon tray app (start_tray_daemon.bat / .sh) or run `luna-daemon serve`"
LAUNCH_WAIT_S = 90.0  # first launch of the tray launcher may create its venv


class Connection:
    """Settings + one shared client. ``settings`` / ``client`` may be injected (tests, bench)."""

    def __init__(self, settings: Any = None, client: Any = None):
        self._settings = settings
        self._client = client
        self._owns_client = client is None  # an injected client is closed by whoever made it
        self._lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._launched: subprocess.Popen | None = None

    # ------------------------------------------------------------------ parts
    @property
    def settings(self) -> Any:
        with self._lock:
            if self._settings is None:
                from luna_daemon.settings import Settings

                self._settings = Settings.load()
            return self._settings

    @property
    def client(self) -> Any:
        settings = self.settings
        with self._lock:
            if self._client is None:
                from luna_daemon.client import DaemonClient

                self._client = DaemonClient.from_settings(settings)
            return self._client

    @property
    def fallback_local(self) -> bool:
        return getattr(self.settings, "comfy_fallback", "error") == "local"

    @property
    def address(self) -> str:
        client = self.client
        return f"{client.host}:{client.port}"

    def close(self) -> None:
        """Close the client this connection made (an injected one is left open)."""
        with self._lock:
            if not self._owns_client:
                return
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # ------------------------------------------------------------------ messages
    def down_message(self, exc: BaseException | str = "") -> str:
        """The error text for "daemon not reachable": where, why, and how to start it."""
        text = str(exc) if exc else ""
        if START_HINT in text:
            return text  # already this message
        reason = text.split(". Start it", 1)[0].strip()
        plain = re.match(r"Luna Daemon is not reachable at \S+ \((.*)\)$", reason)
        if plain:
            reason = plain.group(1)
        config = getattr(self.settings, "config_file", "") or "the Luna Daemon config.toml"
        text = f"Luna Daemon is not running or not reachable at {self.address}"
        if reason:
            text += f" ({reason})"
        return (f"{text}. To use the Luna nodes, {START_HINT}. Or, in {config}, set "
                f"start_daemon_if_missing = true (ComfyUI starts it) or comfy_fallback = \"local\" "
                f"(the Luna loaders then load models in this ComfyUI, without sharing).")

    # ------------------------------------------------------------------ calls
    def call(self, op: str, args: dict | None = None, *, timeout: float | None = None, start: bool = True,
             check: Any = None) -> Any:
        """``client.call`` with the documented daemon-down error (and the optional start).
        ``check``: see ``DaemonClient.call`` (the proxies pass ComfyUI's interrupt check)."""
        from luna_daemon.client import DaemonUnavailable

        try:
            return self.client.call(op, args, timeout=timeout, check=check)
        except DaemonUnavailable as exc:
            error: BaseException = exc
            if start and self.start_daemon_if_missing():
                try:
                    return self.client.call(op, args, timeout=timeout, check=check)
                except DaemonUnavailable as again:
                    error = again
            raise DaemonUnavailable(self.down_message(error)) from None

    def is_running(self, timeout: float = 2.0) -> bool:
        try:
            self.client.call("ping", timeout=timeout)
        except Exception:  # noqa: BLE001 - any failure means "not usable now"
            return False
        return True

    # ------------------------------------------------------------------ start
    def start_daemon_if_missing(self) -> bool:
        """With ``start_daemon_if_missing`` set: launch the tray app detached (once per
        process while it is still running) and wait for the daemon to answer ping."""
        if not getattr(self.settings, "start_daemon_if_missing", False):
            return False
        with self._launch_lock:
            if self.is_running():
                return True
            if self._launched is None or self._launched.poll() is not None:
                command = launch_command()
                try:
                    self._launched = spawn_detached(command)
                except OSError as exc:
                    log.error("Luna Daemon is not running and could not be started (%s: %s)", command, exc)
                    return False
                log.warning("Luna Daemon was not running: started %s (start_daemon_if_missing = true)",
                            " ".join(command))
            deadline = time.monotonic() + LAUNCH_WAIT_S
            while time.monotonic() < deadline:
                if self.is_running():
                    log.info("Luna Daemon is up at %s", self.address)
                    return True
                if self._launched is not None and self._launched.poll() not in (None, 0):
                    log.error("the Luna Daemon launcher exited with code %s", self._launched.returncode)
                    return False
                time.sleep(0.25)
        log.error("Luna Daemon did not answer within %.0f s after being started", LAUNCH_WAIT_S)
        return False


def repo_root() -> Path:
    """The checkout this package runs from (where the start_tray_daemon.* launchers are)."""
    return Path(__file__).resolve().parents[2]


def launch_command() -> list[str]:
    """The command that starts the tray app: the repo's launcher when present, else
    ``python -m luna_daemon tray`` with this interpreter."""
    root = repo_root()
    if os.name == "nt":
        launcher = root / "start_tray_daemon.bat"
        if launcher.is_file():
            return [os.environ.get("COMSPEC", "cmd.exe"), "/c", str(launcher)]
    else:
        launcher = root / "start_tray_daemon.sh"
        if launcher.is_file():
            return ["bash", str(launcher)]
    return [sys.executable, "-m", "luna_daemon", "tray"]


def spawn_detached(command: list[str]) -> subprocess.Popen:
    """Start ``command`` with no console window, in its own session / process group, with no
    inherited standard streams, so it outlives this ComfyUI and never blocks it."""
    env = dict(os.environ)
    root = str(repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    kwargs: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                              "stderr": subprocess.DEVNULL, "cwd": root, "env": env, "close_fds": True}
    if os.name == "nt":
        kwargs["creationflags"] = (getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
                                   | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200))
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(command, **kwargs)


# ---------------------------------------------------------------------- the singleton

_CONNECTION: Connection | None = None
_CONNECTION_LOCK = threading.Lock()


def get_connection() -> Connection:
    """The process-wide connection (created on first use from Luna's settings)."""
    global _CONNECTION
    with _CONNECTION_LOCK:
        if _CONNECTION is None:
            _CONNECTION = Connection()
        return _CONNECTION


def configure(settings: Any = None, client: Any = None) -> Connection:
    """Replace the process-wide connection (tests, benchmarks, embedding hosts)."""
    global _CONNECTION
    with _CONNECTION_LOCK:
        old, _CONNECTION = _CONNECTION, Connection(settings, client)
        new = _CONNECTION
    if old is not None:
        old.close()
    return new


def reset() -> None:
    """Forget the process-wide connection (the next call builds a new one from settings)."""
    global _CONNECTION
    with _CONNECTION_LOCK:
        old, _CONNECTION = _CONNECTION, None
    if old is not None:
        old.close()
