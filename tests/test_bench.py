"""The shipped transport benchmark runs end to end and reports what it claims.

No timing is asserted (the machine is noisy): these tests check that every measurement
is made against a real daemon process and a real raw peer, and that the placement check
that guards the unpinned ratios reads real scheduler data.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

from luna_daemon import bench


def test_comparable_placements():
    assert bench._comparable({"client": 0, "raw": 0, "daemon": 0}, "raw") is True
    assert bench._comparable({"client": 0, "raw": 1, "daemon": 1}, "raw") is True
    assert bench._comparable({"client": 0, "raw": 0, "daemon": 1}, "raw") is False
    assert bench._comparable({"client": 0, "raw": 1, "daemon": 0}, "raw") is False
    assert bench._comparable({"client": 0, "raw": None, "daemon": 0}, "raw") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_where_ran_finds_the_busy_thread():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    where = bench._WhereRan(me=os.getpid())
    t = threading.Thread(target=spin)
    t.start()
    try:
        stats_during = bench._thread_stats(os.getpid())
        stop.wait(0.3)
        cpus = where.cpus()
    finally:
        stop.set()
        t.join()
    assert str(t.native_id) in stats_during
    assert cpus["me"] in os.sched_getaffinity(0)


def test_transport_benchmark_runs_end_to_end():
    report = bench.transport_benchmark(repeats=3)
    placements = report["placements"]
    assert "unpinned" in placements
    if len(os.sched_getaffinity(0)) >= 2:
        assert {"cross-core", "same-core"} <= placements.keys()
    for name, r in placements.items():
        for key in ("a_raw_s", "b_protocol_s", "c_raw_rtt_us", "c_ping_p50_us"):
            assert r[key] > 0, (name, key)
        assert r["ratio_b_over_a"] == pytest.approx(r["b_protocol_s"] / r["a_raw_s"])
        if name != "unpinned":
            assert r["bulk_comparable"] is True and r["ping_comparable"] is True
    d = placements["unpinned"]
    assert d["d_local_decode_s"] > 0 and d["d_daemon_decode_s"] > 0 and d["target_d"] >= 1.15
    assert any("(c) ping p50" in line for line in report["lines"])
    # (e) shared memory beside (a) and a memcpy, in every placement; (f) video-sized once.
    for name, r in placements.items():
        assert r["e_shm_s"] > 0 and r["e_memcpy_s"] > 0, name
        assert r["ratio_e_over_a"] == pytest.approx(r["e_shm_s"] / r["a_raw_s"])
    assert d["f_tcp_s"] > 0 and d["f_shm_s"] > 0 and d["f_memcpy_s"] > 0
    assert d["ratio_f_shm_over_memcpy"] == pytest.approx(d["f_shm_s"] / d["f_memcpy_s"])
    assert any("(e) shared memory" in line for line in report["lines"])
    assert any("(f) video-sized" in line for line in report["lines"])
