"""Stops are bounded and honest; the dashboard's Stop keeps a ``serve`` host up; the
benchmarks and the demo leave nothing behind.

Real daemons (in-process and ``luna-daemon serve`` subprocesses), real sockets, a real
long VAE decode on the CPU (the tiny VAE on a big latent), real temp folders.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from tray_helpers import listening, luna_env, spawn, stop_process, wait_until
from websockets.sync.client import connect

from luna_daemon import bench
from luna_daemon.client import (
    DaemonClient,
    DaemonError,
    DaemonUnavailable,
    wait_for_daemon,
)
from luna_daemon.daemon import Daemon

SERVE = [sys.executable, "-m", "luna_daemon", "serve"]
STOP_TIMEOUT = 1.0
# What docs promise: a stop takes at most stop_timeout + 3 s. The extra second covers the
# process itself ending (and a loaded 2-CPU test machine); a hang would take far longer.
BOUND = STOP_TIMEOUT + 3.0
EXIT_UNCLEAN = 4


def _vae(model_dir: Path) -> str:
    return str(model_dir / "vae_file" / "tiny_vae.safetensors")


@pytest.fixture(scope="module")
def decode_seconds(model_dir):
    """Latent side -> roughly how long a decode runs here: measured once, so the "stuck"
    decode lasts many times the stop deadline on a fast machine and a slow one alike."""
    from luna_daemon.models.engines.standalone import StandaloneEngine

    vae = StandaloneEngine().load_vae([_vae(model_dir)], torch.device("cpu"), None)
    with torch.inference_mode():
        vae.decode(torch.zeros(1, 4, 16, 16))  # warm-up
        t0 = time.perf_counter()
        vae.decode(torch.zeros(1, 4, 32, 32))
        per_pixel = (time.perf_counter() - t0) / (32 * 32)

    def latent_for(seconds: float) -> torch.Tensor:
        # Decode time grows with the pixel count; 256 caps memory (~0.5 GB per activation).
        side = int(min(256, max(64, math.sqrt(seconds / per_pixel))) // 8 * 8)
        return torch.zeros(1, 4, side, side)

    return latent_for


def _start_decode(port: int, token: str, model: str, latent: torch.Tensor) -> tuple[threading.Thread, dict]:
    """A client thread running one long decode; ``outcome`` gets its result or error."""
    outcome: dict = {}

    def run() -> None:
        try:
            with DaemonClient("127.0.0.1", port, token=token, timeout=300) as c:
                outcome["image"] = c.vae_decode(model, latent).shape
        except (DaemonError, DaemonUnavailable) as exc:
            outcome["error"] = exc

    t = threading.Thread(target=run, name="test-long-decode")
    t.start()
    return t, outcome


def _wait_running(c: DaemonClient) -> None:
    wait_until(lambda: any(m["users"] for m in c.ps()), 30, "the decode to reach the model")


@pytest.fixture
def luna_log():
    """Records of the ``luna_daemon`` loggers (a Host in another test may have turned off
    propagation to the root logger, which pytest's caplog listens on)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("luna_daemon")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# ----------------------------------------------------------------------------- item 2
def test_stop_with_a_stuck_decode_is_bounded_and_reported(make_settings, model_dir, decode_seconds, luna_log):
    d = Daemon(make_settings(stop_timeout=STOP_TIMEOUT))
    d.start()
    warnings: list[str] = []
    unsubscribe = d.events.subscribe(lambda e: warnings.append(e.data.get("message", "")) if e.type == "warning" else None)
    port = d.address[1]
    c = DaemonClient("127.0.0.1", port, token=d.token, timeout=60)
    try:
        model = c.vae_load(_vae(model_dir))["model"]
        decoder, outcome = _start_decode(port, d.token, model, decode_seconds(8.0))
        _wait_running(c)

        t0 = time.monotonic()
        clean = d.stop(STOP_TIMEOUT)
        took = time.monotonic() - t0
        assert clean is False
        assert took <= BOUND, f"stop took {took:.1f}s"
        assert d.state == "stopped" and "exceeded" in d.detail
        # The warning event and the WARNING log line name what was cut off.
        assert any("vae_decode from" in w and "tiny_vae.safetensors" in w for w in warnings), warnings
        cut = [r.getMessage() for r in luna_log if r.levelno == logging.WARNING and "cut off" in r.getMessage()]
        assert cut and "vae_decode from" in cut[0] and "memory not freed" in cut[0], cut

        # The decode's client learns at once that the daemon is gone; it does not hang.
        decoder.join(30)
        assert not decoder.is_alive() and isinstance(outcome.get("error"), DaemonUnavailable), outcome

        # The abandoned executor still runs its call (nothing joins it); when that returns,
        # it releases the model on its own.
        stuck = [t for t in threading.enumerate() if t.name == f"luna-exec-{model}"]
        assert stuck, "the executor thread should still be inside the decode"
        stuck[0].join(300)
        assert not stuck[0].is_alive()
        wait_until(lambda: any("stuck call returned; memory released" in r.getMessage() for r in luna_log), 30,
                   "the late release of the abandoned model")

        # The daemon can start again in the same process (the tray's Start) and stop cleanly.
        d.start()
        with DaemonClient("127.0.0.1", d.address[1], token=d.token) as c2:
            assert c2.ping()["pong"] is True
        assert d.stop(10) is True
    finally:
        unsubscribe()
        c.close()
        d.stop(10)


def test_serve_sigterm_mid_decode_exits_in_bound_with_unclean_code(tmp_path, model_dir, decode_seconds):
    port, monitor_port = free_port(), free_port()
    home = tmp_path / "luna"
    env = luna_env(home, port=port, monitor_port=monitor_port, lock_port=free_port(), stop_timeout=STOP_TIMEOUT,
                   model_roots=json.dumps([str(model_dir)]))
    out = tmp_path / "serve.out"
    proc = spawn(SERVE, env, out)
    try:
        wait_for_daemon("127.0.0.1", port, 60, proc=proc)
        token = (home / "config" / "token").read_text().strip()
        with DaemonClient("127.0.0.1", port, token=token, timeout=60) as c:
            model = c.vae_load(_vae(model_dir))["model"]
            decoder, outcome = _start_decode(port, token, model, decode_seconds(10.0))
            _wait_running(c)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running {BOUND:.0f}s after SIGTERM:\n{out.read_text()[-3000:]}")
        took = time.monotonic() - t0
        decoder.join(30)
    finally:
        stop_process(proc)
    text = out.read_text()
    assert rc == EXIT_UNCLEAN, f"exit code {rc} after {took:.1f}s:\n{text[-3000:]}"
    assert "WARNING" in text and "cut off: vae_decode from" in text and "tiny_vae.safetensors" in text, text[-3000:]
    # It ended on purpose, not by crashing in torch's destructors (the old exit was -6).
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]
    assert not listening(port) and not listening(monitor_port)
    assert isinstance(outcome.get("error"), DaemonUnavailable), outcome


# ----------------------------------------------------------------------------- item 10
def _healthz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", "/healthz", headers={"Host": f"127.0.0.1:{port}"})
        return conn.getresponse().status
    finally:
        conn.close()


def _control(ws, kind: str, token: str, msg_id: int) -> dict:
    """A dashboard action as a non-browser client holding the token sends it (see
    docs/monitor.md): the same path as the page's Stop / Start / Restart buttons."""
    ws.send(json.dumps({"type": kind, "token": token, "id": msg_id}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msg = json.loads(ws.recv(timeout=60))
        if msg.get("type") == "reply" and msg.get("id") == msg_id:
            return msg
    raise AssertionError(f"no reply to {kind}")


def test_dashboard_stop_keeps_serve_up_until_luna_daemon_stop(tmp_path, model_dir):
    port, monitor_port = free_port(), free_port()
    home = tmp_path / "luna"
    env = luna_env(home, port=port, monitor_port=monitor_port, lock_port=free_port(),
                   model_roots=json.dumps([str(model_dir)]))
    out = tmp_path / "serve.out"
    proc = spawn(SERVE, env, out)
    try:
        wait_for_daemon("127.0.0.1", port, 60, proc=proc)
        wait_until(lambda: listening(monitor_port), 30, "the dashboard port")
        token = (home / "config" / "token").read_text().strip()
        with connect(f"ws://127.0.0.1:{monitor_port}/ws", open_timeout=15) as ws:
            assert json.loads(ws.recv(timeout=15))["type"] == "snapshot"
            reply = _control(ws, "stop", token, 1)
            assert reply["ok"] and reply["result"]["clean"] is True and reply["result"]["state"] == "stopped", reply
            # The host (dashboard, lock) outlives the daemon it stopped.
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(2)
            assert _healthz(monitor_port) == 503
            with pytest.raises(DaemonUnavailable), \
                    DaemonClient("127.0.0.1", port, token=token, timeout=5, connect_timeout=2) as c:
                c.ping()

            reply = _control(ws, "start", token, 2)
            assert reply["ok"] and reply["result"]["state"] == "running", reply
            assert _healthz(monitor_port) == 200
            reply = _control(ws, "restart", token, 3)
            assert reply["ok"] and reply["result"]["state"] == "running", reply
            assert proc.poll() is None
        with DaemonClient("127.0.0.1", port, token=token, timeout=10) as c:
            assert c.ping()["pong"] is True

        # `luna-daemon stop` (the protocol shutdown) ends the serve host, cleanly.
        stop = subprocess.run([sys.executable, "-m", "luna_daemon", "stop"], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert proc.wait(60) == 0, out.read_text()[-3000:]
    finally:
        stop_process(proc)
    assert not listening(port) and not listening(monitor_port)


# ----------------------------------------------------------------------------- item 12
@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """TMPDIR (this process's tempfile and every child's) is a fresh empty folder."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    # Importing torch._dynamo (diffusers does) creates torch's own per-user compile cache,
    # $TMPDIR/torchinductor_<user>: shared and reused by every torch process, not ours.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert tempfile.gettempdir() == str(folder)
    return folder


def test_memory_benchmark_leaves_no_temp_files(private_tmp):
    report = bench.memory_benchmark(model_mb=8, clients=1, encodes=1)
    assert report["clients"] == 1 and report["model_loaded_bytes"] > 0 and len(report["client_rss_growth"]) == 1
    assert sorted(p.name for p in private_tmp.iterdir()) == []


def test_benchmark_daemon_is_cleaned_up_on_failure_and_ctrl_c(private_tmp, model_dir):
    # The daemon cannot start (a bad setting): the error is raised, nothing is left.
    with pytest.raises(RuntimeError, match="did not start"), \
            bench.daemon_process([str(model_dir)], {"LUNA_QUEUE_SIZE": "many"}):
        pass
    assert sorted(p.name for p in private_tmp.iterdir()) == []
    # Ctrl-C in the middle of a benchmark: the daemon process ends, its LUNA_HOME goes.
    with pytest.raises(KeyboardInterrupt), bench.daemon_process([str(model_dir)]) as (port, _token, proc):
        assert listening(port)
        raise KeyboardInterrupt
    assert proc.poll() is not None and not listening(port)
    assert sorted(p.name for p in private_tmp.iterdir()) == []


def test_demo_leaves_no_temp_files(private_tmp):
    from luna_daemon.demo import run_demo

    report = run_demo()
    assert report["ok"], report["lines"]
    assert sorted(p.name for p in private_tmp.iterdir()) == []
