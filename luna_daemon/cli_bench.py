"""``luna-daemon bench --cli``: how long the light commands take, as a person runs them.

Each command runs as a fresh subprocess (interpreter start included, as in a terminal),
against a real daemon this benchmark starts (own LUNA_HOME, free ports) and, for
``status``, also against a port where nothing listens. Candidates run round-robin so
machine noise hits all alike; the figure is the median of ``repeats``. Targets (issue 12):
``--version`` <= 0.3 s, ``status`` <= 0.5 s. ``python -c pass`` is the floor no command can
beat. A command that exits with an unexpected code aborts the run: a failure is not a timing.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from luna_daemon.netutil import free_port

TARGETS = {"--version": 0.3, "status (daemon running)": 0.5}


def _cli_argv() -> list[str]:
    """The ``luna-daemon`` script of this environment when installed, else ``python -m``."""
    script = Path(sys.executable).with_name("luna-daemon.exe" if os.name == "nt" else "luna-daemon")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "luna_daemon"]


def machine() -> str:
    """CPU model and count, e.g. ``AMD EPYC, 2 CPUs``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def cli_benchmark(repeats: int = 7) -> dict[str, Any]:
    from luna_daemon.bench import _interleaved, daemon_process

    cli = _cli_argv()
    home = tempfile.mkdtemp(prefix="luna-clibench-")
    try:
        with daemon_process([], home=home) as (port, _token, _proc):
            up = dict(os.environ, LUNA_HOME=home, LUNA_PORT=str(port))
            down = dict(up, LUNA_PORT=str(free_port()))
            runs: dict[str, tuple[list[str], dict, int]] = {
                "python -c pass (floor)": ([sys.executable, "-c", "pass"], up, 0),
                "--version": (cli + ["--version"], up, 0),
                "--help": (cli + ["--help"], up, 0),
                "status (daemon running)": (cli + ["status"], up, 0),
                "status (nothing on the port)": (cli + ["status"], down, 3),
                "ps": (cli + ["ps"], up, 0),
                "config --show": (cli + ["config", "--show"], up, 0),
            }

            def runner(name: str, argv: list[str], env: dict, expect: int):
                def run() -> None:
                    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
                    if r.returncode != expect:
                        raise RuntimeError(f"{name}: exit code {r.returncode}, expected {expect}: {r.stdout}{r.stderr}")
                return run

            samples = _interleaved({k: runner(k, *v) for k, v in runs.items()}, repeats, warmup=1)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    lines = [f"CLI response times, median of {repeats} runs each ({machine()}; {' '.join(Path(a).name for a in cli)})"]
    for name, ts in samples.items():
        med = statistics.median(ts)
        target = TARGETS.get(name)
        results[name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "target_s": target,
                         "meets_target": None if target is None else med <= target}
        mark = "" if target is None else f"   target <= {target:g} s: {'yes' if med <= target else 'NO'}"
        lines.append(f"  {name:<30} {med * 1000:6.0f} ms  (min {min(ts) * 1000:.0f}, max {max(ts) * 1000:.0f}){mark}")
    return {"benchmark": "cli", "machine": machine(), "command": cli, "repeats": repeats, "results": results,
            "ok": all(r["meets_target"] is not False for r in results.values()), "lines": lines}
