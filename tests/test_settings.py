"""Settings: precedence, sources, parsing, validation, token file, ComfyUI detection."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from luna_daemon.settings import FOREVER, Settings, SettingsError, load_or_create_token, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[1]


def test_precedence_and_sources(tmp_path):
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text('port = 20000\nmonitor_port = 20001\nkeep_alive = "5m"\nmax_model_bytes = {cpu = "2GiB"}\n')
    env = {"LUNA_HOME": str(home), "LUNA_MONITOR_PORT": "20002", "LUNA_UNRELATED_THING": "x"}
    s = Settings.load(env=env, overrides={"lock_port": 20003, "host": None})
    assert (s.port, s.monitor_port, s.lock_port, s.host) == (20000, 20002, 20003, "127.0.0.1")
    assert s.sources["port"] == "file" and s.sources["monitor_port"] == "env" and s.sources["lock_port"] == "flag"
    assert s.sources["host"] == "default" and s.sources["config_dir"] == "env"
    assert s.keep_alive == 300 and s.max_model_bytes == {"cpu": 2 * 1024**3}
    assert Path(s.config_dir) == home / "config" and Path(s.log_dir) == home / "logs"
    assert s.log_file.parent == home / "logs" and s.token_path.parent == home / "config"


@pytest.mark.parametrize("content, key", [
    ("no_such_key = 1\n", "no_such_key"),
    ('port = "abc"\n', "port"),
    ("port = 70000\n", "port"),
    ('engine = "magic"\n', "engine"),
    ('vae_device = "gpu0"\n', "vae_device"),
    ('lora_cache_bytes = "lots"\n', "lora_cache_bytes"),
    ("this is not toml", "config_file"),
])
def test_bad_file_values_name_the_key(tmp_path, content, key):
    f = tmp_path / "c.toml"
    f.write_text(content)
    with pytest.raises(SettingsError) as ei:
        Settings.load(f, env={"LUNA_HOME": str(tmp_path)})
    assert ei.value.key == key


def test_parsers():
    assert parse_size("512MB") == 512_000_000 and parse_size("1GiB") == 1024**3 and parse_size(10) == 10
    assert parse_duration("forever") == FOREVER and parse_duration(-1) == FOREVER and parse_duration("1.5m") == 90
    for bad in ("12 parsecs", True, "-3GB"):
        with pytest.raises(SettingsError):
            parse_size(bad)


def test_env_lists(tmp_path):
    s = Settings.load(env={"LUNA_HOME": str(tmp_path), "LUNA_MODEL_ROOTS": f"/a{os.pathsep}/b", "LUNA_PRELOAD": '["vae:x"]'})
    assert s.model_roots == ["/a", "/b"] and s.preload == ["vae:x"]


def test_env_size_table(tmp_path):
    env = {"LUNA_HOME": str(tmp_path)}
    s = Settings.load(env={**env, "LUNA_MAX_MODEL_BYTES": "cuda:0=8GiB, cpu=16GiB"})
    assert s.max_model_bytes == {"cuda:0": 8 * 1024**3, "cpu": 16 * 1024**3}
    assert Settings.load(env={**env, "LUNA_MAX_MODEL_BYTES": "cpu=1GiB\ncuda:0=2GiB"}).max_model_bytes == {
        "cpu": 1024**3, "cuda:0": 2 * 1024**3}
    # A part that is not device=size is an error naming the key, never silently dropped.
    for bad in ("cuda:0", "cpu=1GiB, =2GiB", "cpu="):
        with pytest.raises(SettingsError) as ei:
            Settings.load(env={**env, "LUNA_MAX_MODEL_BYTES": bad})
        assert ei.value.key == "max_model_bytes", bad


def test_token_created_once_with_mode_0600(tmp_path):
    s = Settings.load(env={"LUNA_HOME": str(tmp_path)})
    t1 = load_or_create_token(s)
    t2 = load_or_create_token(s)
    assert t1 == t2 and len(t1) >= 32
    if os.name == "posix":
        assert stat.S_IMODE(s.token_path.stat().st_mode) == 0o600


def test_comfyui_root_and_model_roots(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "sd.py").write_text("")
    s = Settings.load(env={"LUNA_HOME": str(tmp_path)}, overrides={"comfyui_root": str(comfy), "model_roots": [str(tmp_path / "m")]})
    assert s.comfyui_path() == comfy.resolve()
    assert s.resolved_model_roots() == [(tmp_path / "m").resolve(), (comfy / "models").resolve()]


def test_comfyui_detected_from_custom_nodes_checkout(tmp_path):
    """A checkout in ComfyUI/custom_nodes/<repo> finds ComfyUI and its models folder."""
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "sd.py").write_text("")
    (comfy / "custom_nodes").mkdir()
    link = comfy / "custom_nodes" / "luna-daemon"
    link.mkdir()
    shutil.copytree(REPO / "luna_daemon", link / "luna_daemon", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys; sys.path.insert(0, sys.argv[1]);"
             "from luna_daemon.settings import Settings;"
             "s = Settings.load(env={'LUNA_HOME': sys.argv[2]});"
             "print(s.comfyui_path()); print(s.resolved_model_roots())")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    out = subprocess.run([sys.executable, "-c", probe, str(link), str(tmp_path / "h")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(comfy.resolve())
    assert str((comfy / "models").resolve()) in lines[1]
