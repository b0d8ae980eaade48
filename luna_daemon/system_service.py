"""``luna-daemon service install|uninstall|status``: run the headless daemon under the
user's service manager, for machines without a tray (a server, a box reached over SSH).

What is written (per user, no admin rights):

* Linux / BSD: a systemd **user** unit, ``$XDG_CONFIG_HOME/systemd/user/luna-daemon.service``
  (``~/.config`` by default), running ``<this python> -m luna_daemon serve`` with
  ``Restart=on-failure``. Started with ``systemctl --user enable --now luna-daemon``, which
  :func:`install` runs only when asked (``enable=True``) and only if systemctl exists.
* macOS: a LaunchAgent, ``~/Library/LaunchAgents/io.github.luna-daemon.serve.plist``
  (``RunAtLoad``, restarted when it exits with a failure), written with plistlib.
* Windows: nothing; :func:`install` raises :class:`ServiceError` pointing at the tray's
  Start at Login (a shortcut in the Startup folder), which is how the daemon starts there.

What a caller can rely on:

* The entry records the interpreter, ``--config`` (absolute) and ``LUNA_HOME`` as they are
  at install time, so the service runs the same install and the same settings as the
  shell that installed it. Installing again rewrites it (idempotent: same inputs, same
  bytes, reported as unchanged).
* Every file it writes carries :data:`MARKER`; :func:`install` refuses to overwrite and
  :func:`uninstall` refuses to remove a file without it (somebody else's unit).
  :func:`uninstall` removes exactly the file :func:`install` wrote, and refuses while
  systemd still has it enabled (it would leave a dangling link) unless ``disable=True``.
* ``platform`` (a ``sys.platform`` value) and ``env`` (default ``os.environ``) are
  parameters, so tests write a macOS plist on Linux into a temporary home.
* Failures raise :class:`ServiceError` whose message says what to do.

The per-user folders come from luna_daemon.userdirs, shared with the tray's Start at
Login. Standard library only, so the command stays as light as the other CLI commands.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from luna_daemon import __version__, userdirs
from luna_daemon.fsutil import atomic_write

UNIT_NAME = "luna-daemon.service"
# Not the tray's label (io.github.luna-daemon.tray): both may be installed, and removing
# one must never touch the other.
LAUNCH_AGENT_LABEL = "io.github.luna-daemon.serve"
MARKER = "Written by `luna-daemon service install`"
# The plist has no comments: the marker is a key launchd ignores.
PLIST_MARKER_KEY = "LunaDaemonWrittenBy"
# `serve` exits 2 for settings it cannot fix by waiting (a bad LUNA_* variable, a config
# file still broken at exit): restarting would only fail again, every few seconds.
NO_RESTART_STATUS = 2


class ServiceError(RuntimeError):
    """Installing, removing or enabling the service entry failed; ``str(exc)`` says why
    and what to do."""


@dataclass
class Result:
    """What a command did: ``lines`` for people, the rest for ``--json``."""

    path: Path
    action: str  # installed, updated, unchanged, removed, absent, status
    lines: list[str] = field(default_factory=list)
    installed: bool = False
    foreign: bool = False
    enabled: bool | None = None  # systemd: the unit's wants link; None where unknown

    def as_dict(self) -> dict:
        return {"path": str(self.path), "action": self.action, "installed": self.installed,
                "foreign": self.foreign, "enabled": self.enabled, "lines": self.lines}


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def entry_path(platform: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Where the service entry lives on ``platform`` (default: this one). Windows has
    none: its path is the Startup folder the tray's Start at Login writes into."""
    kind = userdirs.platform_kind(platform)
    if kind == "macos":
        return userdirs.launch_agents_dir(env) / f"{LAUNCH_AGENT_LABEL}.plist"
    if kind == "windows":
        return userdirs.windows_startup_dir(env)
    return userdirs.config_home(env) / "systemd" / "user" / UNIT_NAME


def _wants_link(env: Mapping[str, str] | None) -> Path:
    # Where `systemctl --user enable` puts its link ([Install] WantedBy=default.target).
    return userdirs.config_home(env) / "systemd" / "user" / "default.target.wants" / UNIT_NAME


def service_command(config: str | None = None) -> list[str]:
    """argv of the service: this interpreter, ``-m luna_daemon serve`` (and ``--config``)."""
    argv = [sys.executable, "-m", "luna_daemon", "serve"]
    if config:
        argv += ["--config", str(Path(config).resolve())]
    return argv


def service_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the service gets: ``LUNA_HOME`` (absolute) when set, so it uses the
    config, token and logs of the shell that installed it; unbuffered output, so the
    journal shows log lines as they happen."""
    env = _env(env)
    out = {"PYTHONUNBUFFERED": "1"}
    if env.get("LUNA_HOME"):
        out["LUNA_HOME"] = str(Path(env["LUNA_HOME"]).expanduser().resolve())
    return out


# ----------------------------------------------------------------------------- formats
def _systemd_quote(arg: str, *, variables: bool = True) -> str:
    """One ExecStart / Environment word (systemd.syntax, "Quoting"): double quotes with
    C-style escapes; ``%`` starts a specifier everywhere, so it is doubled; ``$`` starts a
    variable only in ExecStart (``variables``), so only there it is doubled."""
    body = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("%", "%%")
    if variables:
        body = body.replace("$", "$$")
    if arg and body == arg and not any(c.isspace() or c in "';" for c in arg):
        return arg
    return f'"{body}"'


def systemd_unit(argv: Sequence[str], environment: Mapping[str, str], workdir: Path) -> str:
    """The text of the user unit (exposed for inspection / tests)."""
    lines = [
        f"# {MARKER} (luna-daemon {__version__}); `luna-daemon service uninstall` removes it.",
        "[Unit]",
        "Description=Luna Daemon (shared VAE / CLIP / LoRA server for ComfyUI)",
        "Documentation=https://github.com/luna-daemon/luna-daemon#run-as-a-service",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in argv),
        # `python -m` finds the package from here when it is a source tree (no install).
        "WorkingDirectory=" + _systemd_quote(str(workdir)),
    ]
    if environment:  # one line: an INI reader keeps only the last of repeated keys
        lines.append("Environment=" + " ".join(_systemd_quote(f"{k}={v}", variables=False)
                                               for k, v in sorted(environment.items())))
    lines += [
        "Restart=on-failure",
        "RestartSec=5",
        f"RestartPreventExitStatus={NO_RESTART_STATUS}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def launch_agent(argv: Sequence[str], environment: Mapping[str, str], workdir: Path) -> dict:
    """The LaunchAgent dictionary (exposed for inspection / tests)."""
    return {
        "Label": LAUNCH_AGENT_LABEL,
        "ProgramArguments": list(argv),
        "WorkingDirectory": str(workdir),
        "EnvironmentVariables": dict(environment),
        "RunAtLoad": True,
        # Restarted when it exits with a failure, like systemd's Restart=on-failure.
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Background",
        PLIST_MARKER_KEY: f"{MARKER} (luna-daemon {__version__})",
    }


def _render(kind: str, config: str | None, env: Mapping[str, str] | None) -> bytes:
    argv, environment, workdir = service_command(config), service_environment(env), userdirs.source_root()
    if kind == "macos":
        return plistlib.dumps(launch_agent(argv, environment, workdir))
    return systemd_unit(argv, environment, workdir).encode("utf-8")


def _ours(path: Path) -> bool:
    """Whether the file at ``path`` was written by :func:`install` (carries the marker)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return MARKER.encode() in data


# ----------------------------------------------------------------------------- commands
def _no_windows(platform: str | None, env: Mapping[str, str] | None) -> ServiceError:
    return ServiceError(
        "Windows has no per-user service manager that Luna Daemon uses: start it at login with the "
        "tray instead (tray menu > Start at Login, which puts a shortcut in "
        f"{userdirs.windows_startup_dir(env)}), or run `luna-daemon serve` from Task Scheduler")


def _gui_domain() -> str:
    # launchctl's domain of the logged-in user's agents.
    return f"gui/{os.getuid()}"


def _enable_commands(kind: str, path: Path) -> list[list[str]]:
    if kind == "macos":
        return [["launchctl", "bootstrap", _gui_domain(), str(path)]]
    return [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", "luna-daemon"]]


def _disable_commands(kind: str, path: Path) -> list[list[str]]:
    if kind == "macos":
        return [["launchctl", "bootout", _gui_domain(), str(path)]]
    return [["systemctl", "--user", "disable", "--now", "luna-daemon"]]


def _shell(cmd: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def _run(cmds: list[list[str]], env: Mapping[str, str] | None) -> list[str]:
    """Run the service manager's commands (found on ``env``'s PATH); raise with what to
    type if it is missing or one fails."""
    env = dict(_env(env))
    tool = shutil.which(cmds[0][0], path=env.get("PATH"))
    if tool is None:
        raise ServiceError(f"{cmds[0][0]} not found on PATH: run "
                           + " && ".join(_shell(c) for c in cmds) + " on a machine where it is")
    lines = []
    for cmd in cmds:
        try:
            res = subprocess.run([tool, *cmd[1:]], env=env, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServiceError(f"could not run {_shell(cmd)}: {exc}") from None
        if res.returncode != 0:
            why = (res.stderr or res.stdout).strip()[:400]
            raise ServiceError(f"{_shell(cmd)} failed (exit {res.returncode}): {why}")
        lines.append(f"ran: {_shell(cmd)}")
    return lines


def install(platform: str | None = None, env: Mapping[str, str] | None = None, *,
            config: str | None = None, enable: bool = False) -> Result:
    """Write (or rewrite) the service entry; with ``enable``, also start it now and at
    every login through the service manager. Raises ServiceError on Windows, for a file
    at the path that this command did not write, and when writing or enabling fails."""
    kind = userdirs.platform_kind(platform)
    if kind == "windows":
        raise _no_windows(platform, env)
    path = entry_path(platform, env)
    data = _render(kind, config, env)
    old = None
    if path.exists() or path.is_symlink():
        if not _ours(path):
            raise ServiceError(f"{path} exists and was not written by luna-daemon: it is left alone. "
                               "Remove or rename it yourself, then run `luna-daemon service install` again")
        old = path.read_bytes()
    if old == data:
        action = "unchanged"
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError as exc:
            raise ServiceError(f"could not write {path}: {exc}") from None
        action = "installed" if old is None else "updated"
    res = Result(path, action, installed=True)
    res.lines.append(f"{action}: {path}")
    cmds = _enable_commands(kind, path)
    if enable:
        res.lines += _run(cmds, env)
    else:
        verb = "start it now and at every login" if kind == "xdg" else "load it now (it starts at every login)"
        res.lines.append(f"to {verb}: " + " && ".join(_shell(c) for c in cmds))
        if kind == "xdg":
            res.lines.append("to keep it running while you are logged out: loginctl enable-linger")
    return res


def uninstall(platform: str | None = None, env: Mapping[str, str] | None = None, *,
              disable: bool = False) -> Result:
    """Remove the entry :func:`install` wrote (nothing else). With ``disable`` the
    service manager stops and disables it first; without, an enabled systemd unit is
    refused (removing it would leave systemd's link dangling and the daemon running)."""
    kind = userdirs.platform_kind(platform)
    if kind == "windows":
        raise _no_windows(platform, env)
    path = entry_path(platform, env)
    if not (path.exists() or path.is_symlink()):
        return Result(path, "absent", [f"nothing to remove: {path} does not exist"])
    if not _ours(path):
        raise ServiceError(f"{path} was not written by luna-daemon: it is left alone (remove it yourself)")
    res = Result(path, "removed")
    cmds = _disable_commands(kind, path)
    if disable:
        res.lines += _run(cmds, env)
    elif kind == "xdg" and _wants_link(env).is_symlink():
        raise ServiceError(f"{UNIT_NAME} is still enabled: run {_shell(cmds[0])} first, "
                           "or `luna-daemon service uninstall --disable`")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ServiceError(f"could not remove {path}: {exc}") from None
    res.lines.append(f"removed: {path}")
    if kind == "macos" and not disable:
        res.lines.append("if it is loaded, also run: " + _shell(cmds[0]))
    return res


def status(platform: str | None = None, env: Mapping[str, str] | None = None) -> Result:
    """Whether the entry exists and is ours; on systemd, whether it is enabled."""
    kind = userdirs.platform_kind(platform)
    if kind == "windows":
        return Result(entry_path(platform, env), "status",
                      ["Windows: no service entry; the tray's Start at Login starts Luna Daemon at login"])
    path = entry_path(platform, env)
    present = path.exists() or path.is_symlink()
    res = Result(path, "status", installed=present and _ours(path), foreign=present and not _ours(path))
    if res.foreign:
        res.lines.append(f"{path} exists but was not written by luna-daemon")
    elif res.installed:
        res.lines.append(f"installed: {path}")
    else:
        res.lines.append(f"not installed ({path}); `luna-daemon service install` writes it")
    if kind == "xdg" and res.installed:
        res.enabled = _wants_link(env).is_symlink()
        res.lines.append("enabled (starts at login)" if res.enabled
                         else "not enabled: systemctl --user enable --now luna-daemon")
    return res
