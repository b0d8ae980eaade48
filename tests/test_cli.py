"""The luna-daemon command line, run as real processes against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port
from luna_daemon.client import DaemonClient, wait_for_daemon


def _env(tmp_path, model_dir, **extra):
    env = dict(os.environ, LUNA_HOME=str(tmp_path / "home"), LUNA_PORT=str(free_port()), LUNA_MONITOR_PORT=str(free_port()),
               LUNA_LOCK_PORT=str(free_port()), LUNA_MODEL_ROOTS=json.dumps([str(model_dir)]), LUNA_ENGINE="standalone",
               HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _cli(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "luna_daemon", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def served(tmp_path, model_dir):
    env = _env(tmp_path, model_dir)
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_daemon("127.0.0.1", int(env["LUNA_PORT"]), 60, proc=proc)
    yield env, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def test_serve_status_ps_unload_stop(served, model_dir):
    env, proc = served
    st = _cli(env, "status", "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    status = json.loads(st.stdout)
    assert status["state"] == "running" and status["engine"] == "standalone"
    human = _cli(env, "status")
    assert "running" in human.stdout and "uptime" in human.stdout
    with DaemonClient("127.0.0.1", int(env["LUNA_PORT"]), token=open(os.path.join(env["LUNA_HOME"], "config", "token")).read()) as c:
        mid = c.vae_load(str(model_dir / "vae_folder"))["model"]
    ps = json.loads(_cli(env, "ps", "--json").stdout)
    assert [m["id"] for m in ps] == [mid]
    assert mid in _cli(env, "ps").stdout
    assert _cli(env, "unload").returncode == 2  # neither a model nor --all
    un = _cli(env, "unload", mid, "--json")
    assert un.returncode == 0 and json.loads(un.stdout)[0]["id"] == mid
    bad = _cli(env, "unload", "vae-nope")
    assert bad.returncode == 1 and "not_found" in bad.stdout
    # A second serve on this machine (same lock port) is refused.
    second = _cli(env, "serve", timeout=60)
    assert second.returncode != 0 and "Luna Daemon is already running!" in second.stdout
    stop = _cli(env, "stop")
    assert stop.returncode == 0
    assert proc.wait(60) == 0  # the headless host ends once the daemon stopped
    assert _cli(env, "status").returncode == 3  # unreachable


def test_sigterm_is_a_clean_stop(served):
    env, proc = served
    proc.terminate()
    assert proc.wait(60) == 0
    err = proc.stderr.read()
    assert "daemon stopped" in err and "Traceback" not in err


def test_config_show_sources(tmp_path, model_dir):
    env = _env(tmp_path, model_dir, LUNA_KEEP_ALIVE="10m")
    cfg_dir = tmp_path / "home" / "config"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "config.toml").write_text('queue_size = 7\n')
    out = _cli(env, "config", "--show", "--json", "--host", "127.0.0.1")
    assert out.returncode == 0, out.stdout
    data = json.loads(out.stdout)["settings"]
    assert data["queue_size"] == {"value": 7, "source": "file"}
    assert data["keep_alive"] == {"value": 600.0, "source": "env"}
    assert data["host"]["source"] == "flag" and data["max_connections"]["source"] == "default"
    (cfg_dir / "config.toml").write_text('queue_size = "many"\n')
    bad = _cli(env, "config", "--show")
    assert bad.returncode == 2 and "queue_size" in bad.stdout


def test_status_without_daemon_says_how_to_start(tmp_path, model_dir):
    out = _cli(_env(tmp_path, model_dir), "status")
    assert out.returncode == 3 and "luna-daemon serve" in out.stdout


def test_demo_runs_offline(tmp_path, model_dir):
    out = _cli(_env(tmp_path, model_dir), "demo", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "results equal the same calls in-process: yes" in out.stdout and "demo OK" in out.stdout
