"""The shipped reliability suite (``luna-daemon bench --reliability --quick``), as CI runs it.

The suite itself attacks real daemon processes; these tests check that the quick run
finds nothing wrong with the daemon, and that the suite never leaves processes or temp
folders behind -- also when it is interrupted with Ctrl-C in the middle of a run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from luna_daemon import reliability

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, /dev/zero, /proc: the suite targets Linux")


def _ours(marker: str) -> dict[int, str]:
    """{pid: command line} of live processes whose environment or command line mentions
    ``marker`` (zombies are dead already: their parent merely has not reaped them yet)."""
    found = {}
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
            if marker in cmd or any(marker in v for v in p.environ().values()):
                found[p.pid] = cmd[:200]
        except psutil.Error:
            continue
    return found


def test_quick_suite_finds_nothing_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the suite's temp folder goes here
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    report = reliability.run(quick=True)
    assert report["ok"], "\n".join(report["failures"])
    totals = report["totals"]
    assert (totals["crashes"], totals["hung"], totals["lost"], totals["wrong"], totals["internal"],
            totals["widenings_accepted"], totals["thread_exceptions"]) == (0, 0, 0, 0, 0, 0, 0), totals
    s = report["scenarios"]
    assert set(s) == set(reliability.SCENARIOS)
    # Every scenario really ran and measured (a scenario that cannot run is a failure, but
    # check the figures too: a suite that silently skipped would also report ok).
    assert s["fuzz"]["frames"] >= reliability.QUICK.frames and s["fuzz"]["connections"] > 100
    assert s["fuzz"]["typed"] > 0 and s["fuzz"]["good_client_after"] == {"ping": True, "decode_right": True}
    assert s["flood"]["pings"] == reliability.QUICK.pings and None not in s["flood"]["time_to_admit_s"]
    assert s["killed_clients"]["killed"] == 3 * reliability.QUICK.killed_copies
    assert len(s["hostile_files"]["cases"]) >= 15 and all(c["outcome"] == "error" for c in s["hostile_files"]["cases"])
    assert s["dashboard"]["widening"]["logged_in"] is True and len(s["dashboard"]["widening"]["attempts"]) >= 4
    rounds = s["stop_under_load"]["rounds"]
    assert rounds and rounds[0]["right"] > 0 and rounds[0]["exit_code"] == 0
    # Nothing left behind: no child processes, no temp folder.
    assert [p.cmdline() for p in psutil.Process().children(recursive=True) if p.pid not in children_before] == []
    assert not list(tmp_path.glob("luna-reliability-*"))


def test_ctrl_c_mid_run_cleans_up(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # torch's own per-user compile cache ($TMPDIR/torchinductor_<user>, made when diffusers
    # imports torch._dynamo) is shared by every torch process, not the suite's: kept out.
    env = dict(os.environ, TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "torch-cache"))
    # SIGINT to the suite's process alone (a terminal would signal the whole group): the
    # suite itself must end the daemons and clients it started.
    # SIGINT back to its default in the child: a test run started in the background (nohup,
    # `cmd &` without job control) ignores SIGINT, the suite would inherit that and run on
    # to exit 0, as a real Ctrl-C on a terminal never does.
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "bench", "--reliability", "--quick"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(tmp.glob("luna-reliability-*/home-main/config/token")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the suite's daemon did not start"
            time.sleep(0.2)
        time.sleep(1.0)  # the daemon, the dashboard host and the stop clients are starting
        assert _ours(str(tmp)), "no processes of the suite were found to begin with"
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stderr.close()
    assert proc.returncode != 0
    leftover = _ours(str(tmp))
    for pid in leftover:
        try:
            psutil.Process(pid).kill()  # do not leave them to the next test either
        except psutil.Error:
            pass
    assert leftover == {}
    assert list(tmp.iterdir()) == []

