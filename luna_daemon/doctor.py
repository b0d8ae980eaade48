"""``luna-daemon doctor``: what is wrong with this install, and how to fix it.

Each check returns :class:`Finding` rows (``ok`` / ``warn`` / ``fail``, what was found,
the fix). Only ``fail`` makes the command exit non-zero; ``warn`` is something that works
but may surprise (a world-readable token, a missing model folder).

Cost: the checks use the network (short deadlines: a port's holder that never answers
costs ~3 s) and the file system. ComfyUI's ``comfy`` package is imported in a child
process (it changes process-wide state and pulls in torch); only the device check imports
torch into this process, and ``devices=False`` skips it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

from luna_daemon.instance import who_holds_lock
from luna_daemon.instances import instance_specs
from luna_daemon.netutil import port_holder
from luna_daemon.protocol import LunaError
from luna_daemon.settings import CONFIG_FILE, Settings, SettingsError, read_token
from luna_daemon.units import fmt_bytes

OK, WARN, FAIL = "ok", "warn", "fail"
HELLO_S = 3.0
COMFY_IMPORT_S = 180.0

# Run in a child: import ComfyUI's comfy package the way the comfy engine does.
_COMFY_PROBE = """
import sys
from luna_daemon.models.engines.base import EngineError
from luna_daemon.models.engines.comfy import ComfyEngine
from luna_daemon.settings import Settings
try:
    ComfyEngine(Settings.load(sys.argv[1] or None), sys.argv[2]).prepare()
except EngineError as exc:
    sys.stderr.write(exc.message + "\\n")
    sys.exit(1)
"""


class Finding(NamedTuple):
    check: str
    status: str  # OK, WARN or FAIL
    finding: str
    fix: str = ""


def _where(setting: str) -> str:
    return f"'{setting}' (config.toml, LUNA_{setting.upper()} or --{setting.replace('_', '-')})"


class _Doctor:
    """Runs the checks in order; later checks read what earlier ones learnt."""

    def __init__(self, settings: Settings | None, error: SettingsError | None, config_file: str | None):
        self.error = error
        self.config_file = config_file
        self.error_source = "the config file"
        if settings is None:
            # The other checks still run: without the file, else on the defaults (+ LUNA_HOME).
            with tempfile.TemporaryDirectory(prefix="luna-doctor-") as empty:
                absent = os.path.join(empty, CONFIG_FILE)  # a config file that surely does not exist
                try:
                    settings = Settings.load(absent)
                except SettingsError:
                    self.error_source = "LUNA_* variables or flags"
                    settings = Settings.load(absent, env={k: v for k, v in os.environ.items() if k == "LUNA_HOME"})
        self.s = settings
        # The primary (the first [[instances]] table, or the one daemon) and the others.
        self.specs = instance_specs(settings)
        self.luna_pid: int | None = None  # the Luna host holding the lock, if any
        self.hello: dict[str, Any] | None = None  # the running daemon's hello answer
        self.comfy_root: Path | None = None
        self.comfy_imports: bool | None = None

    # ------------------------------------------------------------------ checks
    def config(self) -> list[Finding]:
        path = self.config_file or str(Path(self.s.config_dir) / CONFIG_FILE)
        if self.error is not None:
            # The error names the file itself when it came from the file (SettingsError.file).
            named = bool(getattr(self.error, "file", ""))
            where = "" if named else (path if self.error_source == "the config file" else self.error_source) + ": "
            return [Finding("config", FAIL, f"{where}{self.error} (the other checks ran without {self.error_source})",
                            "correct or remove that setting; 'luna-daemon config --show' lists every setting and its source")]
        from_file = sorted(k for k, src in self.s.sources.items() if src == "file")
        from_env = sorted(k for k, src in self.s.sources.items() if src == "env" and not k.endswith("_dir"))
        where = f"{path}: {len(from_file)} setting(s)" if Path(path).is_file() else f"no config file at {path}: defaults"
        env = f"; from LUNA_* variables: {', '.join(from_env)}" if from_env else ""
        return [Finding("config", OK, where + env)]

    def lock(self) -> list[Finding]:
        port = self.s.lock_port
        owner = who_holds_lock(self.s.host, port, "hello")
        if owner is None:
            return [Finding("lock", OK, f"port {port} (lock_port) is free: no tray / serve process runs")]
        if owner.luna:
            self.luna_pid = owner.pid
            return [Finding("lock", OK, f"port {port} (lock_port) is held by {owner}")]
        return [Finding("lock", FAIL, f"port {port} (lock_port) is held by {owner}, not Luna Daemon: "
                        "the tray and 'serve' refuse to start", f"stop that program, or set {_where('lock_port')}")]

    def daemon_port(self) -> list[Finding]:
        findings, self.hello = self._probe("daemon port", "", self.specs[0].port, f"set {_where('port')}")
        return findings

    def instances(self) -> list[Finding]:
        """Each further ``[[instances]]`` table: who holds its port, does it answer (hello
        and ping), is it the instance the table names."""
        out: list[Finding] = []
        for spec in self.specs[1:]:
            if spec.port == 0:  # a free port at each start: nothing to look at beforehand
                out.append(Finding("instance", OK, f"{spec.name} (service {spec.service}): port 0, a free port at "
                                   "each start ('luna-daemon status' shows the one it has)"))
                continue
            fix = f"set port in the [[instances]] table named {spec.name!r} (config.toml)"
            found, hello = self._probe("instance", f"{spec.name} (service {spec.service}): ", spec.port, fix)
            if hello is not None and hello.get("instance") not in (None, spec.name):
                found = [Finding("instance", WARN, f"{spec.name}: port {spec.port} answers as instance "
                                 f"{hello.get('instance')!r}: the running host was started with another config.toml",
                                 "restart the tray / serve with this config, or run this command with that one")]
            out += found
        return out

    def _probe(self, check: str, label: str, port: int, fix: str) -> tuple[list[Finding], dict[str, Any] | None]:
        """Findings about one daemon port (who holds it, whether a Luna daemon answers hello
        and ping there) and its hello answer (None when none came)."""
        from luna_daemon.client import DaemonClient, DaemonError, DaemonUnavailable, NotLunaDaemon

        try:
            with DaemonClient(self.s.host, port, token="", connect_timeout=HELLO_S) as c:
                hello = c.verify(HELLO_S)
                c.call("ping", timeout=HELLO_S)
        except NotLunaDaemon:
            holder = port_holder(port)
            if holder is not None and holder.is_luna:
                return [Finding(check, FAIL, f"{label}port {port} is held by a Luna process, {holder}, that does not "
                                f"answer hello within {HELLO_S:g} s", "see 'luna-daemon logs'; restart it")], None
            return [Finding(check, FAIL, f"{label}port {port} is held by {holder or 'another program'}, "
                            "which does not answer as a Luna daemon", f"stop that program, or {fix}")], None
        except DaemonUnavailable:
            if self.luna_pid is not None:
                what = "its daemon is stopped or failed" if not label else "this instance is stopped or failed"
                return [Finding(check, WARN, f"{label}port {port} is free: the Luna host (pid {self.luna_pid}) runs "
                                f"but {what}", "Start Daemon in the tray menu; reasons in 'luna-daemon status' "
                                "and 'luna-daemon logs'")], None
            return [Finding(check, OK, f"{label}port {port} is free: no daemon runs (start it with the tray app "
                            "or 'luna-daemon serve')")], None
        except DaemonError as exc:
            return [Finding(check, WARN, f"{label}a Luna daemon on port {port} answered {exc.code}: {exc.message}")], None
        h = hello
        return [Finding(check, OK, f"{label}Luna Daemon {h.get('daemon')} answers on port {port} "
                        f"(engine {h.get('engine')}, service {h.get('service')}, devices {', '.join(h.get('devices') or [])})")], h

    def monitor_port(self) -> list[Finding]:
        port = self.s.monitor_port
        holder = port_holder(port)
        if holder is None:
            return [Finding("dashboard port", OK, f"port {port} (monitor_port) is free")]
        if holder.pid is not None and holder.pid == self.luna_pid:
            return [Finding("dashboard port", OK, f"port {port} (monitor_port) is the dashboard of the Luna host (pid {holder.pid})")]
        if holder.is_luna:
            return [Finding("dashboard port", OK, f"port {port} (monitor_port) is held by a Luna process, {holder}")]
        if holder.pid is None:
            return [Finding("dashboard port", WARN, f"port {port} (monitor_port) is held by a process this user cannot "
                            "inspect", f"if the dashboard does not start, set {_where('monitor_port')}")]
        return [Finding("dashboard port", FAIL, f"port {port} (monitor_port) is held by {holder}: the dashboard cannot start",
                        f"stop that program, or set {_where('monitor_port')}")]

    def token(self) -> list[Finding]:
        path = self.s.token_path
        if not os.path.lexists(path):
            return [Finding("token", OK, f"no token yet at {path}: the daemon creates it on its first start")]
        try:
            text = read_token(self.s)  # the client's own reader (regular files only: a FIFO never hangs it)
        except (LunaError, OSError, UnicodeDecodeError) as exc:
            return [Finding("token", FAIL, f"cannot read {path}: {getattr(exc, 'message', exc)}",
                            "delete it (the daemon makes a new one on start) or fix its owner / permissions")]
        if not text:
            return [Finding("token", FAIL, f"{path} is empty: every client call would be refused",
                            "delete it; the daemon creates a new one on its next start")]
        out = []
        mode = path.stat().st_mode & 0o777
        if os.name == "posix" and mode & 0o077:
            out.append(Finding("token", WARN, f"{path} is readable by other users (mode {mode:o})", f"chmod 600 {path}"))
        if self.hello is not None:
            from luna_daemon.client import DaemonClient, DaemonError, DaemonUnavailable

            try:
                with DaemonClient(self.s.host, self.specs[0].port, token=text, timeout=10, connect_timeout=HELLO_S) as c:
                    c.ps()
            except DaemonError as exc:
                if exc.code == "unauthorized":
                    return out + [Finding("token", FAIL, f"the daemon on port {self.specs[0].port} refuses the token in {path}",
                                          "run the CLI / ComfyUI with the same LUNA_HOME (config dir) as the daemon")]
            except DaemonUnavailable:
                pass  # it stopped meanwhile; the daemon check said what it saw
        return out or [Finding("token", OK, f"{path} (mode {mode:o})" + (", accepted by the daemon" if self.hello else ""))]

    def comfyui(self) -> list[Finding]:
        self.comfy_root = root = self.s.comfyui_path()
        if root is None:
            if self.s.comfyui_root:
                return [Finding("ComfyUI", FAIL, f"comfyui_root = {self.s.comfyui_root} has no comfy/sd.py",
                                "set comfyui_root to the ComfyUI folder (the one holding main.py and comfy/)")]
            status = FAIL if self.s.engine == "comfy" else OK
            return [Finding("ComfyUI", status, "no ComfyUI found (comfyui_root, COMFYUI_PATH, or this repo in ComfyUI/custom_nodes)",
                            "set comfyui_root to use ComfyUI's own code" if status == FAIL else "")]
        try:
            r = subprocess.run([sys.executable, "-c", _COMFY_PROBE, self.config_file or "", str(root)],
                               capture_output=True, text=True, timeout=COMFY_IMPORT_S)
        except subprocess.TimeoutExpired:
            self.comfy_imports = False
            return [Finding("ComfyUI", FAIL, f"ComfyUI at {root}: importing its comfy package took over {COMFY_IMPORT_S:g} s",
                            "run ComfyUI itself once with this Python to see where it hangs")]
        self.comfy_imports = r.returncode == 0
        if self.comfy_imports:
            return [Finding("ComfyUI", OK, f"ComfyUI at {root}: its comfy package imports with {sys.executable}")]
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        return [Finding("ComfyUI", FAIL if self.s.engine == "comfy" else WARN,
                        f"ComfyUI at {root}: its comfy package does not import with {sys.executable}: "
                        f"{lines[-1] if lines else f'exit code {r.returncode}'}",
                        f"install ComfyUI's requirements into this Python ({sys.executable} -m pip install -r "
                        f"{root / 'requirements.txt'}), or set engine = standalone")]

    def engine(self) -> list[Finding]:
        choice = self.s.engine
        running = f"; the running daemon uses {self.hello.get('engine')}" if self.hello else ""
        if choice == "comfy" or (choice == "auto" and self.comfy_imports):
            if not self.comfy_imports:
                return [Finding("engine", FAIL, f"engine = {choice}: comfy, but ComfyUI is not usable (see above){running}",
                                "fix ComfyUI (above), or set engine = standalone")]
            return [Finding("engine", OK, f"engine = {choice}: comfy (ComfyUI's own code at {self.comfy_root}){running}")]
        missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
        why = " (ComfyUI found but not importable)" if choice == "auto" and self.comfy_root else ""
        if missing:
            return [Finding("engine", FAIL, f"engine = {choice}: standalone{why}, but {', '.join(missing)} is not installed{running}",
                            f"{sys.executable} -m pip install {' '.join(missing)}")]
        return [Finding("engine", OK, f"engine = {choice}: standalone (diffusers + transformers){why}{running}")]

    def devices(self) -> list[Finding]:
        import psutil

        from luna_daemon.models.devices import available_devices, resolve_device

        devs = available_devices()
        vm = psutil.virtual_memory()
        parts = [f"cpu: {fmt_bytes(vm.available)} RAM free of {fmt_bytes(vm.total)}"]
        for d in devs:
            if d.startswith("cuda"):
                import torch

                idx = int(d.split(":")[1])
                free, total = torch.cuda.mem_get_info(idx)
                parts.append(f"{d} {torch.cuda.get_device_name(idx)}: {fmt_bytes(free)} free of {fmt_bytes(total)}")
            elif d == "mps":
                parts.append("mps")
        out = [Finding("devices", OK, "; ".join(parts))]
        for key in ("vae_device", "clip_device"):
            try:
                dev = resolve_device(getattr(self.s, key))
            except LunaError as exc:
                out.append(Finding("devices", FAIL, f"{key} = {getattr(self.s, key)}: {exc.message}",
                                   f"set {_where(key)} to one of: auto, {', '.join(devs)}"))
            else:
                out.append(Finding("devices", OK, f"{key} = {getattr(self.s, key)} -> {dev}"))
        return out

    def huge_pages(self) -> list[Finding]:
        from luna_daemon import hugepages

        if not self.s.huge_pages:
            return [Finding("huge pages", OK, "huge_pages = false: the daemon's tensors use the system's normal pages")]
        if not sys.platform.startswith("linux"):
            return [Finding("huge pages", OK, "huge_pages = true has no effect on this platform (Linux only)")]
        mode = hugepages.kernel_mode()
        problem = hugepages.kernel_problem(mode)
        if problem is not None:
            what, fix = problem
            return [Finding("huge pages", WARN, f"{what}: the daemon cannot use huge pages, decodes take ~10x "
                                                "more page faults", fix)]
        return [Finding("huge pages", OK, f"kernel THP mode {mode!r}: the daemon's tensors of 2 MiB and more use "
                                          "huge pages (`luna-daemon status` shows whether the running one does)")]

    def model_roots(self) -> list[Finding]:
        roots = self.s.resolved_model_roots()
        if not roots:
            return [Finding("model roots", WARN, "no model roots: every load is refused with forbidden_path",
                            "set model_roots = [\"/path/to/models\"] or comfyui_root")]
        out = []
        for r in roots:
            if not r.exists():
                out.append(Finding("model roots", WARN, f"{r} does not exist", "create it, or remove it from model_roots"))
            elif not r.is_dir():
                out.append(Finding("model roots", FAIL, f"{r} is not a folder", "model_roots lists folders; remove it"))
            elif not os.access(r, os.R_OK | os.X_OK):
                out.append(Finding("model roots", FAIL, f"{r} is not readable by this user", f"fix its permissions (chmod u+rx {r})"))
            else:
                out.append(Finding("model roots", OK, f"{r}"))
        return out


def run_checks(settings: Settings | None, error: SettingsError | None = None, *, devices: bool = True,
               config_file: str | None = None) -> list[Finding]:
    """Every check, in order. ``settings`` None with ``error``: the config did not load
    (reported as the first finding; the rest run on the defaults)."""
    doc = _Doctor(settings, error, config_file)
    checks: list[Callable[[], list[Finding]]] = [
        doc.config, doc.lock, doc.daemon_port, doc.instances, doc.monitor_port, doc.token, doc.comfyui, doc.engine,
    ]
    if devices:
        checks.append(doc.devices)
    checks += [doc.huge_pages, doc.model_roots]
    findings: list[Finding] = []
    for check in checks:
        findings += check()
    return findings
