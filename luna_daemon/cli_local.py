"""The ``luna-daemon`` commands about this machine's setup rather than the daemon port:
``config`` (the effective settings and their sources), ``logs`` (the log file), ``dashboard``
(a one-time login link from the running host's lock port) and ``doctor`` (the checks of
luna_daemon.doctor). Only ``doctor``'s device check imports torch (``--no-devices`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from luna_daemon.cli_common import EXIT_FAIL, EXIT_OK, EXIT_UNAVAILABLE, _json, _out, _settings
from luna_daemon.units import fmt_bytes, fmt_duration


def _setting_text(key: str, value: Any) -> str:
    """A setting as people read it: sizes and durations through luna_daemon.units."""
    from luna_daemon.settings import value_kind

    kind = value_kind(key)
    if kind == "duration" and isinstance(value, (int, float)):
        return fmt_duration(value)
    if kind == "size" and isinstance(value, int):
        return fmt_bytes(value)
    if kind == "size_map" and isinstance(value, dict):
        return ", ".join(f"{dev}={fmt_bytes(n)}" for dev, n in value.items()) or "none"
    return json.dumps(value, default=str)


def cmd_config(args: argparse.Namespace) -> int:
    # Strict: ``config`` is how a file is checked; a bad one is exit 2 naming file, line, key.
    s = _settings(args)
    rows = {k: {"value": v, "source": s.sources.get(k, "default")} for k, v in s.public_dict().items()}
    if args.json:
        _json({"config_file": s.config_file, "settings": rows})
        return EXIT_OK
    _out(f"config file: {s.config_file}")
    width = max(len(k) for k in rows)
    for k, r in rows.items():
        _out(f"  {k:<{width}}  {_setting_text(k, r['value']):<40} ({r['source']})")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    s = _settings(args, tolerant=True)
    if args.path:
        _out(str(s.log_file))
        return EXIT_OK
    try:
        lines = s.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        _out(f"no log file yet at {s.log_file}")
        return EXIT_OK
    for line in lines[-args.lines:]:
        _out(line)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from luna_daemon.doctor import FAIL, WARN, run_checks

    settings, error = _settings_or_none(args)
    findings = run_checks(settings, error, devices=not args.no_devices, config_file=getattr(args, "config", None))
    if args.json:
        _json([f._asdict() for f in findings])
    else:
        for f in findings:
            _out(f"[{f.status:<4}] {f.check}: {f.finding}")
            if f.fix:
                _out(f"       fix: {f.fix}")
        bad, warns = (sum(f.status == st for f in findings) for st in (FAIL, WARN))
        _out(f"{bad} problem(s), {warns} warning(s)")
    return EXIT_FAIL if any(f.status == FAIL for f in findings) else EXIT_OK


def _settings_or_none(args: argparse.Namespace):
    """(settings, None) or (None, the SettingsError): doctor reports a bad config as a finding."""
    from luna_daemon.settings import SettingsError

    try:
        return _settings(args), None
    except SettingsError as exc:
        return None, exc


# Pages of the dashboard (web/common.py PAGES; not imported: it would load the web face).
DASHBOARD_PAGES = ("status", "models", "logs", "settings")


def can_open_browser(env: Any = None, platform: str | None = None) -> bool:
    """Whether a browser window can appear: always on Windows / macOS, elsewhere only with
    DISPLAY or WAYLAND_DISPLAY (over SSH a text browser would take over the terminal)."""
    env = os.environ if env is None else env
    platform = platform or sys.platform
    return platform in ("win32", "darwin") or bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def cmd_dashboard(args: argparse.Namespace) -> int:
    """A one-time dashboard login link from the running host (lock port, proven by the
    token); opened in a browser when one can be opened."""
    from luna_daemon.instance import LoginRefused, NotLunaHost, request_login
    from luna_daemon.settings import read_token

    s = _settings(args)
    token = read_token(s)
    if not token:
        _out(f"no token at {s.token_path}: the daemon has never run with this config; start it with `luna-daemon serve`")
        return EXIT_UNAVAILABLE
    try:
        url = request_login(s.host, s.lock_port, token, args.page)
    except ConnectionRefusedError:
        _out(f"Luna Daemon is not running (nothing on lock port {s.lock_port}); start it with `luna-daemon serve`")
        return EXIT_UNAVAILABLE
    except NotLunaHost as exc:
        _out(f"port {s.lock_port} (lock_port) is held by {exc.owner}, not Luna Daemon")
        return EXIT_UNAVAILABLE
    except LoginRefused as exc:
        _out({
            "token": f"the running Luna host refused this token ({s.token_path}): it was started with another "
                     "config dir (--config / LUNA_CONFIG_DIR); run this command with the same settings",
            "monitor": "the running Luna host serves no dashboard (started with --no-monitor, or monitor_port was "
                       "taken: see `luna-daemon logs`)",
            "page": f"unknown page {args.page!r}",
        }.get(exc.reason, "the running Luna host is too old to hand out login links; restart it after updating"))
        return EXIT_FAIL
    opened = False
    if not args.no_open and can_open_browser():
        import webbrowser

        try:
            opened = bool(webbrowser.open(url))
        except Exception:  # noqa: BLE001 - no usable browser: the printed link still works
            opened = False
    if args.json:
        _json({"url": url, "page": args.page, "opened": opened})
    else:
        _out(url)
        _out("opened in your browser" if opened else "open this link in a browser on this machine (valid once, for a "
             "short time); it logs the page in to start, stop, unload and change settings")
    return EXIT_OK
