"""The charts' history (luna_daemon/web/history.py): real host, real daemon, real requests.

The sampler's clock is a test clock where a rate is checked (so ``rps`` is exact); the
WebSocket test runs the real sampler thread with a short interval.
"""

from __future__ import annotations

import json
import time

import pytest
from websockets.sync.client import connect

from luna_daemon.client import DaemonClient
from luna_daemon.host import Host
from luna_daemon.service import Stats
from luna_daemon.web import history
from luna_daemon.web.history import FACTOR, OLD, RECENT, History, merge, quantile

WAIT = 15.0


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def host(make_settings):
    h = Host(make_settings(), log_to_stderr=False)
    h.daemon.start()
    yield h
    h.close(10)


def _hist(stats: Stats, op: str) -> list[tuple[float | None, int]]:
    return [(e, c) for e, c in stats.latency()[op]["buckets"]]


def test_quantile_of_a_real_latency_histogram():
    s = Stats()
    for _ in range(90):
        s.record("ping", "ok", 0.003)    # bucket (2.5 ms, 5 ms]
    for _ in range(10):
        s.record("ping", "ok", 0.7)      # bucket (0.5 s, 1 s]
    h = _hist(s, "ping")
    assert 0.0025 < quantile(0.5, h) <= 0.005
    assert 0.5 < quantile(0.95, h) <= 1.0
    assert quantile(0.5, [(0.1, 0), (None, 0)]) is None
    s2 = Stats()
    s2.record("ping", "ok", 120.0)       # past the last finite bound: that bound is all we know
    assert quantile(0.5, _hist(s2, "ping")) == 60.0


def test_rate_and_latency_per_op_from_real_requests(host):
    clock = Clock()
    hist = History(host, clock=clock)
    first = hist.sample()
    assert first["ops"] == {}, "no rate without a previous sample"
    assert "cpu" in first["mem"] and first["mem"]["cpu"]["total"] > 0
    with DaemonClient(*host.daemon.address, token=host.daemon.token, timeout=30) as c:
        for _ in range(20):
            c.ping()
        clock.t += 10.0
        second = hist.sample()
        assert second["clients"] >= 1
    ping = second["ops"]["ping"]
    assert ping["rps"] == pytest.approx(2.0)   # 20 pings in 10 s
    assert ping["p50"] is not None and 0 < ping["p50"] <= ping["p95"]
    clock.t += 10.0
    third = hist.sample()
    assert "ping" not in third["ops"], "an op without requests in a tick is left out"
    assert [s["t"] for s in hist.samples()] == [first["t"], second["t"], third["t"]]


def test_a_restarted_daemon_never_gives_a_negative_rate(host):
    clock = Clock()
    hist = History(host, clock=clock)
    with DaemonClient(*host.daemon.address, token=host.daemon.token, timeout=30) as c:
        for _ in range(30):
            c.ping()
    hist.sample()
    host.daemon.stop()
    clock.t += 5
    stopped = hist.sample()
    assert stopped["ops"] == {} and stopped["mem"] == {}
    host.daemon.start()
    with DaemonClient(*host.daemon.address, token=host.daemon.token, timeout=30) as c:
        hist.sample()
        for _ in range(5):
            c.ping()
        clock.t += 5
        after = hist.sample()
    assert after["ops"]["ping"]["rps"] == pytest.approx(1.0)


def test_history_is_bounded_and_old_samples_are_downsampled():
    hist = History(host=None)  # add() needs no host
    total = RECENT + FACTOR * OLD + 5 * FACTOR
    for i in range(total):
        hist.add({"t": float(i), "clients": 1, "queue": i % FACTOR, "mem": {}, "ops": {"ping": {"rps": 2.0, "p50": 1.0, "p95": float(i % FACTOR)}}})
    kept = hist.samples()
    assert len(kept) == RECENT + OLD
    ts = [s["t"] for s in kept]
    assert ts == sorted(ts) and ts[-1] == total - 1
    old = kept[0]
    # A merged sample: means, except the peaks of queue and p95.
    assert old["clients"] == 1 and old["ops"]["ping"]["rps"] == 2.0
    assert old["queue"] == FACTOR - 1 and old["ops"]["ping"]["p95"] == FACTOR - 1
    assert len(json.dumps(kept)) < 400_000


def test_merge_keeps_keys_that_only_some_samples_have():
    m = merge([{"t": 1, "ops": {"a": {"rps": 1.0}}, "mem": {"cpu": {"free": None}}},
               {"t": 2, "ops": {"b": {"rps": 3.0}}, "mem": {"cpu": {"free": 4}}}])
    assert m == {"t": 2, "ops": {"a": {"rps": 1.0}, "b": {"rps": 3.0}}, "mem": {"cpu": {"free": 4.0}}}


def test_samples_reach_the_dashboard_over_the_websocket(make_settings, monkeypatch):
    monkeypatch.setattr(history, "SAMPLE_INTERVAL", 0.2)
    h = Host(make_settings(), log_to_stderr=False)
    try:
        h.start_monitor()
        h.daemon.start()
        with DaemonClient(*h.daemon.address, token=h.daemon.token, timeout=30) as c, \
                connect(f"ws://127.0.0.1:{h.monitor.port}/ws", open_timeout=WAIT) as ws:
            c.ping()
            snap = json.loads(ws.recv(WAIT))
            assert snap["type"] == "snapshot"
            assert snap["history"]["interval"] == 0.2
            assert snap["history"]["window"] == pytest.approx(0.2 * (RECENT + FACTOR * OLD))
            deadline = time.monotonic() + WAIT
            got = None
            while time.monotonic() < deadline:
                m = json.loads(ws.recv(WAIT))
                if m["type"] == "sample" and m["sample"]["clients"] >= 1:
                    got = m["sample"]
                    break
            assert got is not None, "no sample with the connected client arrived"
            assert set(got) == {"t", "clients", "queue", "mem", "ops"}
    finally:
        h.close(10)
