"""Per-user folders where a login entry lives, shared by the tray's Start at Login
(tray/autostart.py) and ``luna-daemon service`` (system_service.py), which must agree on
them and may not import each other (faces never do; docs/architecture.md).

Every function takes ``env`` (default ``os.environ``) and honours ``HOME``,
``USERPROFILE``, ``XDG_CONFIG_HOME`` and ``APPDATA``, so tests work in a temp home;
``platform`` is a ``sys.platform`` value (default: this one). Standard library only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def platform_kind(platform: str | None = None) -> str:
    """``"windows"``, ``"macos"`` or ``"xdg"`` (Linux, BSD): the family ``platform`` belongs to."""
    p = platform or sys.platform
    if p.startswith("win"):
        return "windows"
    if p == "darwin":
        return "macos"
    return "xdg"


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$HOME`` (``%USERPROFILE%``), else the account's home."""
    env = _env(env)
    home = env.get("HOME") or env.get("USERPROFILE")
    return Path(home) if home else Path.home()


def config_home(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME`` when it is absolute (the XDG spec ignores a relative one),
    else ``~/.config``."""
    xdg = _env(env).get("XDG_CONFIG_HOME")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else home_dir(env) / ".config"


def launch_agents_dir(env: Mapping[str, str] | None = None) -> Path:
    """macOS: ``~/Library/LaunchAgents``."""
    return home_dir(env) / "Library" / "LaunchAgents"


def windows_startup_dir(env: Mapping[str, str] | None = None) -> Path:
    """Windows: the Startup folder of the Start Menu (``%APPDATA%\\...\\Startup``)."""
    appdata = _env(env).get("APPDATA")
    base = Path(appdata) if appdata else home_dir(env) / "AppData" / "Roaming"
    return base / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup"


def source_root() -> Path:
    """The directory that holds the ``luna_daemon`` package (a checkout, or site-packages):
    the working directory of a login entry, so ``python -m luna_daemon`` finds the package
    also from a source tree that was never installed."""
    return Path(__file__).resolve().parent.parent
