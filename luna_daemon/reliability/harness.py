"""What every scenario shares: sizes and bounds, the temp folder and the processes it
owns, the daemon subprocess, the good client's checks, background samplers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from luna_daemon.netutil import free_port
from luna_daemon.reliability.wire import HOST, call

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """How hard each scenario pushes. ``QUICK`` is the CI size."""

    frames: int
    fuzz_workers: int
    fuzz_budget_s: float       # the fuzz stops sending when this is spent (a named failure)
    tokenless_holds: int       # connections pushing a big token-less body at once
    tokenless_mib: int
    flood: int
    admissions: int
    pings: int
    stop_procs: int
    stop_threads: int
    stop_rounds: tuple[str, ...]
    stop_on_main: bool         # quick: stop the attacked main daemon (saves a daemon start)
    killed_copies: int         # client processes per kill mode
    sparse_lora_mib: int
    call_deadline: float       # seconds a hostile-file call / one fuzz connection may take


QUICK = Profile(frames=1000, fuzz_workers=4, fuzz_budget_s=40, tokenless_holds=3, tokenless_mib=32, flood=100,
                admissions=2, pings=100, stop_procs=2, stop_threads=5, stop_rounds=("sigterm",), stop_on_main=True, killed_copies=1,
                sparse_lora_mib=256, call_deadline=5.0)
FULL = Profile(frames=10_000, fuzz_workers=8, fuzz_budget_s=150, tokenless_holds=6, tokenless_mib=48, flood=200,
               admissions=5, pings=500, stop_procs=5, stop_threads=20, stop_rounds=("luna-daemon stop", "sigterm"),
               stop_on_main=False, killed_copies=2, sparse_lora_mib=768, call_deadline=10.0)

LORA_CACHE = "64MiB"     # lora_cache_bytes of the main daemon: a bigger LoRA must be refused unread
STOP_TIMEOUT = 20.0      # stop_timeout of the stop-under-load daemons (s)
STOP_GRACE = 3.0         # documented bound: a stop ends within stop_timeout + this
ADMIT_DEADLINE = 15.0    # a new client locked out this long during a flood counts as hung
PING_TARGET_MS = 50.0    # the ping p99 target during a flood (reported, not a check)
FREEZE_S = 2.5           # a good client's ping slower than this during an attack: the daemon froze
# Growth bounds (checked; a breach is a named failure). Generous on purpose: they catch
# unbounded growth (hundreds of MB, megabytes of statistics), not allocator noise.
RSS_GROWTH_MB = 200
TOKENLESS_RSS_MB = 64
FILE_RSS_MB = 128
STATS_GROWTH_BYTES = 256 * 1024
LOG_LINES_PER_1000_FRAMES = 100


# ============================================================================ processes
class Work:
    """The suite's temp folder and every process it started. ``close()`` kills and removes
    everything; idempotent, and run from ``finally`` so Ctrl-C cleans up too."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep  # debugging: leave the folder (daemon stderr, logs) behind
        self.root = Path(tempfile.mkdtemp(prefix="luna-reliability-"))
        self.tmp = self.root / "tmp"  # TMPDIR of every child: nothing lands in the real /tmp
        self.tmp.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.closed = False
        self._lock = threading.Lock()

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "TMPDIR": str(self.tmp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", **extra}

    def spawn(self, args: list[str], **kw: Any) -> subprocess.Popen:
        """Popen, tracked for ``close()``. ``stderr`` may be a Path, appended to (the child
        has its own descriptor; ours is closed at once). Refused once ``close()`` began:
        a preparation still running in the background must not start a process nobody
        would end."""
        kw.setdefault("env", self.env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        err = kw.pop("stderr", subprocess.DEVNULL)
        with self._lock:
            if self.closed:
                raise RuntimeError("the reliability suite is shutting down")
            f = open(err, "ab") if isinstance(err, Path) else None
            try:
                proc = subprocess.Popen(args, stderr=f or err, **kw)
            finally:
                if f is not None:
                    f.close()
            self.procs.append(proc)
        return proc

    def python(self, code: str, *argv: str, **kw: Any) -> subprocess.Popen:
        return self.spawn([sys.executable, "-c", code, *argv], **kw)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            procs, self.procs = self.procs, []
        for p in procs:
            kill(p)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL it if still running, reap it, close its pipes."""
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        log.warning("process %d did not die after SIGKILL", proc.pid)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def read_line(proc: subprocess.Popen, deadline_s: float) -> str | None:
    """The next stdout line of ``proc`` (text mode), or None after ``deadline_s`` / at EOF."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(deadline_s)
    return out[0].strip() if out and out[0] else None


def reply(line: str) -> None:
    """A child process's answer to the suite: one line on stdout, flushed (the other end
    of :func:`read_line`; stdout is this data channel, logs go to stderr)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def send_line(proc: subprocess.Popen, line: str) -> bool:
    try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return True
    except (OSError, ValueError):
        return False


class Background:
    """``fn()`` on a daemon thread (slow preparations overlap); ``result()`` re-raises."""

    def __init__(self, fn: Callable[[], Any], name: str):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self._error = exc

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} did not finish within {timeout:.0f}s")
        if self._error is not None:
            raise self._error
        return self._value


class DaemonProc:
    """A ``python -m luna_daemon serve`` subprocess on free ports with its own LUNA_HOME in
    the suite's folder and its stderr captured (tracebacks are counted from it).

    Not ``bench.daemon_process``: the suite needs the dashboard, the stderr, a daemon that
    outlives one ``with`` block and one it can restart after a crash."""

    def __init__(self, work: Work, name: str, model_roots: list[str], *, monitor: bool = True,
                 settings: dict[str, str] | None = None):
        self.work = work
        self.home = work.root / name
        self.home.mkdir()
        self.port = free_port()
        self.monitor_port = free_port() if monitor else None
        self.monitor = monitor
        env = {"LUNA_HOME": str(self.home), "LUNA_PORT": str(self.port), "LUNA_LOCK_PORT": str(free_port()),
               "LUNA_MODEL_ROOTS": json.dumps(model_roots), "LUNA_ENGINE": "standalone", "LUNA_LOG_LEVEL": "WARNING"}
        if self.monitor_port:
            env["LUNA_MONITOR_PORT"] = str(self.monitor_port)
        env.update(settings or {})
        self.env = work.env(**env)
        self.stderr_path = self.home / "stderr.txt"
        self.proc: subprocess.Popen | None = None
        self.token = ""

    def launch(self) -> None:
        """Start the process (returns at once; ``wait_ready`` waits for its ping)."""
        cmd = [sys.executable, "-m", "luna_daemon", "serve"] + ([] if self.monitor else ["--no-monitor"])
        self.proc = self.work.spawn(cmd, env=self.env, stderr=self.stderr_path)

    def wait_ready(self, timeout: float = 120.0) -> None:
        from luna_daemon.client import wait_for_daemon

        wait_for_daemon(HOST, self.port, timeout, proc=self.proc)
        self.token = (self.home / "config" / "token").read_text().strip()

    def start(self, timeout: float = 120.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 30.0):
        from luna_daemon.client import DaemonClient

        return DaemonClient(HOST, self.port, token=self.token, timeout=timeout, connect_timeout=5.0)

    def rss(self) -> int | None:
        import psutil

        try:
            return psutil.Process(self.proc.pid).memory_info().rss if self.proc else None
        except psutil.Error:
            return None

    def sockets(self) -> int | None:
        """Connection sockets the daemon process holds open on its port, in any state but
        LISTEN: the kernel's count, independent of what the daemon itself reports. (A
        socket whose peer died is CLOSE_WAIT until the daemon closes it: still counted.)"""
        import psutil

        try:
            proc = psutil.Process(self.proc.pid)
            conns = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6: connections()
            return sum(1 for c in conns("tcp") if c.laddr and c.laddr.port == self.port and c.status != psutil.CONN_LISTEN)
        except (psutil.Error, AttributeError):
            return None

    def stderr_offset(self) -> int:
        try:
            return self.stderr_path.stat().st_size
        except OSError:
            return 0

    def tracebacks_since(self, offset: int) -> dict[str, int]:
        """Tracebacks on stderr since ``offset``: all of them (logged ones included) and the
        unhandled thread exceptions among them (threading's excepthook)."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        return {"tracebacks": text.count("Traceback (most recent call last)"),
                "thread_exceptions": text.count("Exception in thread")}

    def log_lines(self) -> int:
        n = 0
        for p in (self.home / "logs").glob("luna-daemon.log*"):
            try:
                with open(p, "rb") as f:
                    n += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            except OSError:
                pass
        return n

    def status(self) -> tuple[dict | None, int]:
        """(status result, its size as JSON in bytes); (None, 0) when it does not answer."""
        o = call(self.port, "status", None, self.token, 10.0)
        if o.kind != "ok":
            return None, 0
        return o.result, len(json.dumps(o.result))

    def stop(self, timeout: float = 30.0) -> int | None:
        """Clean stop (protocol ``shutdown``), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.alive:
            try:
                with self.client(timeout=10) as c:
                    c.shutdown()
            except Exception:  # noqa: BLE001 - already going away: the kill below covers it
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill(self.proc)
        return self.proc.returncode


# ============================================================================ shared state
@dataclass
class Models:
    root: Path
    vae: Path
    clip: Path
    outside: Path  # a real VAE outside every model root (what a symlink escape points to)


def build_models(work: Work) -> Models:
    from luna_daemon.models import tiny

    root = work.root / "models"
    outside = work.root / "outside"
    return Models(root, tiny.make_tiny_vae(root / "vae", layout="file", seed=1),
                  tiny.make_tiny_clip(root / "clip_l", kind="l", layout="folder", seed=2),
                  tiny.make_tiny_vae(outside, layout="file", seed=3))


class Suite:
    """State the scenarios share: the work folder, the models, the main daemon with a
    tiny VAE loaded and a reference decode made before any attack."""

    def __init__(self, work: Work, profile: Profile, seed: int):
        self.work, self.p, self.seed = work, profile, seed
        self.models: Models | None = None
        self.main: DaemonProc | None = None
        self.vae_id = ""
        self.latent = None
        self.reference = None
        self.crashes = 0  # daemon deaths noticed between scenarios
        # Slow set-ups started early so they overlap (stop rounds, the dashboard host).
        self.prepared: dict[str, Any] = {}

    def main_daemon(self) -> DaemonProc:
        (self.work.root / "models").mkdir(exist_ok=True)
        if self.main is None:
            self.main = DaemonProc(self.work, "home-main", [str(self.work.root / "models")],
                                   settings={"LUNA_LORA_CACHE_BYTES": LORA_CACHE, "LUNA_STOP_TIMEOUT": str(STOP_TIMEOUT)})
        return self.main

    def prepare_main(self) -> None:
        """The main daemon is up: load the VAE and take the reference decode."""
        import torch

        self.main.wait_ready()
        with self.main.client(timeout=120) as c:
            self.vae_id = c.vae_load(str(self.models.vae))["model"]
            if self.latent is None:
                self.latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(self.seed))
            image = c.vae_decode(self.vae_id, self.latent)
        if self.reference is None:
            self.reference = image

    def ensure_main(self) -> bool:
        """Between scenarios: restart the main daemon if it died (counted as a crash)."""
        if self.main is not None and self.main.alive:
            return True
        if self.main is not None and self.main.proc is not None:
            self.crashes += 1
        return self.restart_main()

    def restart_main(self) -> bool:
        """Start the main daemon again after it died (a scenario counts that itself)."""
        d = self.main_daemon()
        if d.proc is not None:
            log.warning("the daemon died (exit code %s); restarting it", d.proc.returncode)
        try:
            d.launch()
            self.prepare_main()
            return True
        except Exception as exc:  # noqa: BLE001 - reported as a failure by the caller
            log.error("the daemon could not be (re)started: %s", exc)
            return False

    def good_client_check(self) -> dict[str, Any]:
        """Does a good client still get a pong and exactly the reference decode?"""
        import torch

        out: dict[str, Any] = {"ping": False, "decode_right": False}
        try:
            with self.main.client(timeout=30) as c:
                out["ping"] = bool(c.ping().get("pong"))
                out["decode_right"] = bool(torch.equal(c.vae_decode(self.vae_id, self.latent), self.reference))
        except Exception as exc:  # noqa: BLE001 - the figure says what failed
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out


def good_client_failure(check: dict[str, Any], when: str) -> list[str]:
    return [] if check.get("ping") and check.get("decode_right") else [f"a good client's ping/decode was not right {when}: {check}"]


def traceback_failure(figures: dict[str, Any]) -> list[str]:
    if figures.get("tracebacks") or figures.get("thread_exceptions"):
        return [f"{figures['thread_exceptions']} unhandled thread exceptions, {figures['tracebacks']} tracebacks on stderr"]
    return []


# ============================================================================ samplers
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def mb(n: int | None) -> float | None:
    return None if n is None else round(n / 1e6, 1)


def rounded(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


class Pinger:
    """A good client pinging every ``interval`` seconds in the background (each ping on a
    fresh connection, as a newly started client would), while something else attacks
    the daemon. A ping slower than ``FREEZE_S`` or unanswered means the daemon froze."""

    def __init__(self, port: int, interval: float = 0.2, deadline: float = 10.0):
        self.port, self.interval, self.deadline = port, interval, deadline
        self.samples: list[tuple[float, float | None]] = []  # (start, seconds or None = failed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reliability-pinger", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            o = call(self.port, "ping", None, None, self.deadline)
            self.samples.append((t0, o.seconds if o.kind == "ok" else None))
            self._stop.wait(self.interval)

    def __enter__(self) -> "Pinger":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(self.deadline + 2)

    def frozen(self, since: float = 0.0, until: float = float("inf")) -> int:
        """Pings started between ``since`` and ``until`` that failed or took longer than
        ``FREEZE_S``; first waits (bounded) for a ping started in that window to end."""
        if until != float("inf"):
            end = time.monotonic() + self.deadline + 1
            while not any(t0 > until for t0, _ in list(self.samples)) and time.monotonic() < end and self._thread.is_alive():
                time.sleep(0.02)
        return sum(1 for t0, s in list(self.samples) if since <= t0 <= until and (s is None or s > FREEZE_S))

    def figures(self) -> dict[str, Any]:
        ok = [s * 1000 for _, s in self.samples if s is not None]
        return {"pings": len(self.samples), "ping_failures": len(self.samples) - len(ok),
                "ping_max_ms": round(max(ok), 1) if ok else None, "slower_than_freeze": self.frozen()}


class RssSampler:
    """Peak RSS of a daemon, sampled every 20 ms in the background."""

    def __init__(self, daemon: DaemonProc):
        self.daemon = daemon
        self.start = self.peak = daemon.rss() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reliability-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.daemon.rss() or 0)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)
        self.peak = max(self.peak, self.daemon.rss() or 0)

    @property
    def growth_mb(self) -> float:
        return mb(max(0, self.peak - self.start)) or 0.0


def wait_released(d: DaemonProc, baseline: int, deadline_s: float, *, idle: bool = False) -> tuple[int | None, float]:
    """Wait until the daemon holds at most ``baseline`` sockets on its port (and, with
    ``idle``, has no request in flight); (socket count, seconds waited)."""
    t0 = time.monotonic()
    while True:
        n = d.sockets()
        done = n is not None and n <= baseline
        if done and idle:
            st, _ = d.status()  # its own connection is closed again before the next count
            done = st is not None and st.get("in_flight", 1) <= 1  # the status call itself
        if done or n is None or time.monotonic() - t0 >= deadline_s:
            return n, time.monotonic() - t0
        time.sleep(0.2)
