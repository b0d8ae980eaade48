"""One Luna host per user: real processes, real sockets.

Every way of starting a daemon (``python luna_daemon/tray_app.py``, ``luna-daemon tray``,
``luna-daemon serve``) takes the same lock port; a second launch prints the message,
exits non-zero, and the running instance hears "show". Without a display the tray entry
point runs the daemon headless (monitor included) under the same lock.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tray_helpers import (
    free_port,
    listening,
    luna_env,
    port_free,
    spawn,
    stop_process,
    tray_script,
    wait_until,
)

from luna_daemon import __version__
from luna_daemon.instance import ALREADY_RUNNING, InstanceLock, LockOwner, notify_running, who_holds_lock
from luna_daemon.netutil import port_holder

SERVE = [sys.executable, "-m", "luna_daemon", "serve"]
CLI_TRAY = [sys.executable, "-m", "luna_daemon", "tray"]
LAUNCHES = {"tray_app.py": tray_script(), "luna-daemon tray": CLI_TRAY, "luna-daemon serve": SERVE}


class Instance:
    def __init__(self, tmp: Path, argv: list[str]):
        self.tmp = tmp
        self.port, self.monitor_port, self.lock_port = free_port(), free_port(), free_port()
        self.env = luna_env(tmp / "luna", port=self.port, monitor_port=self.monitor_port, lock_port=self.lock_port)
        self.out = tmp / "first.out"
        self.log = tmp / "luna" / "logs" / "luna-daemon.log"
        self.proc = spawn(argv, self.env, self.out)

    def wait_running(self) -> None:
        from luna_daemon.client import DaemonClient

        def pings() -> bool:
            assert self.proc.poll() is None, self.out.read_text()
            try:
                with DaemonClient("127.0.0.1", self.port, token="", timeout=5) as c:
                    return c.ping()["pong"] is True
            except Exception:
                return False

        wait_until(pings, 60, "the first instance to answer ping")

    def second(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def first(tmp_path):
    made: list[Instance] = []

    def make(argv: list[str]) -> Instance:
        inst = Instance(tmp_path, argv)
        made.append(inst)
        inst.wait_running()
        return inst

    yield make
    for inst in made:
        stop_process(inst.proc)


@pytest.mark.parametrize("first_launch,second_launch", [
    ("tray_app.py", "tray_app.py"),
    ("luna-daemon serve", "luna-daemon serve"),
    ("luna-daemon serve", "tray_app.py"),
    ("tray_app.py", "luna-daemon serve"),
    ("tray_app.py", "luna-daemon tray"),
])
def test_second_launch_is_refused_and_first_is_asked_to_show(first, first_launch, second_launch):
    inst = first(LAUNCHES[first_launch])
    r = inst.second(LAUNCHES[second_launch])
    assert r.returncode != 0, r
    # the first instance is named by its pid (its lock answers the second launch's "show")
    refusal = f"{ALREADY_RUNNING} (pid {inst.proc.pid})"
    assert r.stdout.strip().splitlines()[-1] == refusal, r.stdout
    # the refusal is logged too (the shared log file of this LUNA_HOME)
    wait_until(lambda: refusal in inst.log.read_text(), 10, "the refusal in the log")
    wait_until(lambda: "another launch asked this instance to show" in inst.log.read_text(), 10,
               "the first instance to receive 'show'")
    assert inst.proc.poll() is None, "the first instance must keep running"
    # and the first instance still serves
    inst.wait_running()


def test_tray_without_display_runs_headless_with_monitor(first):
    inst = first(tray_script())
    text = inst.log.read_text()
    assert "no display" in text and "running the daemon headless" in text
    if importlib.util.find_spec("luna_daemon.web.monitor") is not None:
        wait_until(lambda: listening(inst.monitor_port), 20, "the monitor port (host.start_monitor)")
    assert listening(inst.lock_port)
    assert stop_process(inst.proc) == 0, inst.out.read_text()
    for port in (inst.port, inst.monitor_port, inst.lock_port):
        assert port_free(port), port


def test_lock_message_reaches_the_owner():
    got: list[str] = []
    lock = InstanceLock("127.0.0.1", 0, got.append)
    assert lock.acquire()
    try:
        other = InstanceLock("127.0.0.1", lock.port)
        assert other.acquire() is False  # exclusive, even within one process
        # "hello" only asks who is there: answered, never passed on to the owner
        assert who_holds_lock("127.0.0.1", lock.port) == LockOwner(True, os.getpid(), __version__)
        assert notify_running("127.0.0.1", lock.port, "show") is True
        wait_until(lambda: got == ["show"], 5, "the message")
        assert other.refusal() == f"{ALREADY_RUNNING} (pid {os.getpid()})"
        wait_until(lambda: got == ["show", "show"], 5, "the refusal's own 'show'")
    finally:
        lock.release()
    assert notify_running("127.0.0.1", lock.port, "show", timeout=1) is False
    assert who_holds_lock("127.0.0.1", lock.port, timeout=1) is None


def test_relaunch_right_after_a_lock_conversation_is_not_refused():
    # Deterministic: this client waits for the owner to close first (as `nc` and many clients
    # do), so the owner's side of the connection always ends in TIME_WAIT.
    lock = InstanceLock("127.0.0.1", 0, lambda _m: None)
    assert lock.acquire()
    port = lock.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"show\n")
        assert s.recv(128) == f"ok LUNA-LOCK {os.getpid()} {__version__}\n".encode()
        assert s.recv(16) == b""  # the owner closed its end first
    lock.release()
    again = InstanceLock("127.0.0.1", port)
    try:
        assert again.acquire(), "nothing holds the lock, yet it cannot be taken"
    finally:
        again.release()


def test_port_holder_names_the_listening_process():
    import psutil

    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        port = ls.getsockname()[1]
        assert port_holder(port) is None  # bound, not listening
        ls.listen(1)
        holder = port_holder(port)
        assert (holder.pid, holder.name) == (os.getpid(), psutil.Process().name())
        assert str(holder) == f"{psutil.Process().name()} (pid {os.getpid()})"
    assert port_holder(port) is None
