"""A bad or edited config.toml is visible, never silent, and live where it can be.

Real files, real ``serve`` processes and CLI subprocesses, a real daemon for the client.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from test_tray_e2e import _notified, real_tray, shot, xs  # noqa: F401  (fixtures: the real tray under Xvfb)
from tray_helpers import port_free, wait_until

from luna_daemon.client import DaemonClient, wait_for_daemon
from luna_daemon.settings import Settings, SettingsError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # as editors do: the watcher must see a new inode
    return path


def _cli(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "luna_daemon", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_")}
    env.update(LUNA_HOME=str(home), HF_HUB_OFFLINE="1")
    return env


def _config(port: int, monitor_port: int, lock_port: int, extra: str = "") -> str:
    return (f'# Luna Daemon test config\nport = {port}\nmonitor_port = {monitor_port}\nlock_port = {lock_port}\n'
            f'engine = "standalone"\n{extra}')


def _api_status(monitor_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/api/status", timeout=5) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ----------------------------------------------------------------------------- settings
def test_errors_name_file_line_key_and_suggest(tmp_path):
    cfg = _write(tmp_path / "config.toml", '# comment\n\nkeep_alive = "10 minutes"\nprot = 5\n')
    env = {"LUNA_HOME": str(tmp_path / "home")}
    with pytest.raises(SettingsError) as err:
        Settings.load(cfg, env=env)
    e = err.value
    assert (e.file, e.line, e.key) == (str(cfg), 3, "keep_alive")
    assert str(e).startswith(f"{cfg} line 3: keep_alive: ") and "'10 minutes'" in str(e)

    s = Settings.load(cfg, env=env, tolerant=True)
    assert [(p.key, p.line) for p in s.problems] == [("keep_alive", 3), ("prot", 4)]
    assert "did you mean 'port'?" in str(s.problems[1])
    assert s.keep_alive == Settings().keep_alive and s.sources["keep_alive"] == "default"

    # A syntax error (an unquoted value) names its line and key; the lines around it still count.
    _write(cfg, 'port = 12345\nkeep_alive = 10 minutes\nmonitor_port = 23456\n')
    s = Settings.load(cfg, env=env, tolerant=True)
    assert [(p.key, p.line) for p in s.problems] == [("keep_alive", 2)]
    assert "quotes" in str(s.problems[0])
    assert (s.port, s.monitor_port) == (12345, 23456)
    # A value that fails validation (not coercion) is located too.
    _write(cfg, '\nlog_level = "loud"\n')
    with pytest.raises(SettingsError) as err:
        Settings.load(cfg, env=env)
    assert (err.value.line, err.value.key) == (2, "log_level")


# ----------------------------------------------------------------------------- item 7: clients
def test_client_ignores_unrelated_bad_keys(daemon, monkeypatch):
    # The client finds the token through the settings of this install (LUNA_HOME); a
    # bad keep_alive there must not break status (ping, which needs no token, never did).
    home = Path(daemon.settings.config_dir).parent
    _write(Path(daemon.settings.config_file), 'keep_alive = "10 minutes"\n')
    monkeypatch.setenv("LUNA_HOME", str(home))
    with DaemonClient(*daemon.address, timeout=30) as c:
        assert c.ping()
        assert c.status()["state"] == "running"


def test_comfy_nodes_connection_ignores_unrelated_bad_keys(daemon, monkeypatch):
    """The nodes' own settings (config file + LUNA_*): only host, port and token matter."""
    from luna_daemon.comfy_nodes.connection import Connection

    home = Path(daemon.settings.config_dir).parent
    _write(Path(daemon.settings.config_file), f'port = {daemon.address[1]}\nkeep_alive = "10 minutes"\n')
    monkeypatch.setenv("LUNA_HOME", str(home))
    conn = Connection()
    try:
        assert conn.settings.port == daemon.address[1] and conn.settings.problems[0].key == "keep_alive"
        assert conn.client.status()["state"] == "running"
    finally:
        conn.close()


# ----------------------------------------------------------------------------- item 6: CLI
def test_cli_read_commands_stop_and_logs_survive_a_bad_config(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    port, mport, lport = free_port(), free_port(), free_port()
    cfg = home / "config" / "config.toml"
    _write(cfg, _config(port, mport, lport))
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_daemon("127.0.0.1", port, 60, proc=proc)
        _write(cfg, _config(port, mport, lport, 'keep_alive = "10 minutes"\n'))
        r = _cli(env, "logs", "--path")
        assert r.returncode == 0 and r.stdout == f"{home / 'logs' / 'luna-daemon.log'}\n", r
        assert f"{cfg} line 6: keep_alive" in r.stderr and "warning" in r.stderr
        r = _cli(env, "logs", "-n", "5")
        assert r.returncode == 0 and r.stdout.strip(), r
        r = _cli(env, "status", "--json")
        assert r.returncode == 0, r
        st = json.loads(r.stdout)  # stdout stays JSON: the warning is on stderr
        assert st["state"] == "running"
        # The running daemon saw the edit too, and kept its previous settings.
        wait_until(lambda: "keep_alive" in _api_status(mport)["config_error"], 10, "config_error in /api/status")
        r = _cli(env, "config")  # the command that checks a file stays strict
        assert r.returncode == 2 and f"{cfg} line 6: keep_alive" in r.stdout, r
        r = _cli(env, "stop")
        assert r.returncode == 0, r
        assert proc.wait(60) == 0  # it ran normally: the file broke after the start
    finally:
        _stop(proc)
    # Commands that change something still refuse a broken file (exit 2, file + line + key).
    r = _cli(env, "unload", "--all")
    assert r.returncode == 2 and f"{cfg} line 6: keep_alive" in r.stdout, r
    for p in (port, mport, lport):
        assert port_free(p)


def test_serve_with_bad_config_is_in_error_then_starts_when_fixed(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    port, mport, lport = free_port(), free_port(), free_port()
    cfg = home / "config" / "config.toml"
    _write(cfg, _config(port, mport, lport, 'keep_alive = "10 minutes"\n'))
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        st = wait_until(lambda: proc.poll() is None and _error_status(mport), 60, "a bad-config serve in state error")
        assert st["state"] == "error" and f"{cfg} line 6: keep_alive" in st["detail"]
        assert "keep_alive" in st["config_error"]
        log_text = (home / "logs" / "luna-daemon.log").read_text()
        assert f"{cfg} line 6: keep_alive" in log_text  # in the log file, not only on a screen
        assert not _listening(port)
        _write(cfg, _config(port, mport, lport, 'keep_alive = "10m"\n'))
        wait_for_daemon("127.0.0.1", port, 30, proc=proc)  # fixing the file starts it
        st = wait_until(lambda: (st := _api_status(mport))["state"] == "running" and st, 10, "state running")
        assert st["config_error"] == "" and st["restart_needed"] == []
    finally:
        _stop(proc)
        out = proc.stdout.read()
        proc.stdout.close()
    assert proc.returncode == 0, out


def test_serve_with_bad_config_that_never_is_fixed_exits_2(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    port, mport, lport = free_port(), free_port(), free_port()
    _write(home / "config" / "config.toml", _config(port, mport, lport, 'engine_typo = "x"\n'))
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        st = wait_until(lambda: proc.poll() is None and _error_status(mport), 60, "the dashboard in state error")
        assert "engine_typo: unknown setting (did you mean 'engine'?)" in st["detail"]
    finally:
        _stop(proc)
        proc.stdout.close()
    assert proc.returncode == 2


def test_serve_with_a_bad_environment_variable_exits_2_at_once(tmp_path):
    """No file edit can fix a bad LUNA_* variable: serve says so and exits 2 instead of
    waiting in error (a launcher or service manager would wait with it)."""
    home = tmp_path / "home"
    env = {**_env(home), "LUNA_QUEUE_SIZE": "many"}
    r = subprocess.run([sys.executable, "-m", "luna_daemon", "serve", "--no-monitor", "--port", str(free_port()),
                        "--lock-port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "queue_size" in r.stdout and "environment" in r.stdout, r.stdout

def _status_or_none(mport: int) -> dict | None:
    try:
        return _api_status(mport)
    except OSError:
        return None


def _error_status(mport: int) -> dict | None:
    st = _status_or_none(mport)
    return st if st and st["state"] == "error" else None


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ----------------------------------------------------------------------------- item 8: live edits
def test_edits_apply_live_or_say_restart_needed(tmp_path, model_dir):
    home = tmp_path / "home"
    env = _env(home)
    port, mport, lport = free_port(), free_port(), free_port()
    cfg = home / "config" / "config.toml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write(cfg, _config(port, mport, lport, f'model_roots = [{json.dumps(str(elsewhere))}]\n'))
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vae = str(model_dir / "vae_folder")
    try:
        wait_for_daemon("127.0.0.1", port, 60, proc=proc)
        r = _cli(env, "load", "vae", vae)
        assert r.returncode == 1 and "forbidden_path" in r.stdout and str(cfg) in r.stdout, r.stdout

        new_port = free_port()
        _write(cfg, _config(new_port, mport, lport, f'model_roots = [{json.dumps(str(model_dir))}]\n'
                                                    'keep_alive = "5m"\n'))
        st = wait_until(lambda: (st := _api_status(mport))["restart_needed"] and st, 10, "restart_needed in /api/status")
        assert st["restart_needed"] == ["port"] and st["state"] == "running" and st["port"] == port
        r = _cli(env, "status", "--port", str(port))
        assert r.returncode == 0 and "restart needed for: port" in r.stdout, r
        # model_roots and keep_alive applied without a restart: the load that was forbidden works,
        # with the new default keep_alive.
        r = _cli(env, "load", "vae", vae, "--port", str(port), "--json")
        assert r.returncode == 0, r.stdout
        ps = json.loads(_cli(env, "ps", "--port", str(port), "--json").stdout)
        assert [m["keep_alive"] for m in ps] == [300.0]

        # Editing port back to the running value clears restart_needed.
        _write(cfg, _config(port, mport, lport, f'model_roots = [{json.dumps(str(model_dir))}]\nkeep_alive = "5m"\n'))
        wait_until(lambda: _api_status(mport)["restart_needed"] == [], 10, "restart_needed cleared")
        r = _cli(env, "stop", "--port", str(port))
        assert r.returncode == 0, r
        assert proc.wait(60) == 0
    finally:
        _stop(proc)
    for p in (port, mport, lport):
        assert port_free(p)


def test_restart_applies_waiting_keys(make_settings, tmp_path):
    """In one host: an edited daemon key waits while running, applies at the next start."""
    from luna_daemon.host import Host

    s = make_settings()
    cfg = Path(s.config_file)
    h = Host(Settings.load(cfg, env={"LUNA_HOME": str(tmp_path / "home")},
                           overrides={"port": 0, "monitor_port": 0, "lock_port": 0, "engine": "standalone"}),
             log_to_stderr=False)
    seen = []
    h.events.subscribe(lambda e: seen.append(e.data) if e.type == "config" else None)
    try:
        h.acquire()
        h.daemon.start()
        _write(cfg, 'queue_size = 3\nnotifications = false\nlog_level = "DEBUG"\n')
        wait_until(lambda: h.config_status()["restart_needed"] == ["queue_size"], 10, "queue_size waiting")
        assert h.settings.notifications is False and h.settings.queue_size == 16  # live / waiting
        assert logging.getLogger("luna_daemon").level == logging.DEBUG
        assert h.daemon.snapshot()["restart_needed"] == ["queue_size"] and seen
        h.daemon.stop(10)
        h.daemon.start()
        assert h.settings.queue_size == 3 and h.config_status()["restart_needed"] == []
        # A bad edit changes nothing and says why.
        _write(cfg, 'queue_size = 3\nnotifications = maybe\nlog_level = "DEBUG"\n')
        wait_until(lambda: h.config_status()["config_error"], 10, "config_error")
        assert "line 2: notifications" in h.config_status()["config_error"] and h.settings.notifications is False
    finally:
        h.close(10)


# ----------------------------------------------------------------------------- tray
def test_tray_status_line_says_restart_needed():
    from luna_daemon.tray.menu import HEALTHY, TrayState, build_view

    base = TrayState(daemon="running", health=HEALTHY, models=1, clients=2, memory_bytes=10**9)
    assert "restart needed" not in build_view(base).status
    view = build_view(base.with_(restart_needed=("port", "engine")))
    assert view.status.endswith("· restart needed") and view.colour == "green"
    assert "restart needed (port, engine)" in view.title and "restart needed (port, engine)" in view.detail
    # Red with the reason wins over the hint (the reason is what to fix first).
    assert "restart needed" not in build_view(base.with_(daemon="error", detail="x", restart_needed=("port",))).status


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_real_tray_with_a_bad_config_is_red_and_names_file_line_key(xs, real_tray, tmp_path):  # noqa: F811
    # RealTray's LUNA_HOME for the first tray of this test is tmp_path/tray0/luna.
    cfg = _write(tmp_path / "tray0" / "luna" / "config" / "config.toml", '# typo below\nport = "abc"\nkep_alive = "5m"\n')
    n0 = len(xs.notifications())
    tray = real_tray(autostart_delay="0")
    tray.wait_docked(30)
    tray.wait_colour("red", 30)
    note = _notified(xs, n0, lambda n: "line 2: port" in n["body"], 20, "a notification naming the bad key")
    assert str(cfg) in note["body"] and "did you mean 'keep_alive'?" in note["body"], note
    shot(xs, "config-bad-red")
    log_text = tray.log.read_text()
    assert f"{cfg} line 2: port: expected an integer" in log_text
    assert f"{cfg} line 3: kep_alive: unknown setting (did you mean 'keep_alive'?)" in log_text
    # Fixing the file starts the daemon: green without touching the tray.
    _write(cfg, "# fixed\n")
    tray.wait_colour("green", 40)
    tray.proc.terminate()
    assert tray.proc.wait(60) == 0
    for p in (tray.port, tray.monitor_port, tray.lock_port):
        assert port_free(p)


@pytest.mark.skipif(sys.platform == "win32", reason="the POSIX launcher")
def test_launcher_prints_the_log_path_with_a_bad_config(tmp_path):
    """start_tray_daemon.sh used to print the settings error as "logs: invalid setting: ..."."""
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this interpreter, as the launcher's venv
    py.chmod(0o755)
    stamp = subprocess.run(  # the launcher's own stamp formula: no reinstall
        [sys.executable, "-c", ("import hashlib,sys;h=hashlib.sha256(open(sys.argv[1],'rb').read());"
                                "h.update(('\\0'+sys.argv[2]+'\\0'+sys.argv[3]).encode());print(h.hexdigest())"),
         str(root / "pyproject.toml"), "torch==2.13.0", str(root)], capture_output=True, text=True, check=True).stdout
    (venv / ".luna-install-stamp").write_text(stamp)
    home = tmp_path / "home"
    port, mport, lport = free_port(), free_port(), free_port()
    _write(home / "config" / "config.toml", _config(port, mport, lport, 'port = "abc"\n').replace(f"port = {port}\n", ""))
    env = {k: v for k, v in _env(home).items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(LUNA_VENV=str(venv), LUNA_TORCH_SPEC="torch==2.13.0")
    proc = subprocess.Popen(["bash", str(root / "start_tray_daemon.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("luna: logs:"):
                break
        assert lines and lines[-1] == f"luna: logs: {home / 'logs' / 'luna-daemon.log'}\n", lines
        wait_until(lambda: _error_status(mport), 60, "the foreground serve in state error")
    finally:
        _stop(proc)
        proc.stdout.close()
