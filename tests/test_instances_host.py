"""Several instances from one host (issue 14, processes): the primary is the host's Daemon,
each further instance a supervised ``luna-daemon serve --instance NAME`` child process.

Everything is real: in-process Hosts whose children are real processes, ``serve``
subprocesses, sockets, signals (SIGKILL of a child, of the host), psutil for orphans.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from tray_helpers import listening, luna_env, spawn, stop_process, wait_until

from luna_daemon.client import DaemonClient
from luna_daemon.daemon import Daemon, overall_state
from luna_daemon.host import Host
from luna_daemon.logs import LogTail
from luna_daemon.settings import Settings
from luna_daemon.supervisor import ChildInstance, exit_reason

SERVE = [sys.executable, "-m", "luna_daemon", "serve"]
START = 60.0  # a child imports torch: generous on 2 busy CPUs (bounded waits, not speed checks)


def _config(path: Path, model_dir: Path, tables: list[dict], **top) -> Path:
    lines = [f"model_roots = [{json.dumps(str(model_dir))}]", 'engine = "standalone"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for t in tables:
        lines.append("[[instances]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in t.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _two(tmp_path: Path, model_dir: Path, **top) -> tuple[Path, int, int]:
    vae_port, clip_port = free_port(), free_port()
    cfg = _config(tmp_path / "config.toml", model_dir, [
        {"name": "vae", "service": "vae", "port": vae_port},
        {"name": "clip", "service": "clip", "port": clip_port},
    ], **top)
    return cfg, vae_port, clip_port


def _host(tmp_path: Path, cfg: Path) -> Host:
    s = Settings.load(cfg, env={"LUNA_HOME": str(tmp_path / "home")}, overrides={"monitor_port": 0, "lock_port": 0})
    assert not s.problems, s.problems
    return Host(s, log_to_stderr=False)


def _ping(port: int, token: str | None = None) -> bool:
    with DaemonClient("127.0.0.1", port, token=token, timeout=10, connect_timeout=3) as c:
        return c.ping()["pong"] is True


def _luna_children(pid: int) -> list[psutil.Process]:
    """The ``serve --instance`` processes whose parent was ``pid`` (or that were orphaned
    from it: reparented, their command line names it as supervisor)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "--instance" in cmd and "--supervised-by" in cmd and cmd[cmd.index("--supervised-by") + 1] == str(pid):
            out.append(p)
    return out


@pytest.fixture
def two_host(tmp_path, model_dir):
    cfg, vae_port, clip_port = _two(tmp_path, model_dir)
    host = _host(tmp_path, cfg)
    events: list = []
    host.events.subscribe(events.append)
    try:
        failures = host.start_all(START)
        assert failures == {}, failures
        yield host, vae_port, clip_port, events
    finally:
        host.close(10)
        wait_until(lambda: not _luna_children(os.getpid()), 15, "no child instance left")


# ----------------------------------------------------------------------------- pure parts
def test_overall_state():
    assert overall_state(["running", "error", "starting"]) == "error"
    assert overall_state(["running", "stopping"]) == "starting"
    assert overall_state(["running", "starting"]) == "starting"
    assert overall_state(["running", "running"]) == "running"
    assert overall_state(["stopped", "stopped"]) == "stopped"
    assert overall_state(["running", "stopped"]) == "running"  # one stopped on purpose
    assert overall_state([]) == "stopped"


def test_exit_reasons():
    assert exit_reason(-9) == "killed by signal 9 (SIGKILL)"
    assert exit_reason(3, "boom") == "exited with code 3: boom"
    assert exit_reason(1) == "exited with code 1"


def test_log_tail_forwarded_lines_and_instance_filter():
    tail = LogTail(instance="vae")
    import logging

    logger = logging.getLogger("luna_daemon.test_instances_host")
    logger.addHandler(tail)
    logger.setLevel(logging.INFO)
    try:
        logger.info("own line")
    finally:
        logger.removeHandler(tail)
    tail.forward("clip", "2026-01-02 03:04:05,678 WARNING luna_daemon.server: slow client\n")
    tail.forward("clip", "Traceback (most recent call last):")
    tail.forward("clip", "x" * 10000)
    own, *clip = tail.lines()
    assert own["instance"] == "vae" and own["message"] == "own line"
    assert [c["instance"] for c in clip] == ["clip"] * 3
    assert clip[0]["level"] == "WARNING" and clip[0]["logger"] == "luna_daemon.server"
    assert clip[0]["message"] == "slow client"
    assert clip[1]["level"] == "WARNING"  # a continuation keeps the record's level
    assert len(clip[2]["text"]) <= 4000
    assert [x["seq"] for x in tail.lines(instance="clip")] == [c["seq"] for c in clip]
    assert tail.lines(instance="vae") == [own]
    assert tail.lines(since=clip[0]["seq"], instance="clip") == clip[1:]


# ----------------------------------------------------------------------------- one instance: as today
def test_no_instances_is_exactly_one_daemon(make_settings):
    s = make_settings()
    host = Host(s, log_to_stderr=False)
    events: list = []
    host.events.subscribe(events.append)
    try:
        assert host.instances == {"main": host.daemon}
        assert host.daemon.settings is s and host.daemon.name == "main"
        assert host.overall_state() == "stopped"
        assert host.start_all() == {}
        assert host.instance("main") is host.daemon and host.overall_state() == "running"
        with pytest.raises(ValueError, match="no instance named 'vae'; configured: main"):
            host.instance("vae")
        snap = host.daemon.snapshot()
        assert snap["instance"] == "main" and snap["primary"] is True and snap["service"] == "full"
        assert snap["devices"] == {"vae": s.vae_device, "clip": s.clip_device}
        with DaemonClient(*host.daemon.address, token=host.daemon.token, timeout=10) as c:
            hello = c.hello()
            status = c.status()
        assert hello["instance"] == "main"
        assert [(e["name"], e["state"], e["port"]) for e in hello["instances"]] == [
            ("main", "running", host.daemon.address[1])]
        # The status op keeps its own ``devices`` (memory per device, read by the CLI
        # and the tray), not the configured-devices map of the snapshot.
        assert status["instance"] == "main"
        assert all(isinstance(v, dict) and "models_bytes" in v for v in status["devices"].values()), status["devices"]
    finally:
        assert host.close(10) is True
    states = [e.data for e in events if e.type == "state"]
    assert states and all(d["instance"] == "main" for d in states)
    assert any(e.data["line"]["instance"] == "main" for e in events if e.type == "log")


def test_daemon_warnings_carry_the_instance(make_settings):
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        d = Daemon(make_settings(port=holder.getsockname()[1]), name="vae")
        warnings: list = []
        d.events.subscribe(lambda e: warnings.append(e.data) if e.type == "warning" else None)
        with pytest.raises(Exception) as info:
            d.start()
        # The holder of the port is named (psutil): this very test process.
        assert f"(pid {os.getpid()})" in str(info.value)
        assert d.state == "error" and warnings and warnings[0]["instance"] == "vae"
    finally:
        holder.close()


# ----------------------------------------------------------------------------- two instances, in-process host
def test_two_instances_serve_supervise_and_restart(two_host):
    host, vae_port, clip_port, _events = two_host
    token = host.daemon.token
    assert list(host.instances) == ["vae", "clip"]
    vae, clip = host.instance("vae"), host.instance("clip")
    assert vae is host.daemon and isinstance(clip, ChildInstance)
    assert host.overall_state() == "running"
    assert _ping(vae_port, token) and _ping(clip_port, token)

    with DaemonClient("127.0.0.1", vae_port, token=token, timeout=10) as c:
        hello = c.hello()
    assert hello["instance"] == "vae"
    assert [(e["name"], e["service"], e["port"], e["state"], e["primary"]) for e in hello["instances"]] == [
        ("vae", "vae", vae_port, "running", True), ("clip", "clip", clip_port, "running", False)]

    snap = clip.snapshot()
    assert snap["instance"] == "clip" and snap["service"] == "clip" and snap["primary"] is False
    assert snap["engine"] == "standalone" and snap["pid"] and snap["restarts"] == 0
    # The child's own log file, and its lines in the host's viewer under its name.
    log_file = Path(host.settings.log_dir) / "luna-daemon-clip.log"
    wait_until(lambda: "daemon 'clip' running" in log_file.read_text(), 10, "the child's log file")
    clip_lines = host.log_tail.lines(instance="clip")
    assert any("daemon 'clip' running" in x["message"] for x in clip_lines), clip_lines[-5:]
    assert all(x["instance"] == "vae" for x in host.log_tail.lines(instance="vae"))

    # SIGKILL of the child: error with the reason, then restarted on the same port; the
    # primary is not disturbed meanwhile.
    pid = snap["pid"]
    seen: list = []
    host.events.subscribe(lambda e: seen.append(dict(e.data)) if e.type == "state" else None)
    psutil.Process(pid).send_signal(signal.SIGKILL)
    wait_until(lambda: any(d["instance"] == "clip" and d["state"] == "error" for d in seen), 15, "clip in error")
    err = next(d for d in seen if d["state"] == "error")
    assert "killed by signal 9" in err["detail"], err
    assert host.overall_state() in ("error", "starting")
    assert _ping(vae_port, token) and vae.state == "running"
    wait_until(lambda: clip.state == "running", START, "clip restarted")
    assert clip.address == ("127.0.0.1", clip_port) and clip.snapshot()["pid"] != pid
    assert clip.restarts == 1 and "killed by signal 9" in clip.snapshot()["exit_reason"]
    assert _ping(clip_port, token)
    assert not any(d["instance"] == "vae" for d in seen)  # nothing happened to the primary
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    # Stopping one leaves the other serving.
    child_pid = clip.snapshot()["pid"]
    assert clip.stop() is True and clip.state == "stopped"
    assert not psutil.pid_exists(child_pid)
    assert not listening(clip_port) and _ping(vae_port, token)
    assert host.overall_state() == "running"  # one stopped on purpose
    assert host.stop_all(10) is True and host.overall_state() == "stopped"


def test_child_port_taken_names_the_holder_and_the_others_run(tmp_path, model_dir):
    cfg, vae_port, clip_port = _two(tmp_path, model_dir)
    holder = socket.create_server(("127.0.0.1", clip_port))
    host = _host(tmp_path, cfg)
    try:
        failures = host.start_all(START)
        assert list(failures) == ["clip"], failures
        clip = host.instance("clip")
        assert clip.state == "error" and host.overall_state() == "error"
        assert f"port {clip_port}" in clip.detail and f"(pid {os.getpid()})" in clip.detail, clip.detail
        assert clip.detail.startswith("exited with code 1: ")
        assert _ping(vae_port, host.daemon.token) and host.daemon.state == "running"
        holder.close()
        clip.start(START)  # the port is free again: a start works
        assert clip.state == "running" and _ping(clip_port, host.daemon.token)
    finally:
        holder.close()
        assert host.close(10) is True
    assert not _luna_children(os.getpid())


# ----------------------------------------------------------------------------- serve subprocesses
def _serve_two(tmp_path: Path, model_dir: Path, **top) -> tuple[subprocess.Popen, dict, int, int, Path]:
    cfg, vae_port, clip_port = _two(tmp_path, model_dir, **top)
    env = luna_env(tmp_path / "home", monitor_port=free_port(), lock_port=free_port())
    out = tmp_path / "serve.out"
    proc = spawn(SERVE + ["--config", str(cfg), "--no-monitor"], env, out)
    return proc, env, vae_port, clip_port, out


def _wait_child(host_pid: int) -> psutil.Process:
    return wait_until(lambda: next(iter(_luna_children(host_pid)), None), START, "the child process")


def test_serve_sigterm_stops_children_cleanly_without_orphans(tmp_path, model_dir):
    proc, _env, vae_port, clip_port, out = _serve_two(tmp_path, model_dir, stop_timeout=5)
    try:
        wait_until(lambda: listening(vae_port) and listening(clip_port), START, "both instances")
        child = _wait_child(proc.pid)
        token = (tmp_path / "home" / "config" / "token").read_text().strip()
        assert _ping(vae_port, token) and _ping(clip_port, token)
        proc.send_signal(signal.SIGTERM)
        # The stop deadline (5 s) + grace + interpreter exit, generously.
        assert proc.wait(30) == 0, out.read_text()[-3000:]
        child.wait(5)  # already gone: the host waited for it
    finally:
        stop_process(proc)
    assert not _luna_children(proc.pid)
    assert not listening(vae_port) and not listening(clip_port)
    log = (tmp_path / "home" / "logs" / "luna-daemon-clip.log").read_text()
    assert "the supervising host asked this instance to stop" in log and "daemon 'clip' stopped" in log


def test_killed_host_takes_its_children_along(tmp_path, model_dir):
    proc, _env, vae_port, clip_port, _out = _serve_two(tmp_path, model_dir)
    try:
        wait_until(lambda: listening(vae_port) and listening(clip_port), START, "both instances")
        child = _wait_child(proc.pid)
        wait_until(lambda: "running on" in (tmp_path / "home" / "logs" / "luna-daemon-clip.log").read_text(), START,
                   "the child running")
        proc.kill()
        proc.wait(10)
        try:
            child.wait(10)  # stdin EOF -> the child stops itself (bounded: a hang fails here)
        except psutil.TimeoutExpired:
            child.kill()
            pytest.fail("the child outlived its killed host by 10 s")
    finally:
        stop_process(proc)
    assert not listening(clip_port)
    assert "the supervising host is gone" in (tmp_path / "home" / "logs" / "luna-daemon-clip.log").read_text()


def test_frozen_child_is_killed_and_restarted_and_never_hangs_close(tmp_path, model_dir):
    # SIGSTOP: the process lives but answers nothing -- the heartbeat must notice, and a
    # host close must not wait for it past its bound.
    cfg, _, _ = _two(tmp_path, model_dir, health_interval=1)
    host = _host(tmp_path, cfg)
    frozen: list[psutil.Process] = []
    try:
        assert host.start_all(START) == {}
        clip = host.instance("clip")
        first = psutil.Process(clip.snapshot()["pid"])
        first.suspend()
        frozen.append(first)
        wait_until(lambda: clip.state == "error", 30, "the frozen child noticed")
        assert "stopped answering" in clip.detail and "health checks failed" in clip.detail, clip.detail
        wait_until(lambda: clip.state == "running", START, "the frozen child replaced")
        assert not psutil.pid_exists(first.pid) or first.status() == psutil.STATUS_ZOMBIE
        second = psutil.Process(clip.snapshot()["pid"])
        second.suspend()
        frozen.append(second)
        t0 = time.monotonic()
        assert host.close(2.0) is False  # cut off: the child had to be killed
        # deadline 2 + STOP_GRACE 1.5 + EXIT_SLACK 3 + terminate/kill waits 2 + 2, and slack.
        assert time.monotonic() - t0 < 20
        assert not psutil.pid_exists(second.pid) or second.status() == psutil.STATUS_ZOMBIE
        assert host.instance("clip").state == "stopped" and "killed" in host.instance("clip").detail
    finally:
        for p in frozen:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        host.close(2.0)
    assert not _luna_children(os.getpid())
