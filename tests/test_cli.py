"""The luna-daemon command line, run as real processes against a real daemon."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, serve_env
from luna_daemon.client import DaemonClient, wait_for_daemon


def _env(tmp_path, model_dir, **extra):
    return serve_env(tmp_path / "home", model_dir, **extra)


def _cli(env, *args, timeout=120, cwd=None):
    return subprocess.run([sys.executable, "-m", "luna_daemon", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# A program that is not Luna Daemon, holding a port: "silent" accepts and never answers,
# "garbage" answers with an HTTP error, "close" hangs up at once. Its command line must not
# mention the package (the CLI would take it for a wedged Luna process).
_FOREIGN = r"""
import socket, sys
mode, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket()
ls.bind(("127.0.0.1", port))
ls.listen(64)
print("ready", flush=True)
held = []
while True:
    c, _ = ls.accept()
    if mode == "close":
        c.close()
        continue
    if mode == "garbage":
        c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)
    held.append(c)
"""


@contextlib.contextmanager
def foreign_listener(mode: str, port: int):
    """A real process listening on ``port`` (see _FOREIGN); yields its Popen."""
    proc = subprocess.Popen([sys.executable, "-c", _FOREIGN, mode, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


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


def _rows(stdout: str, check: str) -> list[dict]:
    return [r for r in json.loads(stdout) if r["check"] == check]


def _lines_with(stdout: str, text: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if text in ln]


# ------------------------------------------------------------------ a foreign program on the daemon port
@pytest.mark.parametrize("mode,commands", [
    ("silent", [["status"], ["stop"], ["ps"], ["unload", "--all"], ["load", "vae", "x.safetensors"]]),
    ("garbage", [["status"], ["stop"]]),
    ("close", [["status"]]),
])
def test_daemon_commands_name_a_foreign_program_on_the_port(tmp_path, model_dir, mode, commands):
    env = _env(tmp_path, model_dir)
    with foreign_listener(mode, int(env["LUNA_PORT"])) as holder:
        for args in commands:
            # The subprocess timeout is the bound: before, status waited client_timeout (120 s)
            # and stop / ps printed nothing for 30 s+; now the hello deadline is 3 s.
            r = _cli(env, *args, timeout=25)
            assert r.returncode == 3, (args, r.stdout, r.stderr)  # unreachable, as the README says
            assert f"(pid {holder.pid})" in r.stdout and "which is not a Luna daemon" in r.stdout, (args, r.stdout)
            assert "'port' (config.toml, LUNA_PORT or --port)" in r.stdout  # what to do
            assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_hung_luna_daemon_is_named_as_luna_not_as_foreign(served):
    env, proc = served
    proc.send_signal(signal.SIGSTOP)  # the kernel still accepts connections; nothing answers
    try:
        r = _cli(env, "status", timeout=25)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"the Luna Daemon process on 127.0.0.1:{env['LUNA_PORT']} (" in r.stdout and f"(pid {proc.pid})" in r.stdout
    assert "did not answer within 3 s: it may be overloaded or hung" in r.stdout and "not a Luna daemon" not in r.stdout
    assert _cli(env, "status").returncode == 0  # and once it runs again, it answers


# ------------------------------------------------------------------ a foreign program on the lock port
@pytest.mark.parametrize("launch,mode", [("serve", "silent"), ("serve", "garbage"), ("tray_app.py", "garbage")])
def test_launch_names_a_foreign_program_on_the_lock_port(tmp_path, model_dir, launch, mode):
    env = _env(tmp_path, model_dir)
    env.pop("DISPLAY", None)
    lock_port = int(env["LUNA_LOCK_PORT"])
    argv = ([sys.executable, "-m", "luna_daemon", "serve"] if launch == "serve"
            else [sys.executable, str(Path(__file__).resolve().parents[1] / "luna_daemon" / "tray_app.py")])
    with foreign_listener(mode, lock_port) as holder:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"port {lock_port} (lock_port) is held by "), r.stdout
    assert last.endswith(f"(pid {holder.pid}), not Luna Daemon: stop it or set lock_port "
                         "(config.toml, LUNA_LOCK_PORT or --lock-port)"), last
    assert "already running" not in r.stdout
    assert last in (tmp_path / "home" / "logs" / "luna-daemon.log").read_text()  # the same text is logged
    with pytest.raises(OSError):  # it stopped before starting anything
        socket.create_connection(("127.0.0.1", int(env["LUNA_PORT"])), timeout=1).close()


# ------------------------------------------------------------------ load
def test_load_warms_the_daemon(served, model_dir):
    env, _proc = served
    r = _cli(env, "load", "vae", str(model_dir / "vae_folder"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    vae = json.loads(r.stdout)
    assert vae["kind"] == "vae" and vae["device"] == "cpu" and vae["bytes"] > 0
    assert vae["paths"] == [str((model_dir / "vae_folder").resolve())]
    # A path relative to the caller's directory, as typed in a shell (relative to the model
    # root it would not exist), and the human answer: id, device, dtype, size, keep_alive.
    r = _cli(env, "load", "clip", f"{model_dir.name}/clip_l", "--type", "sd1", "--dtype", "fp32", "--keep-alive", "5m",
             cwd=model_dir.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.stdout.splitlines()[0].split()
    assert first[0] == "loaded" and first[2:5] == ["clip", "on", "cpu"] and "(fp32)," in first and "keep_alive 5 min" in r.stdout
    clip_id = first[1]
    ps = json.loads(_cli(env, "ps", "--json").stdout)
    assert {m["id"]: m["keep_alive"] for m in ps} == {vae["model"]: -1.0, clip_id: 300.0}
    assert _cli(env, "load", "vae", "a", "b").returncode == 2
    assert _cli(env, "load", "vae", "a", "--type", "sdxl").returncode == 2
    bad = _cli(env, "load", "vae", "/nonexistent/vae.safetensors")
    assert bad.returncode == 1 and "forbidden_path" in bad.stdout, bad.stdout


# ------------------------------------------------------------------ doctor
def test_doctor_fails_and_names_foreign_holders(tmp_path, model_dir):
    env = _env(tmp_path, model_dir)
    with foreign_listener("silent", int(env["LUNA_PORT"])) as d, foreign_listener("garbage", int(env["LUNA_LOCK_PORT"])) as lk:
        r = _cli(env, "doctor", "--json", "--no-devices", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    [daemon] = _rows(r.stdout, "daemon port")
    assert daemon["status"] == "fail" and f"(pid {d.pid})" in daemon["finding"] and "LUNA_PORT" in daemon["fix"]
    [lock] = _rows(r.stdout, "lock")
    assert lock["status"] == "fail" and f"(pid {lk.pid})" in lock["finding"] and "LUNA_LOCK_PORT" in lock["fix"]
    assert not _rows(r.stdout, "devices")  # --no-devices
    assert _rows(r.stdout, "model roots")[0]["status"] == "ok"


def test_doctor_on_a_running_install(served, model_dir):
    env, proc = served
    r = _cli(env, "doctor", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert _lines_with(out, "[ok  ] daemon port: Luna Daemon 0.1.0 answers on port")
    assert _lines_with(out, f"[ok  ] lock: port {env['LUNA_LOCK_PORT']} (lock_port) is held by Luna Daemon 0.1.0 (pid {proc.pid})")
    assert _lines_with(out, f"dashboard of the Luna host (pid {proc.pid})")
    assert _lines_with(out, "[ok  ] token:") and _lines_with(out, "accepted by the daemon")
    assert _lines_with(out, "[ok  ] engine: engine = standalone: standalone")
    assert _lines_with(out, "[ok  ] devices: vae_device = auto -> ")
    assert _lines_with(out, f"[ok  ] model roots: {model_dir.resolve()}")
    assert out.rstrip().endswith("0 problem(s), 0 warning(s)")


def test_doctor_config_comfyui_token_and_roots(tmp_path, model_dir):
    # A ComfyUI folder whose comfy package does not import (no comfy/options.py).
    comfy = tmp_path / "ComfyUI" / "comfy"
    comfy.mkdir(parents=True)
    (comfy / "__init__.py").write_text("")
    (comfy / "sd.py").write_text("")
    (comfy.parent / "models").mkdir()
    missing = tmp_path / "no-such-models"
    env = _env(tmp_path, model_dir, LUNA_COMFYUI_ROOT=str(comfy.parent), LUNA_MODEL_ROOTS=json.dumps([str(model_dir), str(missing)]))
    token = tmp_path / "home" / "config" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("t0ken")
    token.chmod(0o644)
    r = _cli(env, "doctor", "--json", "--no-devices", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr  # warnings only
    [cf] = _rows(r.stdout, "ComfyUI")
    assert cf["status"] == "warn" and str(comfy.parent) in cf["finding"] and "requirements.txt" in cf["fix"]
    assert _rows(r.stdout, "token")[0] == {"check": "token", "status": "warn", "finding": f"{token} is readable by other users (mode 644)",
                                           "fix": f"chmod 600 {token}"}
    roots = {row["finding"]: row["status"] for row in _rows(r.stdout, "model roots")}
    assert roots == {str(model_dir.resolve()): "ok", f"{missing} does not exist": "warn", str(comfy.parent / "models"): "ok"}
    # engine = comfy with that ComfyUI, and a config file that does not parse: both fail.
    (token.parent / "config.toml").write_text('queue_size = "many"\n')
    r = _cli(dict(env, LUNA_ENGINE="comfy"), "doctor", "--json", "--no-devices", timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    [cfg] = _rows(r.stdout, "config")
    assert cfg["status"] == "fail" and "queue_size" in cfg["finding"] and "config.toml" in cfg["finding"]
    assert cfg["finding"].count("config.toml") == 1, cfg["finding"]  # the file named once
    assert _rows(r.stdout, "ComfyUI")[0]["status"] == "fail"  # the other checks still ran, with the env settings
    assert _rows(r.stdout, "engine")[0]["status"] == "fail"


def test_doctor_never_opens_a_fifo_token(tmp_path, model_dir):
    token = tmp_path / "home" / "config" / "token"
    token.parent.mkdir(parents=True)
    os.mkfifo(token)  # opening it for reading would wait for a writer forever
    r = _cli(_env(tmp_path, model_dir), "doctor", "--json", "--no-devices", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    [row] = _rows(r.stdout, "token")
    assert row["status"] == "fail" and str(token) in row["finding"] and "delete it" in row["fix"]


# ------------------------------------------------------------------ start-up cost
_PROBE = """
import sys
from luna_daemon.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:  # --version, --help
    rc = exc.code
sys.stdout.write("\\nTORCH=%s\\n" % ("torch" in sys.modules))
sys.exit(rc)
"""


def test_light_commands_do_not_import_torch(served, model_dir, tmp_path):
    env, proc = served
    down = dict(env, LUNA_PORT=str(free_port()))
    runs = [(env, ["--version"], 0), (env, ["--help"], 0), (env, ["config", "--show"], 0), (env, ["logs"], 0),
            (down, ["status"], 3), (env, ["status"], 0), (env, ["ps"], 0), (env, ["status", "--instance", "main"], 0),
            (env, ["ps", "--instance", "nope"], 2),
            (env, ["load", "vae", str(model_dir / "vae_folder")], 0), (env, ["unload", "--all"], 0),
            (env, ["doctor", "--no-devices"], 0), (env, ["dashboard", "--no-open", "--json"], 0), (env, ["stop"], 0)]
    for run_env, args, rc in runs:
        r = subprocess.run([sys.executable, "-c", _PROBE, *args], env=run_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == rc, (args, r.stdout, r.stderr)
        assert r.stdout.rstrip().endswith("TORCH=False"), (args, "imported torch")
    assert proc.wait(60) == 0


def test_bench_cli_times_every_light_command():
    r = _cli(dict(os.environ), "bench", "--cli", "--repeats", "1", "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert set(rep["results"]) == {"python -c pass (floor)", "--version", "--help", "status (daemon running)",
                                   "status (nothing on the port)", "ps", "config --show"}
    assert all(v["median_s"] > 0 for v in rep["results"].values())
    assert rep["results"]["--version"]["target_s"] == 0.3 and rep["results"]["status (daemon running)"]["target_s"] == 0.5


# ------------------------------------------------------------------ several instances ([[instances]])
def _two_instances(env: dict, vae_port: int) -> None:
    """config.toml of the original Luna layout: clip (the primary, on LUNA_PORT) + vae."""
    cfg = Path(env["LUNA_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'[[instances]]\nname = "clip"\nservice = "clip"\n\n'
                   f'[[instances]]\nname = "vae"\nservice = "vae"\nport = {vae_port}\n', encoding="utf-8")


@contextlib.contextmanager
def serve_two(tmp_path, model_dir, vae_port: int | None = None):
    """A real ``serve`` host with a clip and a vae instance; yields (env, proc, vae_port).
    Given ``vae_port`` (held by someone else), it does not wait for the vae instance."""
    env = _env(tmp_path, model_dir)
    wait_vae = vae_port is None
    vae_port = vae_port or free_port()
    _two_instances(env, vae_port)
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve", "--no-monitor"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_daemon("127.0.0.1", int(env["LUNA_PORT"]), 90, proc=proc)
        if wait_vae:
            wait_for_daemon("127.0.0.1", vae_port, 90, proc=proc)
        yield env, proc, vae_port
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        proc.stderr.close()


def _probe_torch(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, timeout=120)


def test_instances_status_ps_load_unload_stop(tmp_path, model_dir):
    with serve_two(tmp_path, model_dir) as (env, proc, vae_port):
        clip_port = int(env["LUNA_PORT"])
        st = _cli(env, "status", "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        status = json.loads(st.stdout)
        assert [(b["name"], b["service"], b["port"], b["state"], b["primary"]) for b in status["instances"]] == [
            ("clip", "clip", clip_port, "running", True), ("vae", "vae", vae_port, "running", False)]
        assert status["state"] == "running" and status["instances"][1]["status"]["service"] == "vae"
        human = _cli(env, "status").stdout
        assert _lines_with(human, "[clip] running") and _lines_with(human, f"[vae] running  127.0.0.1:{vae_port}"), human
        # load routes by kind; --instance forces one (the daemon then refuses what it does not serve).
        vae = json.loads(_cli(env, "load", "vae", str(model_dir / "vae_folder"), "--json").stdout)
        clip = json.loads(_cli(env, "load", "clip", str(model_dir / "clip_l"), "--json").stdout)
        assert (vae["instance"], vae["kind"], clip["instance"], clip["kind"]) == ("vae", "vae", "clip", "clip")
        wrong = _cli(env, "load", "vae", str(model_dir / "vae_file"), "--instance", "clip")
        assert wrong.returncode == 1 and "wrong_instance" in wrong.stdout and "'vae'" in wrong.stdout, wrong.stdout
        ps = json.loads(_cli(env, "ps", "--json").stdout)
        assert {m["id"]: m["instance"] for m in ps} == {clip["model"]: "clip", vae["model"]: "vae"}
        only = json.loads(_cli(env, "ps", "--json", "--instance", "vae").stdout)
        assert [m["id"] for m in only] == [vae["model"]]
        human = _cli(env, "ps").stdout
        assert _lines_with(human, "[clip] 127.0.0.1") and _lines_with(human, vae["model"]), human
        unknown = _cli(env, "status", "--instance", "nope")
        assert unknown.returncode == 2 and "no instance named 'nope'; configured: clip, vae" in unknown.stdout
        assert "Traceback" not in unknown.stderr
        for args in (["status"], ["ps"], ["ps", "--instance", "vae"]):  # still torch-free with several instances
            r = _probe_torch(env, *args)
            assert r.returncode == 0 and r.stdout.rstrip().endswith("TORCH=False"), (args, r.stdout, r.stderr)
        # unload without --instance looks on every instance.
        un = _cli(env, "unload", vae["model"], "--json")
        assert un.returncode == 0 and [(d["id"], d["instance"]) for d in json.loads(un.stdout)] == [(vae["model"], "vae")]
        assert _cli(env, "unload", vae["model"]).returncode == 1  # gone everywhere: not_found
        un = _cli(env, "unload", "--all", "--json")
        assert [(d["id"], d["instance"]) for d in json.loads(un.stdout)] == [(clip["model"], "clip")]
        # stop --instance: that one only (the host keeps it stopped, the primary serves on).
        one = _cli(env, "stop", "--instance", "vae")
        assert one.returncode == 0 and "instance vae" in one.stdout, one.stdout
        deadline = time.monotonic() + 60
        # Until the host has seen the child exit, it is down as "not answering"; then the
        # host's reason: stopped on purpose (not restarted).
        while not any(" — stopped" in ln for ln in _lines_with(_cli(env, "status").stdout, "[vae] down")):
            assert time.monotonic() < deadline, "the vae instance did not stop"
            time.sleep(0.5)
        assert _cli(env, "status", "--instance", "clip").returncode == 0
        # stop ends the host and so every instance.
        stop = _cli(env, "stop")
        assert stop.returncode == 0 and "instances clip, vae" in stop.stdout, stop.stdout
        assert proc.wait(90) == 0
        for port in (clip_port, vae_port):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_down_instance_is_a_line_with_its_reason(tmp_path, model_dir):
    """The vae instance's port is held by a foreign program: its child cannot start. status /
    ps show it as down with the host's reason (no traceback), doctor names the holder."""
    vae_port = free_port()
    with foreign_listener("silent", vae_port) as holder, serve_two(tmp_path, model_dir, vae_port) as (env, proc, _):
        token = (Path(env["LUNA_HOME"]) / "config" / "token").read_text().strip()
        with DaemonClient("127.0.0.1", int(env["LUNA_PORT"]), token=token, timeout=10) as c:
            deadline = time.monotonic() + 120
            while next(e for e in c.hello()["instances"] if e["name"] == "vae")["state"] != "error":
                assert time.monotonic() < deadline, "the vae instance never reported its failure"
                time.sleep(0.5)
        st = _cli(env, "status")
        assert st.returncode == 0 and "Traceback" not in st.stderr, st.stdout + st.stderr
        [line] = _lines_with(st.stdout, "[vae] down")
        # The host's own reason (its hello map's detail), not only "connection refused".
        reason = line.split(" — ", 1)[1]
        assert f"127.0.0.1:{vae_port}" in line and re.match(r"(error|starting): \S", reason), line
        assert _lines_with(st.stdout, "[clip] running")
        blocks = json.loads(_cli(env, "status", "--json").stdout)["instances"]
        assert blocks[1]["name"] == "vae" and blocks[1]["down"] and "status" not in blocks[1]
        one = _cli(env, "status", "--instance", "vae")
        assert one.returncode == 3 and "[vae] down" in one.stdout and "Traceback" not in one.stderr
        ps = _cli(env, "ps")
        assert ps.returncode == 0 and _lines_with(ps.stdout, "[vae] down"), ps.stdout
        load = _cli(env, "load", "vae", str(model_dir / "vae_folder"))
        assert load.returncode == 3 and "[vae] down" in load.stdout, load.stdout
        dr = _cli(env, "doctor", "--json", "--no-devices", timeout=120)
        [row] = _rows(dr.stdout, "instance")
        assert row["status"] == "fail" and f"(pid {holder.pid})" in row["finding"] and row["finding"].startswith("vae")
        assert "[[instances]] table named 'vae'" in row["fix"]
        assert _rows(dr.stdout, "daemon port")[0]["status"] == "ok" and dr.returncode == 1
        proc.terminate()
        assert proc.wait(90) == 0  # the host ends cleanly with a child that never started


def test_cli_module_keeps_every_name_it_had_before_the_split():
    """cli.py was split into cli_*.py modules; what callers import from luna_daemon.cli
    (entry points, the tray, tests, scripts) must stay importable from there."""
    import luna_daemon.cli as cli

    names = ["main", "tray_entry", "build_parser", "can_open_browser", "UsageError", "_out", "_json",
             "EXIT_OK", "EXIT_FAIL", "EXIT_USAGE", "EXIT_UNAVAILABLE", "EXIT_UNCLEAN",
             "cmd_serve", "cmd_tray", "cmd_status", "cmd_ps", "cmd_unload", "cmd_load", "cmd_stop",
             "cmd_config", "cmd_logs", "cmd_dashboard", "cmd_doctor", "cmd_demo", "cmd_service", "cmd_bench"]
    missing = [n for n in names if not hasattr(cli, n)]
    assert not missing, missing
