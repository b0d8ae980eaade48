"""The ``luna-daemon`` tool commands: ``demo`` (the offline proof), ``service`` (the login
service, luna_daemon.system_service) and ``bench`` (the shipped benchmarks). Each imports
its module when it runs; ``demo`` and most benchmarks load torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from luna_daemon.cli_common import EXIT_FAIL, EXIT_OK, _json, _out


def cmd_demo(args: argparse.Namespace) -> int:
    from luna_daemon import demo

    # Each step is shown as it happens (the first, importing torch, takes seconds): a live
    # display on a terminal when rich is installed, else one plain line per step event.
    if args.json:
        report = demo.run_demo()
    elif _isatty(sys.stdout) and _has_module("rich"):
        with demo.RichProgress() as progress:
            report = demo.run_demo(progress)
    else:
        report = demo.run_demo(demo.PlainProgress(_out))
    _report(args, report)
    return EXIT_OK if report["ok"] else EXIT_FAIL


def cmd_service(args: argparse.Namespace) -> int:
    """``service install|uninstall|status``: the systemd user unit / LaunchAgent that runs
    ``serve`` (luna_daemon.system_service). Exit 1 when it refuses or fails."""
    from luna_daemon import system_service

    try:
        if args.action == "install":
            res = system_service.install(config=getattr(args, "config", None), enable=args.enable)
        elif args.action == "uninstall":
            res = system_service.uninstall(disable=args.disable)
        else:
            res = system_service.status()
    except system_service.ServiceError as exc:
        _out(f"luna-daemon service {args.action}: {exc}")
        return EXIT_FAIL
    if args.json:
        _json(res.as_dict())
    else:
        for line in res.lines:
            _out(line)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from luna_daemon import bench

    # Each benchmark has its own default number of repeats (a tray launch takes
    # seconds, a loopback exchange milliseconds); --repeats overrides it.
    kw = {} if args.repeats is None else {"repeats": args.repeats}
    if args.reliability:
        from luna_daemon.reliability import run as reliability_suite  # docs/reliability.md

        report = reliability_suite(quick=args.quick, progress=None if args.json else _out)
        _report(args, report)
        return EXIT_OK if report["ok"] else EXIT_FAIL
    if args.memory:
        report = bench.memory_benchmark(model_mb=args.model_mb, clients=args.clients)
    elif args.startup:
        from luna_daemon.tray.bench import startup_benchmark  # tray launch, or headless serve -> ping

        report = startup_benchmark(**kw)
    elif args.cli:
        from luna_daemon.cli_bench import cli_benchmark

        report = cli_benchmark(**kw)
    elif args.instances:
        from luna_daemon.instances_bench import instances_benchmark

        report = instances_benchmark(quick=args.quick)
    elif args.proxy:
        from luna_daemon.comfy_nodes.bench import proxy_overhead_benchmark

        report = proxy_overhead_benchmark(**kw)
    else:
        report = bench.transport_benchmark(**kw)
    _report(args, report)
    return EXIT_OK


def _isatty(stream: Any) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _report(args: argparse.Namespace, report: dict) -> None:
    """A demo / benchmark report: the whole object with --json, else its lines."""
    if args.json:
        _json(report)
    else:
        for line in report.get("lines", []):
            _out(line)
