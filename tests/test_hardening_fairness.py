"""Fairness under a connection flood (issue 11, item 11): a local program that fills
``max_connections`` with idle or slow-loris connections can never lock real clients out.

Real daemons (in-process ``Daemon`` and a ``luna-daemon serve`` subprocess), real
sockets; the flood is raw TCP connections that never send a byte, or that dribble a
never-ending frame one byte at a time.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from tray_helpers import luna_env, spawn, stop_process, wait_until

from luna_daemon import protocol, transport
from luna_daemon.client import DaemonClient
from luna_daemon.daemon import Daemon
from luna_daemon.netutil import free_port
from luna_daemon.settings import Settings, read_token

# A valid prefix that announces a 1 MiB header (the hard cap) and no body: a slow-loris
# peer sends it, then header bytes, one at a time, so the frame never completes.
_LORIS_PREFIX = b"LUNA" + bytes([protocol.VERSION, 1]) + b"\0\0" + struct.pack(">IQ", 1 << 20, 0)


def _gone(sock: socket.socket) -> bool:
    """Has the daemon closed this raw connection? (A flood connection that can be read
    from was closed, or answered with a refusal frame before being closed.)"""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


class Flood:
    """``n`` raw connections; with ``loris`` each dribbles one byte every ``interval``."""

    def __init__(self, address: tuple[str, int], n: int, *, loris: bool = False, interval: float = 0.5):
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            for _ in range(n):
                s = socket.create_connection(address, timeout=10)
                s.settimeout(None)  # blocking: MSG_DONTWAIT probes then cost no poll wait
                self.socks.append(s)
        except BaseException:
            self.close()
            raise
        if loris:
            self._thread = threading.Thread(target=self._dribble, args=(interval,), daemon=True)
            self._thread.start()

    def _dribble(self, interval: float) -> None:
        payload = _LORIS_PREFIX + b" " * (1 << 20)
        pos = 0
        while not self._stop.wait(interval):
            byte = payload[pos:pos + 1]
            pos += 1
            for s in list(self.socks):
                try:
                    s.send(byte, socket.MSG_DONTWAIT)
                except OSError:
                    pass  # evicted (or refused): the daemon closed it

    def closed_count(self) -> int:
        return sum(_gone(s) for s in self.socks)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for s in self.socks:
            s.close()


@contextmanager
def flood(address: tuple[str, int], n: int, **kw) -> Iterator[Flood]:
    f = Flood(address, n, **kw)
    try:
        yield f
    finally:
        f.close()


def _quiet(d: Daemon) -> None:
    """start() verified itself with a ping; its connection leaves its slot asynchronously."""
    wait_until(lambda: d.server.connection_count == 0, 10, "start()'s own ping connection to close")


@pytest.fixture
def small_daemon(make_settings):
    """An in-process daemon with max_connections=8 (and room for a slow-loris frame)."""
    d = Daemon(make_settings(max_connections=8, frame_timeout=30))
    d.start()
    _quiet(d)
    yield d
    d.stop(10)


@pytest.fixture(scope="module")
def serve_daemon(tmp_path_factory):
    """``luna-daemon serve`` in a subprocess with the default limits (max_connections=64)."""
    home = tmp_path_factory.mktemp("fair") / "luna"
    port = free_port()
    env = luna_env(home, port=port, monitor_port=free_port(), lock_port=free_port())
    proc = spawn([sys.executable, "-m", "luna_daemon", "serve"], env, home.parent / "serve.out")
    try:
        from luna_daemon.client import wait_for_daemon

        wait_for_daemon("127.0.0.1", port, 90, proc=proc)
        token = read_token(Settings.load(env={"LUNA_HOME": str(home)}))
        assert token, "the daemon wrote no token"
        assert Settings.load(env={"LUNA_HOME": str(home)}).max_connections == 64
        yield ("127.0.0.1", port), token
    finally:
        stop_process(proc)


def _ping_within(address, token, seconds: float = 5.0) -> None:
    t0 = time.monotonic()
    with DaemonClient(*address, token=token, timeout=seconds, connect_timeout=seconds) as c:
        assert c.ping()["pong"] is True
        assert "requests" in c.status()  # an authenticated op too
    assert time.monotonic() - t0 < seconds


# ----------------------------------------------------------------------------- (a) idle flood
def test_idle_flood_at_max_connections_lets_a_real_client_in(small_daemon):
    d = small_daemon
    with flood(d.address, 8) as f:
        wait_until(lambda: d.server.connection_count == 8, 10, "the flood to fill all 8 slots")
        _ping_within(d.address, d.token)
        assert f.closed_count() >= 1  # a flood connection made room
        assert d.server.connection_count <= 8


def test_idle_flood_of_200_against_default_limits(serve_daemon):
    address, token = serve_daemon
    with flood(address, 200) as f:
        # Every connection past the 64 slots was processed (evicted or refused) ...
        wait_until(lambda: f.closed_count() >= 200 - 64, 20, "the accept loop to take all 200")
        _ping_within(address, token)


# ----------------------------------------------------------------------------- (b) slow loris
def test_slow_loris_flood_lets_a_real_client_in(small_daemon):
    d = small_daemon
    with flood(d.address, 8, loris=True) as f:
        wait_until(lambda: d.server.connection_count == 8, 10, "the slow-loris flood to fill all 8 slots")
        time.sleep(1.2)  # a few bytes in: the frames have started, none completed
        _ping_within(d.address, d.token)
        assert f.closed_count() >= 1


def test_slow_loris_flood_of_200_against_default_limits(serve_daemon):
    address, token = serve_daemon
    with flood(address, 200, loris=True) as f:
        wait_until(lambda: f.closed_count() >= 200 - 64, 20, "the accept loop to take all 200")
        time.sleep(1.2)
        _ping_within(address, token)


# ----------------------------------------------------------------------------- (c) latency
def test_ping_latency_during_a_200_connection_flood(serve_daemon):
    """p99 < 50 ms is the benchmark figure; the test asserts a bound that cannot flake."""
    address, token = serve_daemon
    with flood(address, 100) as idle, flood(address, 100, loris=True) as loris:
        wait_until(lambda: idle.closed_count() + loris.closed_count() >= 200 - 64, 20, "the accept loop to take all 200")
        with DaemonClient(*address, token=token, timeout=10) as c:
            c.ping()
            lat = []
            for _ in range(300):
                t0 = time.perf_counter()
                assert c.ping()["pong"] is True
                lat.append(time.perf_counter() - t0)
                time.sleep(0.005)
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
    print(f"\nping during a 200-connection flood: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, max {lat[-1] * 1e3:.2f} ms")
    assert len(lat) == 300 and p99 < 1.0


# ----------------------------------------------------------------------------- (d) in flight
def _start_echo_held(address, token) -> socket.socket:
    """An authenticated request whose 32 MB answer the client does not read: the daemon's
    connection thread stays in flight (blocked sending) until the answer is read."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(address)
    buffers, _ = protocol.request(7, "echo", {"reply_shape": [8 * 1024 * 1024]}, token)
    s.sendall(b"".join(bytes(b) for b in buffers))
    return s


def _read_answer(s: socket.socket):
    frame = transport.Channel(s).read_frame(protocol.Limits(), idle_timeout=20, frame_timeout=20)
    return protocol.parse_response(frame)


def _raw_ping(address) -> socket.socket:
    s = socket.create_connection(address, timeout=10)
    s.sendall(b"".join(bytes(b) for b in protocol.request(1, "ping")[0]))
    _, ok, payload = _read_answer(s)
    assert ok is True and payload["pong"] is True, payload
    return s


def test_connections_with_a_request_in_flight_are_never_evicted(make_settings):
    d = Daemon(make_settings(max_connections=4, frame_timeout=30))
    d.start()
    opened: list[socket.socket] = []
    try:
        _quiet(d)
        held = [_start_echo_held(d.address, d.token) for _ in range(2)]
        opened += held
        wait_until(lambda: d.server.in_flight == 2, 10, "both echo answers to be in flight")
        with flood(d.address, 2):
            wait_until(lambda: d.server.connection_count == 4, 10, "the 4 slots to fill")
            # Six newcomers, each admitted by evicting an idle connection, never a held one.
            for _ in range(6):
                opened.append(_raw_ping(d.address))
            # A ping's answer leaves before its in-flight count drops: wait for that.
            wait_until(lambda: d.server.in_flight == 2, 10, "only the two held answers in flight")
            for s in held:
                rid, ok, payload = _read_answer(s)
                assert rid == 7 and ok is True and tuple(payload["reply"].shape) == (8 * 1024 * 1024,)
        # Every slot busy with an authenticated request in flight: now, and only now, busy.
        for s in opened:
            s.close()
        opened.clear()
        wait_until(lambda: d.server.connection_count == 0, 10, "the connections to close")
        opened += [_start_echo_held(d.address, d.token) for _ in range(4)]
        wait_until(lambda: d.server.in_flight == 4, 10, "4 answers to be in flight")
        with socket.create_connection(d.address, timeout=10) as late:
            rid, ok, (code, message) = _read_answer(late)
            assert ok is False and code == "busy" and "max_connections" in message, message
        for s in opened:
            rid, ok, payload = _read_answer(s)
            assert ok is True
    finally:
        for s in opened:
            s.close()
        d.stop(10)


# ----------------------------------------------------------------------------- (e) client
def _evict_pooled(d: Daemon, c: DaemonClient, others: list[socket.socket]) -> None:
    """Fill the other slot with a connection more recently authenticated than ``c``'s
    pooled one, then connect once more: the pooled connection is the one evicted."""
    assert len(c._pool) == 1
    pooled = c._pool[0]
    s = socket.create_connection(d.address, timeout=10)
    others.append(s)
    s.sendall(b"".join(bytes(b) for b in protocol.request(1, "status", None, d.token)[0]))
    assert _read_answer(s)[1] is True
    others.append(_raw_ping(d.address))  # the newcomer: evicts the longest-idle authenticated
    wait_until(pooled.channel.peer_gone, 10, "the pooled connection to be evicted")


def test_client_survives_eviction_of_its_pooled_connection(make_settings):
    d = Daemon(make_settings(max_connections=2))
    d.start()
    others: list[socket.socket] = []
    try:
        _quiet(d)
        c = DaemonClient(*d.address, token=d.token, timeout=10)
        assert "requests" in c.status()
        _evict_pooled(d, c, others)
        assert "requests" in c.status()  # idempotent
        for s in others:
            s.close()
        others.clear()
        _evict_pooled(d, c, others)
        assert c.shutdown() == {"stopping": True}  # not idempotent: must not be sent on a dead one
        assert d.wait_stopped(20)
        c.close()
    finally:
        for s in others:
            s.close()
        d.stop(10)


def test_non_idempotent_op_after_the_daemon_closed_an_idle_pooled_connection(make_settings):
    d = Daemon(make_settings(idle_timeout=0.3))
    d.start()
    try:
        with DaemonClient(*d.address, token=d.token, timeout=10) as c:
            assert c.ping()["pong"] is True
            pooled = c._pool[0]
            wait_until(pooled.channel.peer_gone, 10, "the daemon to close the idle connection")
            assert c.shutdown() == {"stopping": True}
        assert d.wait_stopped(20)
    finally:
        d.stop(10)


# ----------------------------------------------------------------------------- pipelining
def test_unread_pipelined_answers_do_not_pin_a_slot(make_settings):
    """A peer that pipelines thousands of ``hello``s and never reads the answers leaves its
    connection thread blocked sending, in flight, for up to frame_timeout. It never
    authenticated, so the slot is still given to a newcomer."""
    d = Daemon(make_settings(max_connections=1, frame_timeout=60))
    d.start()
    s = socket.socket()
    try:
        _quiet(d)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(d.address)
        # 200 000 hellos (10 MB of requests, ~130 MB of answers at 664 B each): far more
        # than any socket buffer holds. With 20 000 (~13 MB of answers) one loaded CI run
        # never saw the connection thread blocked for a second; why is not established.
        # Sent from a thread, since the send itself blocks once the daemon stops reading;
        # it ends with an error when the daemon drops the connection (eviction, stop).
        hellos = b"".join(bytes(b) for b in protocol.request(1, "hello")[0]) * 200_000

        def pipeline() -> None:
            try:
                s.sendall(hellos)
            except OSError:
                pass  # evicted / closed: what the test waits for

        threading.Thread(target=pipeline, daemon=True).start()
        stuck_since = [None]

        def stuck() -> bool:  # in flight without a break for a second: blocked in send
            if not d.server.in_flight:
                stuck_since[0] = None
                return False
            stuck_since[0] = stuck_since[0] or time.monotonic()
            return time.monotonic() - stuck_since[0] > 1.0

        wait_until(stuck, 30, "the pipelined answers to fill the socket buffers", interval=0.005)
        _ping_within(d.address, d.token)
        wait_until(lambda: _gone(s), 10, "the pipelining connection to be evicted")
    finally:
        s.close()
        d.stop(10)


def test_an_authenticated_upload_on_a_fresh_connection_is_not_evicted_mid_body(make_settings):
    """A first frame with a big body (``echo`` with a 4 MiB tensor, as ``lora_put`` or a
    state-dict upload would be) is admitted from its header; while its body still arrives,
    a flood of newcomers evicts others, never it."""
    import torch

    d = Daemon(make_settings(max_connections=3, frame_timeout=30))
    d.start()
    try:
        _quiet(d)
        data = torch.arange(1 << 20, dtype=torch.float32)
        frame = b"".join(bytes(b) for b in protocol.request(9, "echo", {"x": data}, d.token)[0])
        up = socket.create_connection(d.address, timeout=20)
        try:
            up.sendall(frame[:len(frame) // 2])  # header + half the body: admitted, not finished
            wait_until(lambda: d.server.connection_count == 1, 10, "the upload's connection to be counted")
            time.sleep(0.2)  # its thread is now receiving the body
            with flood(d.address, 2):
                wait_until(lambda: d.server.connection_count == 3, 10, "the slots to fill")
                for _ in range(4):  # each newcomer evicts someone: the idle flood, then each other
                    _raw_ping(d.address).close()
            up.sendall(frame[len(frame) // 2:])
            rid, ok, payload = _read_answer(up)
            assert rid == 9 and ok is True and payload["received"] == {"x": [1 << 20]}, payload
        finally:
            up.close()
    finally:
        d.stop(10)
