"""``luna-daemon`` command line (thin over the client, the settings and the host).

Output for people goes to stdout; ``--json`` on read commands prints machine-readable JSON.
Exit codes: 0 ok, 1 failure (daemon error / already running), 2 usage, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

from luna_daemon import __version__

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _json(obj: Any) -> None:
    _out(json.dumps(obj, indent=2, default=str))


def _settings(args: argparse.Namespace):
    from luna_daemon.settings import Settings

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "monitor_port", "lock_port", "log_level")}
    return Settings.load(getattr(args, "config", None), overrides=overrides)


def _client(args: argparse.Namespace):
    from luna_daemon.client import DaemonClient

    return DaemonClient.from_settings(_settings(args), timeout=getattr(args, "timeout", None) or 120.0)


def _mb(n: Any) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon (and the monitor) in the foreground until Ctrl-C / SIGTERM / stop."""
    from luna_daemon.daemon import DaemonStartError
    from luna_daemon.host import AlreadyRunning, Host
    from luna_daemon.instance import ALREADY_RUNNING

    settings = _settings(args)
    host = Host(settings)
    try:
        host.acquire()
    except AlreadyRunning:
        _out(ALREADY_RUNNING)
        return EXIT_FAIL
    if not args.no_monitor:
        host.start_monitor()
    try:
        clean = host.serve()
    except DaemonStartError as exc:
        _out(f"Luna Daemon failed to start: {exc}")
        host.close(2.0)
        return EXIT_FAIL
    return EXIT_OK if clean else EXIT_FAIL


def cmd_tray(args: argparse.Namespace) -> int:
    try:
        from luna_daemon.tray.app import main as tray_main
    except ImportError as exc:
        _out(f"the tray app is not available ({exc}); running headless")
        args.no_monitor = False
        return cmd_serve(args)
    return tray_main(config=getattr(args, "config", None))


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.status()
    if args.json:
        _json(st)
        return EXIT_OK
    req = st.get("requests", {})
    _out(f"Luna Daemon {st.get('version')} — {st.get('state')}  engine={st.get('engine')}  service={st.get('service')}")
    _out(f"  uptime {st.get('uptime', 0):.0f}s · clients {st.get('clients')} · models {st.get('models')} · queue {st.get('queue')}")
    _out(f"  requests {req.get('total', 0)} ({req.get('errors', 0)} failed, {req.get('per_minute', 0)}/min)")
    for dev, m in (st.get("devices") or {}).items():
        _out(f"  {dev}: models {_mb(m.get('models_bytes'))}, used {_mb(m.get('used'))} of {_mb(m.get('total'))}")
    return EXIT_OK


def cmd_ps(args: argparse.Namespace) -> int:
    with _client(args) as c:
        models = c.ps()
    if args.json:
        _json(models)
        return EXIT_OK
    if not models:
        _out("no models loaded")
        return EXIT_OK
    _out(f"{'ID':<18} {'KIND':<5} {'DEVICE':<7} {'DTYPE':<5} {'SIZE':>10} {'USERS':>5}  {'EXPIRES':<10} FILE")
    for m in models:
        exp = "never" if m["expires_at"] is None else f"in {max(0, m['expires_at'] - time.time()):.0f}s"
        _out(f"{m['id']:<18} {m['kind']:<5} {m['device']:<7} {m['dtype']:<5} {_mb(m['bytes']):>10} {m['users']:>5}  {exp:<10} {m['paths'][0]}")
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    if not args.model and not args.all:
        _out("give a model id (see 'luna-daemon ps') or --all")
        return EXIT_USAGE
    with _client(args) as c:
        done = c.unload(args.model, all=args.all)
    if args.json:
        _json(done)
    else:
        _out(f"unloaded {len(done)} model(s)" + "".join(f"\n  {d['id']} {d['paths'][0]}" for d in done))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.shutdown()
    _out("stop requested; the daemon finishes in-flight requests, unloads models and stops")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    s = _settings(args)
    rows = {k: {"value": v, "source": s.sources.get(k, "default")} for k, v in s.public_dict().items()}
    if args.json:
        _json({"config_file": s.config_file, "settings": rows})
        return EXIT_OK
    _out(f"config file: {s.config_file}")
    width = max(len(k) for k in rows)
    for k, r in rows.items():
        _out(f"  {k:<{width}}  {json.dumps(r['value'], default=str):<40} ({r['source']})")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    s = _settings(args)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from luna_daemon.demo import run_demo

    report = run_demo()
    _report(args, report)
    return EXIT_OK if report["ok"] else EXIT_FAIL


def cmd_bench(args: argparse.Namespace) -> int:
    from luna_daemon import bench

    # Each benchmark has its own default number of repeats (a tray launch takes
    # seconds, a loopback exchange milliseconds); --repeats overrides it.
    kw = {} if args.repeats is None else {"repeats": args.repeats}
    if args.memory:
        report = bench.memory_benchmark(model_mb=args.model_mb, clients=args.clients)
    elif args.startup:
        from luna_daemon.tray.bench import startup_benchmark  # tray launch, or headless serve -> ping

        report = startup_benchmark(**kw)
    elif args.proxy:
        from luna_daemon.comfy_nodes.bench import proxy_overhead_benchmark

        report = proxy_overhead_benchmark(**kw)
    else:
        report = bench.transport_benchmark(**kw)
    _report(args, report)
    return EXIT_OK


def _report(args: argparse.Namespace, report: dict) -> None:
    """A demo / benchmark report: the whole object with --json, else its lines."""
    if args.json:
        _json(report)
    else:
        for line in report.get("lines", []):
            _out(line)


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
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("tray", parents=[common], help="run the system-tray app")
    t.set_defaults(func=cmd_tray, no_monitor=False)

    sub.add_parser("status", parents=[common], help="daemon status").set_defaults(func=cmd_status)
    sub.add_parser("ps", parents=[common], help="list loaded models").set_defaults(func=cmd_ps)
    u = sub.add_parser("unload", parents=[common], help="unload a model or all")
    u.add_argument("model", nargs="?")
    u.add_argument("--all", action="store_true")
    u.set_defaults(func=cmd_unload)
    sub.add_parser("stop", parents=[common], help="stop the daemon cleanly").set_defaults(func=cmd_stop)
    c = sub.add_parser("config", parents=[common], help="show the effective settings and where each comes from")
    c.add_argument("--show", action="store_true", help="(default) print every setting with its source")
    c.set_defaults(func=cmd_config)
    lg = sub.add_parser("logs", parents=[common], help="print the end of the log file")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--path", action="store_true", help="print the log file's path only")
    lg.set_defaults(func=cmd_logs)
    sub.add_parser("demo", parents=[common], help="offline proof: tiny models, a daemon, encode/decode").set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", parents=[common], help="benchmarks (transport by default)")
    b.add_argument("--memory", action="store_true", help="memory sharing benchmark")
    b.add_argument("--startup", action="store_true", help="tray launch -> green")
    b.add_argument("--proxy", action="store_true", help="ComfyUI proxy per-call overhead vs in-process (needs ComfyUI: comfyui_root / COMFYUI_PATH)")
    b.add_argument("--repeats", type=int, default=None, help="samples per measurement (default: per benchmark)")
    b.add_argument("--model-mb", type=int, default=320, dest="model_mb")
    b.add_argument("--clients", type=int, default=3)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from luna_daemon.client import DaemonError, DaemonUnavailable
    from luna_daemon.settings import SettingsError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.command not in ("serve", "tray"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SettingsError as exc:
        _out(f"invalid setting: {exc}")
        return EXIT_USAGE
    except DaemonUnavailable as exc:
        _out(str(exc))
        return EXIT_UNAVAILABLE
    except DaemonError as exc:
        _out(f"daemon error ({exc.code}): {exc.message}")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
