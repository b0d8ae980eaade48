"""One daemon connection per ComfyUI process.

* :func:`get_connection` returns the process-wide :class:`Connection`: Luna's
  :class:`~luna_daemon.settings.Settings` (config file + ``LUNA_*`` variables, read once) and
  one thread-safe :class:`~luna_daemon.client.DaemonClient` made from them. Nothing connects
  before the first call.
* Every call goes through :meth:`Connection.call`. When the daemon cannot be reached it
  raises :class:`~luna_daemon.client.DaemonUnavailable` whose message says how to start it
  (:data:`START_HINT`), after trying to start it first when ``start_daemon_if_missing`` is
  set: ``<ComfyUI's Python> -m luna_daemon tray`` (``serve`` without a display) is started
  detached (no console, own session) and the call waits for the daemon's ping, logging
  progress every 2 s. The single-instance lock (port 19299) keeps that to one daemon even
  when several ComfyUI instances start it at once.
* ``comfy_fallback = "local"`` is read here (:attr:`Connection.fallback_local`); the loader
  nodes act on it.
* Multi-daemon: the loader nodes' ``instance`` input (``auto`` or an instance name from
  ``[[instances]]``) picks the connection: :func:`get_connection` keeps one per value, each
  with its own client made with ``DaemonClient(..., instance=...)``. ``auto`` lets the client
  route each op to an instance that serves it.
* Every client announces this process (:func:`client_identity`: pid, ComfyUI folder, port)
  once per new connection, so the daemon can count the ComfyUI instances sharing its
  models ("memory saved", docs/monitor.md).
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
LAUNCH_WAIT_S = 90.0  # a cold start imports torch and ComfyUI's comfy package
PROGRESS_EVERY_S = 2.0  # "waiting for Luna Daemon…" lines in ComfyUI's log while it starts
AUTO_INSTANCE = "auto"  # the loaders' default: the client routes VAE / CLIP ops itself
MAX_INSTANCE_NAME = 64


def instance_name(value: Any) -> str:
    """A loader's ``instance`` input as a connection key: ``auto`` for None / "" / "auto"
    (any case), else the name stripped. Raises TypeError / ValueError for a value that is no name."""
    if value is None:
        return AUTO_INSTANCE
    if not isinstance(value, str):
        raise TypeError(f"instance must be a string ('auto' or an instance name), got {type(value).__name__}")
    name = value.strip()
    if not name or name.lower() == AUTO_INSTANCE:
        return AUTO_INSTANCE
    if len(name) > MAX_INSTANCE_NAME or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"instance {value!r} is not an instance name: use 'auto' or the name of an [[instances]] "
                         "table in the Luna Daemon config.toml (letters, digits, '_', '-', '.')")
    return name


def _client_takes(param: str) -> bool:
    import inspect

    from luna_daemon.client import DaemonClient

    try:
        return param in inspect.signature(DaemonClient).parameters
    except (TypeError, ValueError):
        return False


def _client_takes_instance() -> bool:
    return _client_takes("instance")


def client_identity() -> dict[str, Any]:
    """Who this ComfyUI process is, for the daemon's "memory saved" count (``hello``'s
    ``client``, docs/monitor.md): its pid, ``comfyui`` = the ComfyUI folder (with the pid it
    tells two instances of one install apart), ``name`` = "ComfyUI :<port>" from ``--port``."""
    port = "8188"
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = argv[i + 1]
        elif arg.startswith("--port="):
            port = arg.split("=", 1)[1]
    return {"pid": os.getpid(), "comfyui": str(getattr(sys.modules.get("folder_paths"), "base_path", "") or ""),
            "name": f"ComfyUI :{port[:16]}"}


def make_client(settings: Any, instance: str = AUTO_INSTANCE) -> Any:
    """``DaemonClient.from_settings(settings, instance=instance)``. A client without the
    ``instance`` keyword (single-daemon builds) serves ``auto`` only."""
    from luna_daemon.client import DaemonClient

    if _client_takes_instance():
        extra = {"identity": client_identity()} if _client_takes("identity") else {}
        return DaemonClient.from_settings(settings, instance=instance, **extra)
    if instance != AUTO_INSTANCE:
        from luna_daemon.client import DaemonError

        raise DaemonError("bad_args", f"instance {instance!r}: this Luna Daemon client has no multi-daemon support; "
                                      "set the loader's instance to 'auto'")
    return DaemonClient.from_settings(settings)


class Connection:
    """Settings + one shared client for one ``instance`` (``auto``: the client routes).
    ``settings`` / ``client`` may be injected (tests, bench)."""

    def __init__(self, settings: Any = None, client: Any = None, instance: str = AUTO_INSTANCE):
        self.instance = instance_name(instance)
        self._settings = settings
        self._client = client
        self._owns_client = client is None  # an injected client is closed by whoever made it
        self._lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._launched: subprocess.Popen | None = None
        self._roots_lock = threading.Lock()
        self._roots_sent = False

    # ------------------------------------------------------------------ parts
    @property
    def settings(self) -> Any:
        with self._lock:
            if self._settings is None:
                from luna_daemon.settings import Settings

                # Tolerant: the nodes need host, port, token and comfy_fallback; a bad
                # unrelated key keeps its default here (the daemon's host reports it).
                self._settings = Settings.load(tolerant=True)
                for problem in self._settings.problems:
                    log.warning("Luna Daemon config: %s (using the default)", problem)
            return self._settings

    @property
    def client(self) -> Any:
        settings = self.settings
        with self._lock:
            if self._client is None:
                self._client = make_client(settings, self.instance)
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

    def ensure_roots(self, *, force: bool = False) -> None:
        """Tell the daemon this ComfyUI's model folders (``register_roots``), once per
        connection; ``force`` sends them again (the daemon restarted and forgot them).

        Zero-config: a model in a folder only this ComfyUI knows (extra_model_paths.yaml,
        --extra-model-paths-config) loads without touching model_roots. Raises only
        DaemonUnavailable (the call that follows would fail the same way): without the
        folders the daemon still serves files under its own roots, and an older daemon
        without the op is only noted once."""
        from luna_daemon.client import DaemonError

        with self._roots_lock:
            if self._roots_sent and not force:
                return
            folders = comfy_model_folders()
            if not folders:
                self._roots_sent = True  # not inside ComfyUI (tests, scripts): nothing to tell
                return
            client = client_identity()
            try:
                answer = self.call("register_roots", {"folders": folders, "client": client})
            except DaemonError as exc:
                if exc.code == "unknown_op":
                    log.info("this Luna Daemon does not take ComfyUI's model folders (update it); only its "
                             "model_roots are readable")
                    self._roots_sent = True
                else:
                    log.warning("could not tell the Luna Daemon this ComfyUI's model folders: %s", exc)
                return
            self._roots_sent = True
        for added in answer.get("added") or ():
            log.info("Luna Daemon reads %s (%s folder of this ComfyUI)", added.get("path"), added.get("kind"))

    def embedding_directories(self) -> list[str] | None:
        """This ComfyUI's embedding folders (``folder_paths``), None outside ComfyUI."""
        return comfy_model_folders(("embeddings",)).get("embeddings")

    def is_running(self, timeout: float = 2.0) -> bool:
        try:
            self.client.call("ping", timeout=timeout)
        except Exception:  # noqa: BLE001 - any failure means "not usable now"
            return False
        return True

    # ------------------------------------------------------------------ start
    @property
    def launched(self) -> subprocess.Popen | None:
        """The daemon process this connection started (None if it started none)."""
        return self._launched

    def start_daemon_if_missing(self) -> bool:
        """With ``start_daemon_if_missing`` set: start the daemon with this ComfyUI's Python,
        detached (once per process while that process lives), and wait for its ping, logging
        progress. True when the daemon answers."""
        settings = self.settings
        if not getattr(settings, "start_daemon_if_missing", False):
            return False
        with self._launch_lock:
            if self.is_running():
                return True
            output = launch_output_path(settings)
            if self._launched is None or self._launched.poll() is not None:
                command = launch_command(settings)
                try:
                    self._launched = spawn_detached(command, output=output, env=launch_env(settings))
                except OSError as exc:
                    log.error("Luna Daemon is not running and could not be started (%s: %s)", " ".join(command), exc)
                    return False
                log.warning("Luna Daemon was not running at %s: started it with this ComfyUI's Python "
                            "(start_daemon_if_missing = true): %s; its output: %s", self.address, " ".join(command),
                            output)
            return self._wait_for_launch(output)

    def _wait_for_launch(self, output: Path | None) -> bool:
        from luna_daemon.instance import ALREADY_RUNNING

        started = time.monotonic()
        next_note = started + PROGRESS_EVERY_S
        while (waited := time.monotonic() - started) < LAUNCH_WAIT_S:
            if self.is_running():
                log.info("Luna Daemon is up at %s (after %.1f s)", self.address, waited)
                return True
            proc = self._launched
            if proc is not None and proc.poll() is not None:
                tail = _tail(output)
                # A daemon another ComfyUI started at the same moment holds the lock: ours
                # exits saying so, and that daemon answers soon. Anything else is a failure.
                if ALREADY_RUNNING not in tail:
                    log.error("the Luna Daemon process exited with code %s before answering%s (output: %s; daemon "
                              "log: %s)", proc.returncode, f": {tail}" if tail else "", output,
                              getattr(self.settings, "log_file", "luna-daemon logs --path"))
                    return False
            if time.monotonic() >= next_note:
                log.info("waiting for Luna Daemon at %s… (%.0f s)", self.address, waited)
                next_note += PROGRESS_EVERY_S
            time.sleep(0.25)
        log.error("Luna Daemon did not answer within %.0f s after being started (output: %s)", LAUNCH_WAIT_S, output)
        return False


def _tail(path: Path | None, limit: int = 2000) -> str:
    """The last ``limit`` characters of a launch output file, one line ("" if none)."""
    try:
        data = path.read_bytes()[-limit:] if path is not None else b""
    except OSError:
        return ""
    return " | ".join(line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip())


# ComfyUI's folder_paths names whose folders the daemon may read models from.
ROOT_KINDS = ("vae", "text_encoders", "loras", "embeddings", "checkpoints", "diffusion_models")


def comfy_model_folders(kinds: tuple[str, ...] = ROOT_KINDS) -> dict[str, list[str]]:
    """``folder_paths.get_folder_paths(kind)`` of this ComfyUI per kind (existing folders,
    absolute); {} when ComfyUI's ``folder_paths`` is not loaded. Never raises."""
    fp = sys.modules.get("folder_paths")
    if fp is None:
        return {}
    out: dict[str, list[str]] = {}
    for kind in kinds:
        try:
            paths = [os.path.abspath(p) for p in fp.get_folder_paths(kind)]
        except Exception:  # noqa: BLE001 - an unknown name in this ComfyUI version
            log.debug("folder_paths has no %r folders", kind, exc_info=True)
            continue
        found = [p for p in dict.fromkeys(paths) if os.path.isdir(p)]
        if found:
            out[kind] = found
    return out


def package_root() -> Path:
    """The folder holding the ``luna_daemon`` package these nodes run (the checkout)."""
    return Path(__file__).resolve().parents[2]


def has_display(env: Any = None, platform: str | None = None) -> bool:
    """Whether a tray icon can be shown: the decision start_tray_daemon.sh makes (Windows
    and macOS always; elsewhere DISPLAY or WAYLAND_DISPLAY)."""
    env = os.environ if env is None else env
    platform = platform or sys.platform
    return platform in ("win32", "darwin") or bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def launch_command(settings: Any = None) -> list[str]:
    """``<this Python> -m luna_daemon tray`` (``serve`` without a display) ``[--config FILE]``.

    ComfyUI's own interpreter: it has ComfyUI's packages, so the daemon can run ComfyUI's
    ``comfy`` code (engine = comfy); the start_tray_daemon.* launchers would build their own
    venv without them."""
    command = [sys.executable, "-m", "luna_daemon", "tray" if has_display() else "serve"]
    config = getattr(settings, "config_file", "") or ""
    if config and Path(config).is_file():
        command += ["--config", config]
    return command


def launch_env(settings: Any = None) -> dict[str, str]:
    """Variables the started daemon needs besides this process's environment: the
    ``luna_daemon`` package on ``PYTHONPATH``, and this ComfyUI as ``COMFYUI_PATH`` when
    Luna's settings name no ComfyUI (so the daemon finds the same ComfyUI)."""
    extra = {"PYTHONPATH": str(package_root()) + (os.pathsep + os.environ["PYTHONPATH"]
                                                  if os.environ.get("PYTHONPATH") else "")}
    known = getattr(settings, "comfyui_path", None)
    base = getattr(sys.modules.get("folder_paths"), "base_path", None)
    if base and callable(known) and known() is None and (Path(base) / "comfy" / "sd.py").is_file():
        extra["COMFYUI_PATH"] = str(base)
    return extra


def launch_output_path(settings: Any = None) -> Path | None:
    """Where the started daemon's stdout/stderr go (crashes before its log starts)."""
    log_dir = getattr(settings, "log_dir", "") or ""
    return Path(log_dir) / "comfyui-launch.out" if log_dir else None


def spawn_detached(command: list[str], *, output: Path | None = None, env: dict[str, str] | None = None
                   ) -> subprocess.Popen:
    """Start ``command`` detached, so it outlives this ComfyUI and never blocks it: own session
    (POSIX) / DETACHED_PROCESS + own process group (Windows), stdin from the null device,
    stdout and stderr to ``output`` (rewritten per start) or the null device."""
    full_env = {**os.environ, **(env or {})}
    sink: Any = subprocess.DEVNULL
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            sink = open(output, "wb")  # noqa: SIM115 - the child keeps its own copy
        except OSError as exc:
            log.warning("cannot write the Luna Daemon launch output to %s (%s); discarding it", output, exc)
    kwargs: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": sink,
                              "stderr": subprocess.STDOUT if sink is not subprocess.DEVNULL else subprocess.DEVNULL,
                              "cwd": str(package_root()), "env": full_env, "close_fds": True}
    if os.name == "nt":
        kwargs["creationflags"] = (getattr(subprocess, "DETACHED_PROCESS", 0x00000008)
                                   | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200))
    else:
        kwargs["start_new_session"] = True
    try:
        return subprocess.Popen(command, **kwargs)
    finally:
        if sink is not subprocess.DEVNULL:
            sink.close()


# ---------------------------------------------------------------------- the connections

# One connection per ``instance`` value; "auto" is the process-wide one configure() sets.
_CONNECTIONS: dict[str, Connection] = {}
_CONNECTION_LOCK = threading.Lock()


def get_connection(instance: Any = AUTO_INSTANCE) -> Connection:
    """The process-wide connection for ``instance`` (created on first use from Luna's
    settings; a named instance reuses the settings injected into the ``auto`` one).
    Raises TypeError / ValueError for a value that is not an instance name."""
    key = instance_name(instance)
    with _CONNECTION_LOCK:
        conn = _CONNECTIONS.get(key)
        if conn is None:
            base = _CONNECTIONS.get(AUTO_INSTANCE)
            conn = _CONNECTIONS[key] = Connection(base._settings if base is not None else None, instance=key)
        return conn


def configure(settings: Any = None, client: Any = None) -> Connection:
    """Replace the process-wide connections (tests, benchmarks, embedding hosts): the
    ``auto`` one uses ``settings`` / ``client``; named ones are rebuilt on next use."""
    with _CONNECTION_LOCK:
        old = list(_CONNECTIONS.values())
        _CONNECTIONS.clear()
        new = _CONNECTIONS[AUTO_INSTANCE] = Connection(settings, client)
    for conn in old:
        conn.close()
    return new


def reset() -> None:
    """Forget every connection (the next call builds new ones from settings)."""
    with _CONNECTION_LOCK:
        old = list(_CONNECTIONS.values())
        _CONNECTIONS.clear()
    for conn in old:
        conn.close()
