"""``luna-daemon`` command line (thin over the client, the settings and the host).

Output for people goes to stdout; ``--json`` on read commands prints machine-readable JSON.
Exit codes: 0 ok, 1 failure (daemon error / already running / doctor found a problem),
2 usage or a bad config file (``status``, ``ps``, ``stop`` and ``logs`` warn on stderr and go
on; ``serve`` keeps its dashboard up and exits 2 only if it ends before the file is fixed),
3 daemon unreachable (nothing listens, or the port's holder is not a Luna daemon),
4 ``serve`` stopped uncleanly (work was cut off at ``stop_timeout``).

This module is the parser, :func:`main` and the mapping of known failures to exit codes;
the commands live by concern in ``cli_common`` (output, settings, exit codes, reaching the
daemon and its instances), ``cli_process`` (``serve``, ``tray``), ``cli_control`` (``status``,
``ps``, ``unload``, ``load``, ``stop``), ``cli_local`` (``config``, ``logs``, ``dashboard``,
``doctor``) and ``cli_tools`` (``demo``, ``service``, ``bench``). Every name this module had
before that split is still importable from here.

Start-up cost: these modules import only the standard library (and ``luna_daemon.units`` /
``luna_daemon.models.sharing``) at module level, and each
command imports what it needs when it runs. The light commands (``--version``, ``--help``,
``status``, ``ps``, ``stop``, ``unload``, ``load``, ``logs``, ``config``, ``dashboard``,
``doctor --no-devices``, ``service``) never import torch (tests/test_cli.py and
tests/test_packaging.py check ``sys.modules``); ``serve``,
``tray``, ``demo``, ``bench`` and doctor's device check do.

Several instances (``[[instances]]``): ``status``, ``ps``, ``unload``, ``load`` and ``stop``
connect to the primary, read the instance map from its ``hello`` and act on every instance
(``load``: the one that serves the kind) or on ``--instance NAME`` (see
:func:`luna_daemon.cli_common._reach`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from luna_daemon import __version__

# Re-exported: the names luna_daemon.cli defined before it was split (entry points, tests,
# scripts import from here).
from luna_daemon.cli_common import (  # noqa: F401
    EXIT_FAIL, EXIT_OK, EXIT_UNAVAILABLE, EXIT_UNCLEAN, EXIT_USAGE, HANDSHAKE_S, UsageError, _answers, _connect,
    _down_lines, _down_reason, _entries, _json, _out, _Reach, _reach, _settings)
from luna_daemon.cli_control import (  # noqa: F401
    _label, _models_table, _roots, _status_lines, cmd_load, cmd_ps, cmd_status, cmd_stop, cmd_unload)
from luna_daemon.cli_local import (  # noqa: F401
    DASHBOARD_PAGES, _setting_text, _settings_or_none, can_open_browser, cmd_config, cmd_dashboard, cmd_doctor,
    cmd_logs)
from luna_daemon.cli_process import _serve_instance, cmd_serve, cmd_tray, tray_entry  # noqa: F401
from luna_daemon.cli_tools import _has_module, _isatty, _report, cmd_bench, cmd_demo, cmd_service  # noqa: F401


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="luna-daemon", description="Luna Daemon: shared VAE / CLIP / LoRA for ComfyUI instances.")
    p.add_argument("--version", action="version", version=f"luna-daemon {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default: the user config dir)")
    common.add_argument("--host", help="daemon host (default 127.0.0.1)")
    common.add_argument("--port", type=int, help="daemon port (default 19283)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--timeout", type=float, help="client timeout in seconds")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground (headless)")
    s.add_argument("--monitor-port", type=int, dest="monitor_port", help="dashboard port (default 19285)")
    s.add_argument("--lock-port", type=int, dest="lock_port", help="single-instance lock port (default 19299)")
    s.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    s.add_argument("--no-monitor", action="store_true", help="do not serve the dashboard")
    s.add_argument("--instance", metavar="NAME",
                   help="run only this [[instances]] entry, as a child of a host (no lock, no dashboard)")
    # Set by the supervising host (supervisor.child_command), not meant for people.
    s.add_argument("--supervised-by", type=int, dest="supervised_by", help=argparse.SUPPRESS)
    s.add_argument("--instance-overrides", dest="instance_overrides", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("tray", parents=[common], help="run the system-tray app")
    t.set_defaults(func=cmd_tray, no_monitor=False)

    # --instance NAME: one instance of a host running several ([[instances]] in config.toml).
    inst = argparse.ArgumentParser(add_help=False)
    inst.add_argument("--instance", metavar="NAME", help="only this instance (default: every instance; "
                      "load: one that serves the kind)")
    sub.add_parser("status", parents=[common, inst], help="daemon status (every instance)").set_defaults(func=cmd_status)
    sub.add_parser("ps", parents=[common, inst], help="list loaded models (every instance)").set_defaults(func=cmd_ps)
    u = sub.add_parser("unload", parents=[common, inst], help="unload a model or all (on every instance)")
    u.add_argument("model", nargs="?")
    u.add_argument("--all", action="store_true")
    u.set_defaults(func=cmd_unload)
    ld = sub.add_parser("load", parents=[common, inst], help="load a VAE or CLIP now (warm the daemon before ComfyUI starts)")
    ld.add_argument("kind", choices=("vae", "clip"))
    ld.add_argument("paths", nargs="+", metavar="PATH", help="one VAE; one or more CLIP text-encoder files")
    ld.add_argument("--type", dest="clip_type", help="CLIP type: sd1 (default), sdxl, flux, ...")
    ld.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default: vae_device / clip_device)")
    ld.add_argument("--dtype", help="auto, fp32, fp16, bf16 (default: vae_dtype / clip_dtype)")
    ld.add_argument("--keep-alive", dest="keep_alive", help="how long it stays loaded when idle: 30s, 5m, forever")
    ld.set_defaults(func=cmd_load)
    sub.add_parser("stop", parents=[common, inst], help="stop the daemon cleanly (the host and every instance; "
                   "--instance: that one)").set_defaults(func=cmd_stop)
    db = sub.add_parser("dashboard", parents=[common], help="print (and open) a one-time login link to the dashboard")
    db.add_argument("page", nargs="?", default="status", choices=DASHBOARD_PAGES)
    db.add_argument("--no-open", action="store_true", help="only print the link, never start a browser")
    db.add_argument("--lock-port", type=int, dest="lock_port", help="the running host's lock port (default 19299)")
    db.set_defaults(func=cmd_dashboard)
    c = sub.add_parser("config", parents=[common], help="show the effective settings and where each comes from")
    c.add_argument("--show", action="store_true", help="(default) print every setting with its source")
    c.set_defaults(func=cmd_config)
    lg = sub.add_parser("logs", parents=[common], help="print the end of the log file")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--path", action="store_true", help="print the log file's path only")
    lg.set_defaults(func=cmd_logs)
    dr = sub.add_parser("doctor", parents=[common], help="check config, ports, lock, token, ComfyUI, engine, devices, model roots")
    dr.add_argument("--no-devices", action="store_true", help="skip the device check (the only one that imports torch)")
    dr.set_defaults(func=cmd_doctor)
    sub.add_parser("demo", parents=[common], help="offline proof: tiny models, a daemon, encode/decode").set_defaults(func=cmd_demo)
    sv = sub.add_parser("service", parents=[common], help="run `serve` at login under systemd (user unit) or "
                        "launchd (LaunchAgent): install, uninstall, status")
    sv.add_argument("action", choices=("install", "uninstall", "status"))
    sv.add_argument("--enable", action="store_true", help="install: also run `systemctl --user enable --now "
                    "luna-daemon` (launchctl bootstrap on macOS)")
    sv.add_argument("--disable", action="store_true", help="uninstall: stop and disable it first")
    sv.set_defaults(func=cmd_service)
    b = sub.add_parser("bench", parents=[common], help="benchmarks (transport by default)")
    b.add_argument("--memory", action="store_true", help="memory sharing benchmark")
    b.add_argument("--startup", action="store_true", help="tray launch -> green")
    b.add_argument("--cli", action="store_true", help="CLI response times (--version, --help, status, ps, config) as subprocesses")
    b.add_argument("--proxy", action="store_true", help="ComfyUI proxy per-call overhead vs in-process (needs ComfyUI: comfyui_root / COMFYUI_PATH)")
    b.add_argument("--reliability", action="store_true", help="hostile-client suite: fuzz, floods, stop under load, killed clients, odd files, dashboard; exit 1 if anything failed")
    b.add_argument("--instances", action="store_true", help="two clients (VAE decodes + CLIP encodes) at once: one full "
                   "daemon vs a VAE and a CLIP instance, both engines")
    b.add_argument("--quick", action="store_true", help="with --reliability: small counts (what CI runs); with "
                   "--instances: 1 s per measurement")
    b.add_argument("--repeats", type=int, default=None, help="samples per measurement (default: per benchmark)")
    b.add_argument("--model-mb", type=int, default=320, dest="model_mb")
    b.add_argument("--clients", type=int, default=3)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.command not in ("serve", "tray"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        return code


def _exit_code(exc: Exception) -> int | None:
    """Print a known failure and return its exit code; None for anything else."""
    from luna_daemon.settings import SettingsError

    if isinstance(exc, SettingsError):
        _out(f"invalid setting: {exc}")
        return EXIT_USAGE
    if isinstance(exc, UsageError):
        _out(str(exc))
        return EXIT_USAGE
    # Looked up, not imported: a client error can only come from a client that a command
    # imported, and importing it up front would slow every command down.
    client = sys.modules.get("luna_daemon.client")
    if client is not None and isinstance(exc, client.DaemonUnavailable):
        _out(str(exc))
        return EXIT_UNAVAILABLE
    if client is not None and isinstance(exc, client.DaemonError):
        _out(f"daemon error ({exc.code}): {exc.message}")
        return EXIT_FAIL
    return None


if __name__ == "__main__":
    sys.exit(main())
