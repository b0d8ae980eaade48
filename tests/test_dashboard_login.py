"""``luna-daemon dashboard``: a login link for headless users, proven by the token (issue 12 item 3).

A real ``serve`` process with its monitor; the CLI as a real process; the link redeemed
over a real WebSocket, as the dashboard page does."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest
from conftest import serve_env
from websockets.sync.client import connect

from luna_daemon.client import wait_for_daemon
from luna_daemon.instance import LoginRefused, request_login
from luna_daemon.settings import Settings, load_or_create_token, read_token

WAIT = 10.0


def _env(home, model_dir, **extra):
    env = serve_env(home, model_dir)
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        env.pop(name, None)  # headless: no browser may be started by a test
    env.update(extra)
    return env


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "luna_daemon", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def served(tmp_path, model_dir):
    env = _env(tmp_path / "home", model_dir)
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_daemon("127.0.0.1", int(env["LUNA_PORT"]), 60, proc=proc)
        yield env, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=30)


def _ws_login(monitor_port: int, secret: str) -> dict:
    with connect(f"ws://127.0.0.1:{monitor_port}/ws", open_timeout=WAIT) as ws:
        ws.send(json.dumps({"type": "login", "secret": secret}))
        while True:
            msg = json.loads(ws.recv(timeout=WAIT))
            if msg.get("type") == "auth":
                return msg


def test_dashboard_prints_a_working_one_time_link(served):
    env, _proc = served
    r = _cli(env, "dashboard", "--no-open", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    port = int(env["LUNA_MONITOR_PORT"])
    m = re.fullmatch(rf"http://127\.0\.0\.1:{port}/#page=status&login=([A-Za-z0-9_\-]{{20,}})", out["url"])
    assert m and out["opened"] is False, out
    assert _ws_login(port, m.group(1))["ok"] is True
    assert _ws_login(port, m.group(1))["ok"] is False, "a login link works once"

    # Without --no-open and without a display: printed, never a browser.
    r = _cli(env, "dashboard", "logs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"http://127.0.0.1:{port}/#page=logs&login=" in r.stdout and "open this link" in r.stdout
    settings = Settings.load(env={"LUNA_HOME": env["LUNA_HOME"]})
    assert settings.token_path.exists()


def test_a_wrong_token_gets_no_link(served, tmp_path, model_dir):
    env, _proc = served
    lock = int(env["LUNA_LOCK_PORT"])
    # Another install (own LUNA_HOME, so its own token) aimed at this host's lock port.
    other = _env(tmp_path / "other", model_dir, LUNA_LOCK_PORT=str(lock))
    load_or_create_token(Settings.load(env={"LUNA_HOME": other["LUNA_HOME"]}))
    r = _cli(other, "dashboard", "--no-open", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refused this token" in r.stdout and "http://" not in r.stdout

    # A raw local program: the greeting, then a refusal and nothing else.
    for line in (b"login not-the-token status\n", b"login\n", b"login " + b"x" * 300 + b"\n"):
        answer = b""
        with socket.create_connection(("127.0.0.1", lock), timeout=WAIT) as s:
            s.sendall(line)
            s.shutdown(socket.SHUT_WR)
            try:
                while chunk := s.recv(4096):
                    answer += chunk
            except ConnectionResetError:  # the over-long line: the host closes with bytes unread
                assert len(line) > 256
                continue
        assert b"http" not in answer and b"denied token" in answer, answer
    with pytest.raises(LoginRefused) as refused:
        request_login("127.0.0.1", lock, "wrong-token")
    assert refused.value.reason == "token"

    # The right token still works afterwards, and the host never logged it.
    token = read_token(Settings.load(env={"LUNA_HOME": env["LUNA_HOME"]}))
    assert request_login("127.0.0.1", lock, token, "models").startswith(
        f"http://127.0.0.1:{env['LUNA_MONITOR_PORT']}/#page=models&login=")
    log_text = (Settings.load(env={"LUNA_HOME": env["LUNA_HOME"]}).log_file).read_text()
    assert token not in log_text and "wrong token" in log_text
    assert "luna-daemon dashboard" in log_text  # serve's startup hint


def test_dashboard_without_monitor_or_host(tmp_path, model_dir):
    env = _env(tmp_path / "home", model_dir)
    r = _cli(env, "dashboard", "--no-open")
    assert r.returncode == 3 and "luna-daemon serve" in r.stdout, r.stdout + r.stderr  # no token yet

    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve", "--no-monitor"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_daemon("127.0.0.1", int(env["LUNA_PORT"]), 60, proc=proc)
        r = _cli(env, "dashboard", "--no-open")
        assert r.returncode == 1 and "no dashboard" in r.stdout and "http://" not in r.stdout, r.stdout + r.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    r = _cli(env, "dashboard", "--no-open")  # token exists now, nothing listens
    assert r.returncode == 3 and "not running" in r.stdout, r.stdout + r.stderr
