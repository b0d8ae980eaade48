"""The dashboard's view of child instances costs the child one ``status`` per interval.

The supervisor's heartbeat already asks every child for ``status`` each
``health_interval`` (supervisor.ChildInstance); the monitor's poller must reuse that
answer (``ChildInstance.last_status``) and ask only ``ps`` itself.

How the requests are counted: supervisor-role requests are deliberately kept out of a
daemon's own statistics, so the child cannot tell us. Instead the child's real
``serve --instance`` process is started through a small wrapper (``ChildInstance.command``)
that rewrites its ready line to the port of a TCP relay in this test; the relay forwards
every byte unchanged and reads the op of each request frame on its way to the child.
Everything the host sends the child -- heartbeat, poller, anything else -- passes it, so
the counts are what the child receives. Nothing in the product is changed for the test.
"""

from __future__ import annotations

import collections
import http.client
import json
import socket
import sys
import threading
import time

import pytest
from conftest import free_port

from luna_daemon.client import DaemonClient
from luna_daemon.host import Host
from luna_daemon.protocol import MAGIC, PREFIX, PREFIX_SIZE
from luna_daemon.settings import Settings
from luna_daemon.supervisor import READY_PREFIX, child_command

INTERVAL = 0.5  # health_interval: the heartbeat's and the poller's period
WINDOW = 4.0  # seconds of counting
START = 60.0

# Runs the child's real command line with this wrapper as the child's supervising parent
# (its parent-pid guard) and the host's control pipe as its stdin; copies its stdout,
# announcing the relay's port instead of the child's own. Its stderr (the log lines) goes
# to the host directly.
WRAPPER = r"""
import os, subprocess, sys
relay, cmd = sys.argv[1], sys.argv[2:]
cmd[cmd.index("--supervised-by") + 1] = str(os.getpid())
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
for raw in iter(proc.stdout.readline, b""):
    if raw.startswith(READY):
        host, _, _port = raw.decode().strip()[len(READY):].rpartition(" ")
        raw = f"{READY.decode()}{host} {relay}\n".encode()
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()
code = proc.wait()
sys.exit(code if code >= 0 else 128 - code)
"""


class OpCountingRelay:
    """127.0.0.1:<port> → 127.0.0.1:<target>, counting the op of every request frame."""

    def __init__(self, target: int):
        self.target = target
        self.ops: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._spawn(self._accept)

    def counts(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.ops)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self._socks += [down, up]
            self._spawn(self._requests, down, up)
            self._spawn(self._answers, up, down)

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _requests(self, src: socket.socket, dst: socket.socket) -> None:
        # Frame by frame (protocol.py: prefix, JSON header, body), forwarded as read.
        try:
            while True:
                prefix = self._read(src, PREFIX_SIZE)
                if prefix is None:
                    return
                magic, _version, _kind, _flags, header_len, body_len = PREFIX.unpack(prefix)
                if magic != MAGIC:
                    with self._lock:
                        self.problems.append(f"not a Luna frame: {prefix!r}")
                    return
                header = self._read(src, header_len)
                if header is None:
                    return
                dst.sendall(prefix + header)
                with self._lock:
                    self.ops[str(json.loads(header).get("op"))] += 1
                left = body_len
                while left:
                    chunk = src.recv(min(left, 1 << 20))
                    if not chunk:
                        return
                    dst.sendall(chunk)
                    left -= len(chunk)
        except OSError:
            pass
        finally:
            self._shut(dst)

    def _answers(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(dst)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, []
        self._listener.close()
        for s in socks:
            self._shut(s)
            s.close()
        for t in self._threads:
            t.join(5)


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def relayed_pair(tmp_path, model_dir):
    """A real Host (VAE primary in-process, CLIP child process) whose child is reached only
    through an OpCountingRelay; the monitor (dashboard, poller) runs."""
    child_port = free_port()
    config = tmp_path / "pair.toml"
    config.write_text(
        f'engine = "standalone"\nmonitor_port = 0\nlock_port = 0\nhealth_interval = {INTERVAL}\n'
        f'model_roots = ["{model_dir.as_posix()}"]\n\n'
        '[[instances]]\nname = "vae"\nservice = "vae"\nport = 0\n\n'
        f'[[instances]]\nname = "clip"\nservice = "clip"\nport = {child_port}\n')
    relay = OpCountingRelay(child_port)
    h = Host(Settings.load(config, env={"LUNA_HOME": str(tmp_path / "home")}), log_to_stderr=False)
    child = h.instance("clip")
    child.command = [sys.executable, "-c", f"READY = {READY_PREFIX.encode()!r}\n{WRAPPER}", str(relay.port),
                     *child_command(child.name, child.settings)]
    try:
        h.start_monitor()
        assert h.monitor is not None
        assert h.start_all(START) == {}
        assert child.address == ("127.0.0.1", relay.port), "the host reaches the child through the relay"
        yield h, relay, child_port
    finally:
        h.close(10)
        relay.close()


def test_dashboard_adds_no_status_requests_to_the_heartbeats(relayed_pair):
    h, relay, child_port = relayed_pair
    child = h.instance("clip")
    port = h.monitor.port

    # A client of the child's own (not relayed: client traffic is not what is counted).
    with DaemonClient("127.0.0.1", child_port, token=child.token, timeout=30) as c:
        for _ in range(3):
            c.ping()

    def card():
        status, body = _get(port, "/api/status")
        assert status == 200
        return next(i for i in json.loads(body)["instances"] if i["name"] == "clip")

    # The card's numbers come from the heartbeat's answer: the three pings show up.
    _wait(lambda: card()["requests"]["by_op"].get("ping", {}).get("ok") == 3, 15, "the child's pings on its card")
    _wait(lambda: relay.counts()["ps"] >= 2, 15, "the poller asking ps")

    before = relay.counts()
    t0 = time.monotonic()
    while time.monotonic() - t0 < WINDOW:  # the dashboard in use: pages and scrapes
        assert _get(port, "/api/status")[0] == 200
        assert _get(port, "/metrics")[0] == 200
        assert _get(port, "/api/models")[0] == 200
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    after = relay.counts()
    status = after["status"] - before["status"]
    ps = after["ps"] - before["ps"]
    assert relay.problems == []
    # The heartbeat waits one interval between answers, so at most elapsed / interval + 1
    # status requests; the old poller asked status again each interval (about twice that).
    assert 1 <= status <= elapsed / INTERVAL + 1, (status, elapsed, dict(after))
    assert ps >= 2, (ps, dict(after))  # the model list is still fetched by the poller

    last = child.last_status()
    assert last is not None and last[0]["instance"] == "clip" and abs(time.time() - last[1]) < 10 * INTERVAL


def test_last_status_follows_the_run(relayed_pair):
    h, _relay, _child_port = relayed_pair
    child = h.instance("clip")
    first = child.last_status()
    assert first is not None and isinstance(first[0], dict) and first[0]["state"] == "running"
    _wait(lambda: (cur := child.last_status()) is not None and cur[1] > first[1], 10, "a newer heartbeat answer")
    assert child.stop() is True
    assert child.last_status() is None, "a stopped child has no current answer"
    # The dashboard keeps the last counters; what is live reads as not running.
    status, body = _get(h.monitor.port, "/api/status")
    card = next(i for i in json.loads(body)["instances"] if i["name"] == "clip")
    assert card["state"] == "stopped" and card["clients"] == 0 and card["models"] == 0
    child.start(START)
    assert child.last_status() is not None, "start returns after the first heartbeat answered"
