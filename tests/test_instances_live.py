"""Live config edits reach every instance: the primary (the host's own Daemon) and each
further one, a real ``serve --instance NAME`` child process that watches the file itself.

Real in-process Host, real child process, real sockets, real config-file edits (replaced
as editors do). What a child applies is read back through its own answers: the
``keep_alive`` of a model it loads, the model roots and ``restart_needed`` /
``config_error`` of its ``status``; its pid shows it was never restarted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import free_port
from test_instances_host import START, _luna_children
from tray_helpers import wait_until

from luna_daemon.client import DaemonClient
from luna_daemon.config_watch import split_changes, split_instance_changes
from luna_daemon.host import Host
from luna_daemon.instances import instance_specs
from luna_daemon.settings import Settings

LIVE_WAIT = 15.0  # one poll (0.5 s) + one stable poll + a reload, on 2 busy CPUs: generous


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # as editors do: a new inode


def _config(roots: list[Path], main_port: int, vae_port: int, *, keep_alive: str, vae_table: str = "",
            top: str = "") -> str:
    return (f"model_roots = {json.dumps([str(r) for r in roots])}\nengine = \"standalone\"\n"
            f"keep_alive = \"{keep_alive}\"\n{top}"
            f"[[instances]]\nname = \"main\"\nservice = \"full\"\nport = {main_port}\n"
            f"[[instances]]\nname = \"vae\"\nservice = \"vae\"\nport = {vae_port}\n{vae_table}")


def _client(port: int, token: str, name: str) -> DaemonClient:
    return DaemonClient("127.0.0.1", port, token=token, timeout=60, connect_timeout=5, instance=name)


def _fresh_keep_alive(port: int, token: str, name: str, vae: str) -> float:
    """The keep_alive instance ``name`` gives a model loaded now without one (its default)."""
    with _client(port, token, name) as c:
        c.unload(all=True)  # a reused model keeps the keep_alive it was loaded with
        c.vae_load(vae)
        (model,) = c.ps()
        c.unload(all=True)
    return model["keep_alive"]


def _status(port: int, token: str, name: str) -> dict:
    with _client(port, token, name) as c:
        return c.status()


def test_table_edits_of_live_keys_apply_and_others_wait(tmp_path, model_dir):
    env = {"LUNA_HOME": str(tmp_path / "home")}
    cfg = tmp_path / "config.toml"

    def load(**kw) -> Settings:
        _write(cfg, _config([model_dir], 20001, 20002, **kw))
        s = Settings.load(cfg, env=env)
        assert not s.problems, s.problems
        return s

    old = load(keep_alive="10m")
    primary, child = (spec.settings for spec in instance_specs(old))
    new = load(keep_alive="10m", vae_table='keep_alive = "5m"\n')
    # The host: only LIVE keys of a table changed -> applied (no restart); the child: its key.
    assert split_changes(old, new, True) == ({"instances": new.instances}, {})
    assert split_instance_changes(child, new, "vae", True)[:2] == ({"keep_alive": 300.0}, {})
    assert split_instance_changes(primary, new, "main", True)[:2] == ({}, {})
    # A table key that is not LIVE waits: "instances" for the host, the key for the child.
    new = load(keep_alive="10m", vae_table="queue_size = 3\n")
    assert split_changes(old, new, True) == ({}, {"instances": new.instances})
    assert split_instance_changes(child, new, "vae", True)[:2] == ({}, {"queue_size": 3})
    # A top-level LIVE key reaches an instance whose table does not set it.
    new = load(keep_alive="7m")
    assert split_instance_changes(child, new, "vae", True)[:2] == ({"keep_alive": 420.0}, {})
    # An instance the file no longer has: nothing applies, the tables wait.
    _write(cfg, 'engine = "standalone"\nkeep_alive = "1m"\n')
    gone = Settings.load(cfg, env=env)
    assert split_instance_changes(child, gone, "vae", True) == ({}, {"instances": []}, {})


@pytest.mark.timeout(300)
def test_live_edits_reach_the_child_instance_without_a_restart(tmp_path, model_dir):
    main_port, vae_port = free_port(), free_port()
    extra = tmp_path / "more_models"
    extra.mkdir()
    cfg = tmp_path / "config.toml"
    roots = [model_dir]
    _write(cfg, _config(roots, main_port, vae_port, keep_alive="10m"))
    s = Settings.load(cfg, env={"LUNA_HOME": str(tmp_path / "home")}, overrides={"monitor_port": 0, "lock_port": 0})
    assert not s.problems, s.problems
    host = Host(s, log_to_stderr=False)
    vae = str(model_dir / "vae_folder")
    child_log = Path(s.log_dir) / "luna-daemon-vae.log"
    try:
        host.acquire()  # the host's own watcher (the primary)
        assert host.start_all(START) == {}
        token, child = host.daemon.token, host.instance("vae")
        pid = child.snapshot()["pid"]

        def ka(name: str) -> float:
            return _fresh_keep_alive(main_port if name == "main" else vae_port, token, name, vae)

        def child_ka_is(value: float, what: str) -> None:
            wait_until(lambda: ka("vae") == value, LIVE_WAIT, what, interval=0.3)

        assert ka("vae") == 600.0 and ka("main") == 600.0

        # 1. A live key in the child's own table: the child applies it, the primary keeps
        # the top-level value, and nothing waits for a restart.
        _write(cfg, _config(roots, main_port, vae_port, keep_alive="10m", vae_table='keep_alive = "5m"\n'))
        child_ka_is(300.0, "the child's table keep_alive applied live")
        assert ka("main") == 600.0
        # The host's own watcher (its view of the child) may apply the edit a poll later.
        wait_until(lambda: child.settings.keep_alive == 300.0, LIVE_WAIT, "the host's view of the child", interval=0.3)
        assert host.config_status()["restart_needed"] == [] and host.config_status()["config_error"] == ""
        assert _status(vae_port, token, "vae")["restart_needed"] == []

        # 2. Top-level live keys every instance inherits: the table still wins for keep_alive;
        # the new model root reaches the child.
        roots = [model_dir, extra]
        _write(cfg, _config(roots, main_port, vae_port, keep_alive="7m", vae_table='keep_alive = "5m"\n'))
        wait_until(lambda: str(extra.resolve()) in [r["path"] for r in _status(vae_port, token, "vae")["roots"]],
                   LIVE_WAIT, "the new model root in the child's status", interval=0.3)
        wait_until(lambda: ka("main") == 420.0, LIVE_WAIT, "the primary's keep_alive applied live", interval=0.3)
        assert ka("vae") == 300.0

        # 3. Without its own value the child takes the top-level one.
        _write(cfg, _config(roots, main_port, vae_port, keep_alive="7m"))
        child_ka_is(420.0, "the child back on the top-level keep_alive")

        # 4. A key that is not live waits: the child says so in its status, the host names
        # the tables; the live part of the same edit still applies.
        _write(cfg, _config(roots, main_port, vae_port, keep_alive="3m", vae_table="queue_size = 3\n"))
        wait_until(lambda: _status(vae_port, token, "vae")["restart_needed"] == ["queue_size"], LIVE_WAIT,
                   "queue_size waiting in the child's status", interval=0.3)
        wait_until(lambda: host.config_status()["restart_needed"] == ["instances"], LIVE_WAIT,
                   "the host naming the tables", interval=0.3)
        assert ka("vae") == 180.0

        # 5. A broken edit changes nothing in the child: it keeps serving on its old values
        # and says why (status, log), like the host.
        _write(cfg, _config(roots, main_port, vae_port, keep_alive="1m", vae_table='keep_alive = "10 minutes"\n'))
        st = wait_until(lambda: (st := _status(vae_port, token, "vae"))["config_error"] and st, LIVE_WAIT,
                        "config_error in the child's status", interval=0.3)
        assert "instances[2].keep_alive" in st["config_error"], st["config_error"]
        # The host's watcher polls on its own schedule: it may see the edit a poll later.
        wait_until(lambda: "instances[2].keep_alive" in host.config_status()["config_error"], LIVE_WAIT,
                   "config_error in the host's status", interval=0.3)
        assert ka("vae") == 180.0 and ka("main") == 180.0
        wait_until(lambda: "config file changed but cannot be used" in child_log.read_text(), LIVE_WAIT,
                   "the child's log line")

        # 6. Fixed: it applies.
        _write(cfg, _config(roots, main_port, vae_port, keep_alive="1m"))
        child_ka_is(60.0, "the fixed file applied in the child")
        assert _status(vae_port, token, "vae")["config_error"] == ""

        # Never restarted for any of it.
        assert child.snapshot()["pid"] == pid and child.restarts == 0 and child.state == "running"
    finally:
        host.close(10)
        wait_until(lambda: not _luna_children(os.getpid()), 15, "no child instance left")
