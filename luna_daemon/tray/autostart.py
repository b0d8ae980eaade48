"""Start at Login: a reversible per-user autostart entry that launches the tray.

Where the entry lives (all per user, no admin rights):

* Windows: ``%APPDATA%\\Microsoft\\Windows\\Start Menu\\Programs\\Startup\\Luna Daemon.lnk``,
  a shortcut to ``pythonw.exe -m luna_daemon tray`` (no console window), written through
  PowerShell's ``WScript.Shell`` COM object.
* Linux / BSD: ``$XDG_CONFIG_HOME/autostart/luna-daemon.desktop`` (XDG Autostart spec;
  ``$XDG_CONFIG_HOME`` defaults to ``~/.config``).
* macOS: ``~/Library/LaunchAgents/io.github.luna-daemon.tray.plist`` (``RunAtLoad``).

What a caller can rely on:

* :func:`is_enabled` reads the disk every time (the menu checkbox shows what is really
  there, including a desktop's own "disable" switch: ``Hidden=true`` or
  ``X-GNOME-Autostart-enabled=false`` in the .desktop file, ``Disabled`` in the plist).
* :func:`enable` (re)writes the entry and returns its path; :func:`disable` removes it
  and returns whether there was one. Both raise :class:`AutostartError` with a reason.
* The launched command is this interpreter (``pythonw.exe`` on Windows) with
  ``-m luna_daemon tray`` and the working directory of this checkout, so it works for
  an editable install and for a plain source tree. No path is hard-coded.
* ``HOME``, ``XDG_CONFIG_HOME`` and ``APPDATA`` are honoured, so tests use a temp home.
"""

from __future__ import annotations

import plistlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from luna_daemon.fsutil import atomic_write
from luna_daemon.userdirs import (
    config_home,
    launch_agents_dir,
    platform_kind,
    source_root,
    windows_startup_dir,
)

DESKTOP_NAME = "luna-daemon.desktop"
LAUNCH_AGENT_LABEL = "io.github.luna-daemon.tray"
SHORTCUT_NAME = "Luna Daemon.lnk"


class AutostartError(RuntimeError):
    """Enabling or disabling failed; ``str(exc)`` says why."""


_platform = platform_kind  # the paths are shared with luna_daemon.system_service (userdirs)


def entry_path(platform: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Where the autostart entry lives on ``platform`` (default: this one)."""
    kind = _platform(platform)
    if kind == "windows":
        return windows_startup_dir(env) / SHORTCUT_NAME
    if kind == "macos":
        return launch_agents_dir(env) / f"{LAUNCH_AGENT_LABEL}.plist"
    return config_home(env) / "autostart" / DESKTOP_NAME


def launcher_command(platform: str | None = None, config: str | None = None) -> list[str]:
    """argv that starts the tray without a console window."""
    exe = Path(sys.executable)
    if _platform(platform) == "windows":
        gui = exe.with_name("pythonw.exe")
        if gui.exists() or exe.name.lower() == "python.exe":
            exe = gui
    argv = [str(exe), "-m", "luna_daemon", "tray"]
    if config:
        argv += ["--config", str(Path(config).resolve())]
    return argv


def is_enabled(platform: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    path = entry_path(platform, env)
    try:
        if not path.is_file():
            return False
        kind = _platform(platform)
        if kind == "xdg":
            return _desktop_enabled(path.read_text(encoding="utf-8", errors="replace"))
        if kind == "macos":
            with path.open("rb") as fh:
                return not plistlib.load(fh).get("Disabled", False)
        return True
    except (OSError, ValueError, plistlib.InvalidFileException):
        return False


def _desktop_enabled(text: str) -> bool:
    in_entry = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            in_entry = line == "[Desktop Entry]"
            continue
        if not in_entry or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key == "Hidden" and value.lower() == "true":
            return False
        if key == "X-GNOME-Autostart-enabled" and value.lower() == "false":
            return False
    return True


def enable(platform: str | None = None, env: Mapping[str, str] | None = None,
           command: Sequence[str] | None = None, config: str | None = None) -> Path:
    """Write the autostart entry (replacing any existing one). Returns its path."""
    kind = _platform(platform)
    path = entry_path(platform, env)
    argv = list(command) if command else launcher_command(platform, config)
    workdir = source_root()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "xdg":
            atomic_write(path, desktop_entry(argv, workdir).encode("utf-8"))
        elif kind == "macos":
            atomic_write(path, plistlib.dumps(launch_agent(argv, workdir)))
        else:
            _write_shortcut(path, argv, workdir)
    except OSError as exc:
        raise AutostartError(f"could not write {path}: {exc}") from None
    return path


def disable(platform: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Remove the autostart entry. True if one was removed."""
    path = entry_path(platform, env)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise AutostartError(f"could not remove {path}: {exc}") from None
    return True


# ----------------------------------------------------------------------------- formats
def _desktop_quote(arg: str) -> str:
    # Desktop Entry spec, "The Exec key": quote args with reserved characters; inside
    # quotes escape ", `, $ and \ with a backslash. Then every \ is escaped once more
    # because the value itself is a string with escape sequences.
    reserved = set(' \t\n"\'\\><~|&;$*?#()`')
    if arg and not (set(arg) & reserved):
        return arg.replace("%", "%%")
    inner = "".join("\\" + c if c in '"`$\\' else c for c in arg)
    return ('"' + inner + '"').replace("\\", "\\\\").replace("%", "%%")


def desktop_entry(argv: Sequence[str], workdir: Path) -> str:
    return "\n".join([
        "[Desktop Entry]",
        "Type=Application",
        "Name=Luna Daemon",
        "Comment=Shared VAE / CLIP server for ComfyUI (system tray)",
        "Exec=" + " ".join(_desktop_quote(a) for a in argv),
        f"Path={workdir}",
        "Terminal=false",
        "X-GNOME-Autostart-enabled=true",
        "",
    ])


def launch_agent(argv: Sequence[str], workdir: Path) -> dict:
    return {
        "Label": LAUNCH_AGENT_LABEL,
        "ProgramArguments": list(argv),
        "WorkingDirectory": str(workdir),
        "RunAtLoad": True,
        "ProcessType": "Interactive",
    }


def _ps_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _win_join(args: Sequence[str]) -> str:
    return subprocess.list2cmdline(list(args))


def shortcut_script(path: Path, argv: Sequence[str], workdir: Path) -> str:
    """The PowerShell that writes the .lnk (exposed for inspection / tests)."""
    return "; ".join([
        "$ErrorActionPreference = 'Stop'",
        "$s = (New-Object -ComObject WScript.Shell).CreateShortcut(" + _ps_quote(str(path)) + ")",
        "$s.TargetPath = " + _ps_quote(argv[0]),
        "$s.Arguments = " + _ps_quote(_win_join(argv[1:])),
        "$s.WorkingDirectory = " + _ps_quote(str(workdir)),
        "$s.WindowStyle = 7",  # minimised: pythonw has no window anyway
        "$s.Description = 'Luna Daemon (system tray)'",
        "$s.Save()",
    ])


def _write_shortcut(path: Path, argv: Sequence[str], workdir: Path) -> None:
    script = shortcut_script(path, argv, workdir)
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    try:
        res = subprocess.run(
            ["powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-Command", script],
            capture_output=True, text=True, timeout=30, creationflags=flags,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AutostartError(f"could not run PowerShell to create the shortcut: {exc}") from None
    if res.returncode != 0 or not path.is_file():
        raise AutostartError(f"PowerShell could not create {path}: {(res.stderr or res.stdout).strip()[:300]}")

