"""The shipped reliability suite: ``luna-daemon bench --reliability [--quick] [--json]``
(also ``python benchmarks/reliability.py``). What it does and the figures of a full run:
docs/reliability.md.

It attacks a real ``luna-daemon serve`` process the way a hostile or broken local program
would, and counts what happens instead of assuming the daemon's defences work:

1. ``fuzz``: >= 10,000 frames (1,000 with ``quick``) over many connections (fuzz.py);
2. ``flood``: idle and slow-loris connections from another process (clients.py);
3. ``stop_under_load``: ``luna-daemon stop`` / SIGTERM with requests in flight (stop.py);
4. ``killed_clients``: client processes SIGKILLed mid-request (clients.py);
5. ``hostile_files``: FIFOs, symlink loops and escapes, odd names and sizes (files.py);
6. ``dashboard``: hostile HTTP / WebSocket input, scope-widening settings (dashboard.py).

What a caller can rely on: :func:`run` returns one JSON-safe dict -- per-scenario
figures, each with ``failures`` (the named checks that failed), ``totals`` (crashes, hung,
lost, wrong, internal, widenings accepted) and a top-level ``ok`` -- and never hangs
(every wait has a deadline). It always removes its temp folder and kills every process
it started, also on an error or Ctrl-C. A scenario that cannot run counts as failed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from luna_daemon.reliability.clients import scenario_flood, scenario_killed_clients
from luna_daemon.reliability.dashboard import DashboardHost, scenario_dashboard
from luna_daemon.reliability.files import scenario_hostile_files
from luna_daemon.reliability.fuzz import scenario_fuzz
from luna_daemon.reliability.harness import FULL, PING_TARGET_MS, QUICK, Background, Suite, Work, build_models, mb
from luna_daemon.reliability.stop import prepare_stop, scenario_stop

log = logging.getLogger(__name__)

__all__ = ["run", "SCENARIOS", "QUICK", "FULL"]

SCENARIOS: dict[str, Callable[[Suite], dict[str, Any]]] = {
    "fuzz": scenario_fuzz,
    "flood": scenario_flood,
    "killed_clients": scenario_killed_clients,
    "hostile_files": scenario_hostile_files,
    "dashboard": scenario_dashboard,
    "stop_under_load": scenario_stop,  # last: it uses its own daemons
}


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
            "platform": sys.platform}


def run(quick: bool = False, *, seed: int = 0, only: list[str] | None = None,
        progress: Callable[[str], None] | None = None, keep: bool = False) -> dict[str, Any]:
    """Run the suite (see the module docstring). ``only`` limits it to the named
    scenarios; ``progress`` gets a line as each one starts and ends; ``keep`` leaves the
    temp folder (daemon stderr and logs) behind for debugging."""
    profile = QUICK if quick else FULL
    names = [n for n in SCENARIOS if not only or n in only]
    say = progress or (lambda _line: None)
    t0 = time.monotonic()
    work = Work(keep)
    suite = Suite(work, profile, seed)
    report: dict[str, Any] = {"quick": quick, "seed": seed, "machine": machine(), "scenarios": {}}
    if keep:
        report["work_dir"] = str(work.root)
    try:
        say(f"reliability suite ({'quick' if quick else 'full'}): tiny models, daemons and clients starting")
        main = suite.main_daemon()
        main.launch()  # boots while the models are built
        suite.models = build_models(work)
        # The slow set-ups of the later scenarios overlap with this one's; all are done
        # before the first attack, so that none disturbs a measurement.
        if "stop_under_load" in names:
            suite.prepared["stop"] = prepare_stop(suite)
        if "dashboard" in names:
            suite.prepared["dashboard"] = DashboardHost(suite)
        try:
            suite.prepare_main()
            started = True
        except Exception as exc:  # noqa: BLE001 - reported as every scenario's failure
            log.error("the daemon did not start: %s", exc)
            started = False
        for r in suite.prepared.get("stop", []):
            _settle(r.ready)
        if "dashboard" in suite.prepared:
            _settle(suite.prepared["dashboard"].ready)
        report["daemon_rss_mb_start"] = mb(main.rss())
        report["setup_seconds"] = round(time.monotonic() - t0, 1)
        for name in names:
            if name == "stop_under_load" and not profile.stop_on_main:
                _stop_main(suite, report)  # the main daemon is done: it would only add noise
            say(f"[{name}] running ...")
            ts = time.monotonic()
            if not started:
                result: dict[str, Any] = {"failures": ["the daemon did not start"]}
            elif name != "stop_under_load" and not suite.ensure_main():
                result = {"failures": ["the daemon is not running and could not be restarted"]}
            else:
                try:
                    result = SCENARIOS[name](suite)
                except Exception as exc:  # noqa: BLE001 - a scenario that cannot run is a failure, not a crash
                    log.exception("scenario %s could not run", name)
                    result = {"failures": [f"could not run: {type(exc).__name__}: {exc}"]}
            result["seconds"] = round(time.monotonic() - ts, 1)
            report["scenarios"][name] = result
            say(f"[{name}] " + ("ok" if not result["failures"] else "FAILED: " + "; ".join(result["failures"]))
                + f" ({result['seconds']}s)")
        _stop_main(suite, report)
    finally:
        dash = suite.prepared.get("dashboard")
        if dash is not None:
            dash.close()
        work.close()
    report["crashes_between_scenarios"] = suite.crashes
    report["totals"] = _totals(report)
    report["failures"] = [f"{name}: {f}" for name, r in report["scenarios"].items() for f in r["failures"]]
    if suite.crashes:
        report["failures"].append(f"the daemon died {suite.crashes} times between scenarios")
    report["ok"] = not report["failures"]
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["command"] = "luna-daemon bench --reliability" + (" --quick" if quick else "") + " --json"
    report["lines"] = _lines(report)
    return report


def _settle(bg: Background) -> None:
    """Wait for a background preparation; its failure is reported by its scenario."""
    try:
        bg.result(300)
    except Exception:  # noqa: BLE001 - the scenario re-raises it as "could not run"
        pass


def _stop_main(suite: Suite, report: dict[str, Any]) -> None:
    d = suite.main
    if d is not None and d.alive and "daemon_exit_code" not in report:
        report["daemon_rss_mb_end"] = mb(d.rss())
        report["daemon_exit_code"] = d.stop()


def _totals(report: dict[str, Any]) -> dict[str, int]:
    s = report["scenarios"]

    def g(name: str, key: str) -> int:
        return (s.get(name) or {}).get(key) or 0

    return {
        "crashes": g("fuzz", "crashes") + g("killed_clients", "crashes") + report.get("crashes_between_scenarios", 0),
        "hung": (g("fuzz", "hung") + g("flood", "hung") + g("stop_under_load", "hung") + g("hostile_files", "hung")
                 + g("dashboard", "http_hung")),
        "lost": g("stop_under_load", "lost"),
        "wrong": g("stop_under_load", "wrong"),
        "internal": g("fuzz", "internal") + g("hostile_files", "internal"),
        "widenings_accepted": g("dashboard", "widenings_accepted"),
        "thread_exceptions": sum((r or {}).get("thread_exceptions", 0) for r in s.values()),
        "failed_checks": sum(len(r["failures"]) for r in s.values()),
    }


def _lines(r: dict[str, Any]) -> list[str]:
    m, t, s = r["machine"], r["totals"], r["scenarios"]
    lines = [f"Luna Daemon reliability suite ({'quick' if r['quick'] else 'full'}) on {m['cpu']}, {m['cpus']} CPUs: "
             f"{'OK' if r['ok'] else 'FAILED'} in {r['seconds']}s",
             f"totals: crashes {t['crashes']}, hung {t['hung']}, lost {t['lost']}, wrong {t['wrong']}, internal {t['internal']}, "
             f"widenings accepted {t['widenings_accepted']}, unhandled thread exceptions {t['thread_exceptions']}"]
    f = s.get("fuzz") or {}
    if "frames" in f:
        hold = f.get("tokenless_bodies") or {}
        lines.append(f"fuzz: {f['frames']} frames on {f['connections']} connections in {f['fuzz_seconds']}s -> typed {f['typed']}, "
                     f"ok {f['ok']}, closed {f['closed']}, hung {f['hung']}, internal {f['internal']}, crashes {f['crashes']}; "
                     f"RSS {f['rss_mb'][0]} -> {f['rss_mb'][1]} MB; status {f['status_bytes'][0]} -> {f['status_bytes'][1]} B; "
                     f"/metrics {f['metrics_bytes'][0]} -> {f['metrics_bytes'][1]} B; log +{f['log_lines_added']} lines; "
                     f"{hold.get('connections')} token-less {hold.get('mib_each')} MiB bodies: RSS +{hold.get('rss_peak_growth_mb')} MB")
    fl = s.get("flood") or {}
    if "time_to_admit_s" in fl:
        lines.append(f"flood: {fl['connections']} idle + slow-loris connections -> time to admit a new client "
                     f"{fl['time_to_admit_s']} s; ping p50 {fl.get('ping_p50_ms')} ms, p99 {fl.get('ping_p99_ms')} ms "
                     f"(target {PING_TARGET_MS:.0f} ms), call errors {fl.get('call_errors')}")
    k = s.get("killed_clients") or {}
    if "killed" in k:
        lines.append(f"killed clients: {k['killed']} SIGKILLed ({', '.join(k['modes'])}) -> leaked connections "
                     f"{k['leaked_connections']}, requests in flight {k['in_flight_after']}, released within {k['released_within_s']}s")
    h = s.get("hostile_files") or {}
    if "cases" in h:
        lines.append("hostile files: " + "; ".join(f"{c['case']} -> {c['code'] or c['outcome']} ({c['seconds']}s)"
                                                   for c in h["cases"]))
    dash = s.get("dashboard") or {}
    if "http" in dash:
        lines.append(f"dashboard: HTTP 5xx {dash['http_5xx']}, duplicate Host -> {dash['http'].get('duplicate Host')}, "
                     f"without a session {dash['unauthenticated']}, WebSocket internal errors {dash['ws_internal_errors']}, "
                     f"widenings accepted {dash['widenings_accepted']} of {len((dash['widening'] or {}).get('attempts', {}))}")
    for rnd in (s.get("stop_under_load") or {}).get("rounds", []):
        if "right" in rnd:
            lines.append(f"stop under load [{rnd['how']}]: {rnd['clients']} ({rnd.get('in_flight_at_stop')} in flight at the stop) -> "
                         f"right {rnd['right']}, stopping {rnd['stopping']}, unavailable {rnd['unavailable']}, lost {rnd['lost']}, "
                         f"hung {rnd['hung']}, wrong {rnd['wrong']}; exit {rnd.get('stop_seconds')}s after the stop "
                         f"(stop_timeout {rnd['stop_timeout_s']:.0f}s), exit code {rnd.get('exit_code')}")
    lines += [f"FAILED {fail}" for fail in r["failures"]]
    return lines
