"""The shipped transport and instances benchmarks run end to end and report what they claim.

No timing is asserted (the machine is noisy): these tests check that every measurement
is made against a real daemon process and a real raw peer, and that the placement check
that guards the unpinned ratios reads real scheduler data.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from luna_daemon import bench, transport


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
        if transport._LOWAT:  # (a2): the raw pair with the receive tuned like the daemon's
            assert r["a2_raw_tuned_s"] > 0
            assert r["ratio_b_over_a2"] == pytest.approx(r["b_protocol_s"] / r["a2_raw_tuned_s"])
        else:
            assert r["a2_raw_tuned_s"] is None and r["ratio_b_over_a2"] is None
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


def test_instances_benchmark_quick_reports_both_layouts():
    """``bench --instances --quick --json`` as a user runs it: real serve hosts (one full
    daemon, a clip + vae host with a child process), two real client processes at once."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, "-m", "luna_daemon", "bench", "--instances", "--quick", "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["benchmark"] == "instances" and rep["ok"] is True and (rep["seconds"], rep["rounds"]) == (1.0, 1)
    # The fake ComfyUI of tests/ stands in for the comfy engine when no ComfyUI is configured.
    assert set(rep["engines"]) == {"standalone", "comfy"} and rep["skipped"] == {}
    for name, e in rep["engines"].items():
        assert e["solo"]["vae_decodes_per_s"] > 0 and e["solo"]["clip_encodes_per_s"] > 0, name
        for layout in ("one_daemon", "two_instances"):
            x = e[layout]
            assert x["vae_decodes_per_s"] > 0 and x["clip_encodes_per_s"] > 0, (name, layout)
            assert x["aggregate"] == pytest.approx(x["vae_share_of_solo"] + x["clip_share_of_solo"])
            assert x["vae_share_of_solo"] == pytest.approx(x["vae_decodes_per_s"] / e["solo"]["vae_decodes_per_s"])
        [one_round] = e["rounds"]  # one round: the medians are that round's figures
        assert {k: one_round[k] for k in ("solo", "one_daemon", "two_instances", "ratio_b_over_a")} == \
            {k: e[k] for k in ("solo", "one_daemon", "two_instances", "ratio_b_over_a")}
        assert e["ratio_b_over_a"] == pytest.approx(e["two_instances"]["aggregate"] / e["one_daemon"]["aggregate"])
        assert any(line.startswith(f"[{name}] solo:") and "(b)/(a) = " in line for line in rep["lines"])
    assert not list(Path(tempfile.gettempdir()).glob("luna-bench-instances-*"))  # its temp folders are gone
