"""huge_pages: the daemon asks PyTorch for transparent huge pages, and says whether it got them.

Real processes: PyTorch fixes its choice at a process's first big tensor, so each case
runs in a fresh interpreter (the daemon cases as a real ``serve`` process). What is
expected depends on this machine's kernel (THP ``never`` on a CI runner is possible), so
the expectation is read from the same sysfs file the kernel uses -- every branch asserts
a definite outcome."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from luna_daemon import hugepages
from luna_daemon.client import DaemonClient

LINUX = sys.platform.startswith("linux")
KERNEL = hugepages.kernel_mode()
THP_POSSIBLE = LINUX and KERNEL in ("always", "madvise")


def test_kernel_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    for text, want in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                       ("always madvise [never]\n", "never"), ("garbage\n", None), ("", None)):
        f.write_text(text)
        assert hugepages.kernel_mode(str(f)) == want, text
    assert hugepages.kernel_mode(str(tmp_path / "missing")) is None


def test_kernel_problem_is_the_one_advice_for_status_and_doctor():
    assert hugepages.kernel_problem("madvise") is None and hugepages.kernel_problem("always") is None
    what, fix = hugepages.kernel_problem("never")
    assert "'never'" in what and f"echo madvise > {hugepages.SYSFS}" in fix
    what, fix = hugepages.kernel_problem(None)
    assert "no transparent huge pages" in what and fix


def _configure_in_fresh_process(code: str) -> dict:
    script = textwrap.dedent("""
        import json, os, sys
        os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
        from luna_daemon import hugepages
    """) + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_configure_on_gets_huge_pages_when_the_kernel_allows():
    out = _configure_in_fresh_process("out = hugepages.configure(True)")
    assert out["enabled"] is True and out["kernel"] == KERNEL
    if THP_POSSIBLE:
        assert out["active"] is True, out
        # 36 MiB in small pages is 9216 faults; with huge pages ~530 (the unaligned ends).
        assert out["probe_faults"] is not None and out["probe_faults"] < 2048, out
    else:
        assert out["active"] is False and out["reason"], out


def test_configure_off_keeps_small_pages():
    out = _configure_in_fresh_process("out = hugepages.configure(False)")
    assert out["active"] is False
    if LINUX:
        assert out["reason"] == "off in settings (huge_pages = false)"
        assert out["probe_faults"] is not None and out["probe_faults"] >= 4608, out  # ~9216 small pages


@pytest.mark.skipif(not THP_POSSIBLE, reason=f"kernel THP mode is {KERNEL!r}")
def test_a_big_tensor_before_configure_is_reported_not_hidden():
    # PyTorch has made its choice at the first big tensor: asking later cannot change it,
    # and the state must say so instead of claiming huge pages.
    out = _configure_in_fresh_process("""
        import torch
        torch.ones(8 << 20, dtype=torch.uint8)
        out = hugepages.configure(True)
    """)
    assert out["active"] is False and "before the setting could apply" in out["reason"], out


def test_configure_is_fixed_for_the_process():
    out = _configure_in_fresh_process("""
        first = hugepages.configure(True)
        again = hugepages.configure(False)
        out = {"first": first, "again": again, "state": hugepages.state()}
    """)
    assert out["again"]["active"] == out["first"]["active"] == out["state"]["active"]
    assert out["state"]["enabled"] is True
    assert "takes effect on a restart" in out["again"]["reason"]


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_daemon_status_reports_huge_pages(tmp_path, on):
    from luna_daemon.bench import daemon_process

    env = {"LUNA_HUGE_PAGES": "true" if on else "false"}
    with daemon_process([str(tmp_path)], extra_env=env) as (port, token, _proc):
        with DaemonClient("127.0.0.1", port, token=token, timeout=30) as c:
            hp = c.status()["huge_pages"]
    assert hp["enabled"] is on
    assert hp["active"] is (on and THP_POSSIBLE), hp
    assert hp["reason"]


def test_doctor_names_the_kernel_mode(make_settings):
    from luna_daemon.doctor import run_checks

    s = make_settings()
    found = [f for f in run_checks(s, devices=False) if f.check == "huge pages"]
    assert len(found) == 1
    f = found[0]
    if not LINUX:
        assert f.status == "ok"
    elif KERNEL in ("always", "madvise"):
        assert f.status == "ok" and KERNEL in f.finding
    else:
        assert f.status == "warn" and f.fix
    off = [f for f in run_checks(make_settings(huge_pages=False), devices=False) if f.check == "huge pages"]
    assert off[0].status == "ok" and "huge_pages = false" in off[0].finding
