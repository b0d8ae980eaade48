"""The ``luna-daemon`` commands that run a long-lived process: ``serve`` (a headless host,
or with ``--instance`` one instance as a child of a host) and ``tray`` (the system-tray app,
also the ``luna-daemon-tray`` gui-script). They import the host or the tray when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from luna_daemon.cli_common import EXIT_FAIL, EXIT_OK, EXIT_UNCLEAN, EXIT_USAGE, _out, _settings

# The name the CLI always logged under (one module before the split): log lines stay the same.
log = logging.getLogger("luna_daemon.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon (and the monitor) in the foreground until Ctrl-C / SIGTERM / stop."""
    from luna_daemon.daemon import DaemonStartError
    from luna_daemon.host import AlreadyRunning, Host
    from luna_daemon.settings import problems_text

    if getattr(args, "instance", None):
        return _serve_instance(args)
    settings = _settings(args, tolerant=True)  # the host reports a bad file and keeps the daemon stopped
    # A bad LUNA_* variable or flag cannot be fixed by editing the file the host watches:
    # waiting for that would only hang whoever started us (a launcher, a service manager).
    fixed_outside = [p for p in settings.problems if not p.file]
    if fixed_outside:
        _out(f"invalid setting: {problems_text(fixed_outside)} (set in the environment or on the command line)")
        return EXIT_USAGE
    host = Host(settings)
    try:
        host.acquire()
    except AlreadyRunning as exc:
        _out(str(exc))  # Luna (pid) or the foreign program holding lock_port
        return EXIT_FAIL
    if not args.no_monitor:
        host.start_monitor()
        if host.monitor is not None:
            # A headless host has no tray menu to open a logged-in dashboard from.
            log.info("dashboard login link (to start, stop, unload, change settings): run `luna-daemon dashboard`")
    try:
        clean = host.serve()
    except DaemonStartError as exc:
        _out(f"Luna Daemon failed to start: {exc}")
        host.close(2.0)
        return EXIT_FAIL
    if host.start_refused:
        code = EXIT_USAGE  # the daemon never ran: the config file was broken until the end
    else:
        code = EXIT_OK if clean else EXIT_UNCLEAN
    return host.end_process(code)


def _serve_instance(args: argparse.Namespace) -> int:
    """``serve --instance NAME``: one instance as a child host (host.InstanceHost). It
    does not wait for a file fix at start (its watcher only applies edits once it
    serves): any settings problem exits 2."""
    from luna_daemon.daemon import DaemonStartError
    from luna_daemon.host import InstanceHost
    from luna_daemon.settings import Settings, SettingsError, problems_text

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "monitor_port", "lock_port", "log_level")}
    try:
        overrides.update(json.loads(args.instance_overrides) if args.instance_overrides else {})
        settings = Settings.load(getattr(args, "config", None), overrides=overrides, tolerant=True)
        if settings.problems:
            _out(f"invalid setting: {problems_text(settings.problems)}")
            return EXIT_USAGE
        host = InstanceHost(settings, args.instance, supervised_by=args.supervised_by)
    except (SettingsError, ValueError) as exc:  # no such instance / unreadable overrides
        _out(f"Luna Daemon instance {args.instance!r}: {exc}")
        return EXIT_USAGE
    try:
        clean = host.serve()
    except DaemonStartError as exc:
        _out(f"Luna Daemon instance {args.instance!r} failed to start: {exc}")
        return EXIT_FAIL
    return host.end_process(EXIT_OK if clean else EXIT_UNCLEAN)


def cmd_tray(args: argparse.Namespace) -> int:
    try:
        from luna_daemon.tray.app import main as tray_main
    except ImportError as exc:
        _out(f"the tray app is not available ({exc}); running headless")
        args.no_monitor = False
        return cmd_serve(args)
    return tray_main(config=getattr(args, "config", None))


def tray_entry() -> int:
    """The ``luna-daemon-tray`` gui-script (no console window on Windows): ``luna-daemon tray``."""
    from luna_daemon.cli import main  # the parser lives there, and it imports this module

    return main(["tray", *sys.argv[1:]])
