"""``luna-daemon demo`` shows each step as it happens (issue 12 #14): plain lines when
stdout is a pipe, a live rich display on a terminal. Real subprocesses, output read as it
arrives."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from luna_daemon.demo import STEPS
from luna_daemon.netutil import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_path) -> dict:
    # The demo isolates itself (own LUNA_HOME, port 0); these keep a stray run from ever
    # touching a real install either.
    return dict(os.environ, LUNA_HOME=str(tmp_path / "home"), LUNA_PORT=str(free_port()), HF_HUB_OFFLINE="1",
                PYTHONUNBUFFERED="1", COLUMNS="120")


def test_demo_prints_each_step_as_it_happens(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "demo"], cwd=ROOT, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # incrementally: each line with the time it arrived
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
        assert proc.wait(300) == 0, "\n".join(text for _t, text in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    texts = [text for _t, text in lines]
    first_at, first = lines[0]
    assert first == f"[1/{len(STEPS)}] {STEPS[0]} ...", texts
    # Python start-up only (torch is imported inside the first step); a generous bound for
    # a loaded 2-CPU machine -- before, the first line came after 8-19 s.
    assert first_at < 5.0, f"first line after {first_at:.1f}s"
    expected = []
    for i, name in enumerate(STEPS, 1):
        expected += [f"[{i}/{len(STEPS)}] {name} ...", f"[{i}/{len(STEPS)}] {name} done in "]
    step_lines = [t for t in texts if t.startswith("[")]
    assert len(step_lines) == len(expected), texts
    for got, want in zip(step_lines, expected):
        assert got.startswith(want), (got, want)
    assert re.search(r" done in \d+(\.\d)? (ms|s)$", step_lines[1]), step_lines[1]  # luna_daemon.units
    # the start of the last step arrived before the end (it is shown while it runs)
    stop_start = next(t for t, text in lines if text.startswith(f"[{len(STEPS)}/{len(STEPS)}] daemon stop ..."))
    assert stop_start < lines[-1][0]
    assert texts[-1] == "demo OK"


def test_demo_on_a_terminal_shows_a_live_display(tmp_path):
    pytest.importorskip("rich")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "demo"], cwd=ROOT, env=_env(tmp_path),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(30) == 0, out.decode(errors="replace")[-3000:]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    for i, name in enumerate(STEPS, 1):
        assert f"[{i}/{len(STEPS)}] {name}" in text
    assert "\x1b[" in out.decode(errors="replace")  # drawn live (cursor movement), not plain lines
    assert "demo OK" in text
