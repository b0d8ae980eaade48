"""[[instances]] tables: parsing, validation (errors located at file, line, key), the specs
each instance runs with, and the op routing rules (luna_daemon.instances)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from luna_daemon import instances as inst
from luna_daemon.config_watch import split_changes
from luna_daemon.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[1]

TWO = """\
keep_alive = "5m"
preload = ["vae:a.safetensors"]

[[instances]]
name = "clip"
service = "clip"
port = 19283
clip_device = "cuda:1"

[[instances]]
name = "vae"
service = "vae"
port = 19284
vae_device = "cuda:0"
"""


def _load(tmp_path, text, env=None, **kw):
    f = tmp_path / "config.toml"
    f.write_text(text)
    return Settings.load(f, env={"LUNA_HOME": str(tmp_path), **(env or {})}, **kw)


def test_no_tables_is_one_main_instance_equal_to_the_settings(tmp_path):
    s = _load(tmp_path, "port = 20100\n")
    assert s.instances == [] and s.instance_name == ""
    (spec,) = inst.instance_specs(s)
    assert (spec.name, spec.index, spec.primary, spec.port, spec.service) == ("main", 0, True, 20100, "full")
    assert spec.settings == s and spec.settings is not s and spec.settings.instance_name == "main"
    assert spec.public() == {"name": "main", "service": "full", "host": "127.0.0.1", "port": 20100,
                             "vae_device": "auto", "clip_device": "auto", "primary": True}


def test_readme_two_instance_layout(tmp_path):
    s = _load(tmp_path, TWO)
    assert [t["name"] for t in s.instances] == ["clip", "vae"] and s.sources["instances"] == "file"
    clip, vae = inst.instance_specs(s)
    assert clip.primary and not vae.primary and (clip.index, vae.index) == (0, 1)
    assert (clip.service, clip.port, clip.settings.clip_device, clip.settings.vae_device) == ("clip", 19283, "cuda:1", "auto")
    assert (vae.service, vae.port, vae.settings.vae_device) == ("vae", 19284, "cuda:0")
    # Top-level keys are every instance's defaults; the table's keys are marked "file".
    assert clip.settings.keep_alive == vae.settings.keep_alive == 300
    assert vae.settings.sources["vae_device"] == "file" and vae.settings.sources["clip_device"] == "default"
    assert vae.settings.instance_name == "vae" and vae.settings.instances == s.instances
    # Independent copies: one instance's list is not another's (or the loaded one's).
    vae.settings.preload.append("vae:b.safetensors")
    assert clip.settings.preload == s.preload == ["vae:a.safetensors"]
    json.dumps([spec.public() for spec in (clip, vae)])
    assert inst.instance_spec(s, "vae").port == 19284


def test_ports_default_to_port_plus_position_and_follow_env(tmp_path):
    text = 'port = 20200\n[[instances]]\nname = "a"\n[[instances]]\nname = "b"\n[[instances]]\nname = "c"\nport = 20300\n'
    assert [x.port for x in inst.instance_specs(_load(tmp_path, text))] == [20200, 20201, 20300]
    s = _load(tmp_path, text, env={"LUNA_PORT": "20400"})
    assert [x.port for x in inst.instance_specs(s)] == [20400, 20401, 20300]
    # Port 0 = a free port each: never a conflict, and not turned into 1, 2, ...
    s = _load(tmp_path, 'port = 0\n[[instances]]\nname = "a"\n[[instances]]\nname = "b"\nport = 0\n')
    assert [x.port for x in inst.instance_specs(s)] == [0, 0]


def test_unknown_instance_name_lists_the_configured_ones(tmp_path):
    with pytest.raises(SettingsError) as ei:
        inst.instance_spec(_load(tmp_path, TWO), "gpu2")
    assert ei.value.key == "instance" and str(ei.value) == "instance: no instance named 'gpu2'; configured: clip, vae"
    with pytest.raises(SettingsError, match="configured: main$"):
        inst.instance_spec(_load(tmp_path, ""), "vae")


# Each case: the file (the line the error must point at is marked "# <-"), the error key,
# a part of the message, the suggestion.
BAD = [
    ('[[instances]]\nname = "a"\nservce = "vae"  # <-\n', "instances[1].servce", "unknown instance setting", "service"),
    ('[[instances]]\nname = "a"\nzzz = 1  # <-\n', "instances[1].zzz", "a table takes name and client_timeout, clip_device", ""),
    ('[[instances]]\nname = "a"\n[[instances]]\nname = "b"\nmonitor_port = 1  # <-\n', "instances[2].monitor_port",
     "is a host setting: set it at the top of config.toml, it applies to every instance", ""),
    ('[[instances]]\nname = "a"\nmodel_roots = ["/m"]  # <-\n', "instances[1].model_roots", "is a host setting", ""),
    ('[[instances]]\nname = "a"\nlog-level = "DEBUG"  # <-\n', "instances[1].log_level", "is a host setting", ""),
    ('[[instances]]\nname = "a"\n[[instances]]\nname = "a"  # <-\n', "instances[2].name",
     "'a' is already the name of instances[1]", ""),
    ('[[instances]]\nname = "a"\nport = 20500\n[[instances]]\nname = "b"\nport = 20500  # <-\n', "instances[2].port",
     "20500 is already the port of instance 'a'", ""),
    # b derives 19284 from its place; c sets it explicitly: c's line is named.
    ('[[instances]]\nname = "a"\n[[instances]]\nname = "b"\n[[instances]]\nname = "c"\nport = 19284  # <-\n',
     "instances[3].port", "19284 is already the port of instance 'b'", ""),
    # A derived port that collides points at the table header, and says how it was derived.
    ('monitor_port = 19284\n[[instances]]\nname = "a"\n[[instances]]  # <-\nname = "b"\n', "instances[2].port",
     "(no port set: port + 1 = 19284) is already monitor_port", ""),
    ('[[instances]]\nname = "a"\nport = 19299  # <-\n', "instances[1].port", "19299 is already lock_port", ""),
    ('port = 65535\n[[instances]]\nname = "a"\n[[instances]]  # <-\nname = "b"\n', "instances[2].port",
     "would be 65536", ""),
    ('[[instances]]\nname = "a"\nport = 70000  # <-\n', "instances[1].port", "must be a TCP port", ""),
    ('[[instances]]\nname = "a"\nport = "abc"  # <-\n', "instances[1].port", "expected an integer", ""),
    ('[[instances]]\nname = "a"\nservice = "unet"  # <-\n', "instances[1].service", "must be one of full, vae, clip", ""),
    ('[[instances]]\nname = "a"\nvae_device = "gpu0"  # <-\n', "instances[1].vae_device", "must be auto, cpu, mps", ""),
    ('[[instances]]\nname = "a"\nmax_model_bytes = {cpu = "lots"}  # <-\n', "instances[1].max_model_bytes.cpu",
     "expected a byte size", ""),
    ('[[instances]]\nname = "a"\nqueue_size = 0  # <-\n', "instances[1].queue_size", "must be >= 1", ""),
    ('[[instances]]  # <-\nservice = "vae"\n', "instances[1].name", "required", ""),
    ('[[instances]]\nname = "VAE 1"  # <-\n', "instances[1].name", "must start with a lower-case letter", ""),
    ('[[instances]]\nname = "a"\ninstances = []  # <-\n', "instances[1].instances", "cannot hold instances", ""),
    ("".join(f'[[instances]]\nname = "i{n}"\nport = 0\n' for n in range(16)) + '[[instances]]  # <-\nname = "x"\n',
     "instances[17]", "at most 16 instances; remove this table and the 0 after it", ""),
    ('instances = 3  # <-\n', "instances", "one [[instances]] table (double brackets) per instance", ""),
    ('[instances]  # <-\nname = "a"\n', "instances", "got a single [instances] table", ""),
    ('instances = [{name = "a"}, {name = "b", port = "x"}]  # <-\n', "instances[2].port", "expected an integer", ""),
]


# What a tolerant load keeps of the tables: a bad key is left out of its table, a table
# without a usable name is left out, a port conflict (a check across tables) drops them all.
A, AB = [{"name": "a"}], [{"name": "a"}, {"name": "b"}]
SIXTEEN = [{"name": f"i{n}", "port": 0} for n in range(16)]
KEPT = [A, A, AB, A, A, A, [], [], [], [], [], A, A, A, A, A, A, [], [], A, SIXTEEN, [], [], AB]
assert len(KEPT) == len(BAD)


@pytest.mark.parametrize("text, key, fragment, suggestion, kept", [(*b, k) for b, k in zip(BAD, KEPT)])
def test_bad_tables_are_located_errors(tmp_path, text, key, fragment, suggestion, kept):
    line = next(n for n, t in enumerate(text.splitlines(), 1) if t.endswith("# <-"))
    with pytest.raises(SettingsError) as ei:
        _load(tmp_path, text)
    err = ei.value
    assert (err.key, err.line, err.suggestion) == (key, line, suggestion), str(err)
    assert fragment in err.message and err.file == str(tmp_path / "config.toml")
    # Tolerant (the host, read-only commands): the same error in problems, no crash, and
    # no half-checked tables to run.
    s = _load(tmp_path, text, tolerant=True)
    assert [(p.key, p.line) for p in s.problems] == [(key, line)], s.problems
    assert s.instances == kept
    assert [x.name for x in inst.instance_specs(s)] == ([t["name"] for t in kept] or ["main"])


def test_tolerant_load_lists_every_bad_key_of_every_table(tmp_path):
    text = ('port = 20600\n[[instances]]\nname = "a"\nservice = "unet"\nkeep_alive = "5m"\n'
            '[[instances]]\nname = "b"\nhost = "0.0.0.0"\nvae_device = "gpu"\n')
    s = _load(tmp_path, text, tolerant=True)
    assert [(p.key, p.line) for p in s.problems] == [
        ("instances[1].service", 4), ("instances[2].host", 8), ("instances[2].vae_device", 9)]
    # Each bad key is left out (its default applies); the good ones stay.
    assert s.instances == [{"name": "a", "keep_alive": 300.0}, {"name": "b"}]
    assert [(x.name, x.port, x.service) for x in inst.instance_specs(s)] == [("a", 20600, "full"), ("b", 20601, "full")]


def test_instances_come_only_from_the_file(tmp_path):
    env = {"LUNA_INSTANCES": '[{"name": "a"}]'}
    with pytest.raises(SettingsError) as ei:
        _load(tmp_path, "", env=env)
    assert ei.value.key == "instances" and "LUNA_INSTANCES" in ei.value.message and "config.toml" in ei.value.message
    s = _load(tmp_path, TWO, env=env, tolerant=True)
    assert [p.key for p in s.problems] == ["instances"] and [t["name"] for t in s.instances] == ["clip", "vae"]
    with pytest.raises(SettingsError, match="cannot come from a flag"):
        _load(tmp_path, "", overrides={"instances": [{"name": "a"}]})
    with pytest.raises(SettingsError, match="cannot come from a flag"):
        Settings().with_overrides(instances=[{"name": "a"}])
    with pytest.raises(SettingsError, match="unknown setting"):  # bookkeeping, not a setting
        _load(tmp_path, 'instance_name = "x"\n')


def test_instances_change_waits_for_a_host_restart(tmp_path):
    old = _load(tmp_path, "")
    new = _load(tmp_path, TWO)
    for running in (True, False):
        apply_now, waiting = split_changes(old, new, running)
        assert "instances" in waiting and "instances" not in apply_now


def test_public_dict_and_config_show(tmp_path):
    s = _load(tmp_path, TWO)
    assert s.public_dict()["instances"] == s.instances and "instance_name" not in s.public_dict()
    json.dumps(s.public_dict())
    env = {**os.environ, "LUNA_HOME": str(tmp_path / "home")}
    f = tmp_path / "config.toml"
    for args in ((), ("--json",)):
        out = subprocess.run([sys.executable, "-m", "luna_daemon", "config", "--show", "--config", str(f), *args],
                             check=False, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stdout + out.stderr
        assert '"vae_device": "cuda:0"' in out.stdout and "Traceback" not in out.stderr
    assert json.loads(out.stdout)["settings"]["instances"] == {"value": s.instances, "source": "file"}


def test_dashboard_cannot_save_instances(tmp_path):
    from luna_daemon.web import settings_io

    s = _load(tmp_path, TWO)
    before = (tmp_path / "config.toml").read_text()
    r = settings_io.save(s, {"instances": [{"name": "x", "port": 1}]}, ["cpu"])
    assert r["ok"] is False and r["codes"] == {"instances": "read_only"}
    # A top-level edit next to the tables keeps them intact (tomlkit writes above them).
    assert settings_io.save(s, {"keep_alive": "10m"}, ["cpu"])["ok"] is True
    after = _load(tmp_path, (tmp_path / "config.toml").read_text())
    assert after.instances == s.instances and after.keep_alive == 600 and before != (tmp_path / "config.toml").read_text()


def _service_op_kinds() -> dict[str, set[str]]:
    """``@op("name", service="full vae")`` of the op modules (luna_daemon/ops/), read from
    their source (no torch)."""
    out = {}
    for path in sorted((REPO / "luna_daemon" / "ops").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            for dec in getattr(node, "decorator_list", ()):
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "op":
                    kinds = next((k.value.value for k in dec.keywords if k.arg == "service"), "")
                    out[dec.args[0].value] = set(kinds.split())
    return out


def test_role_of_op_matches_the_service():
    kinds = _service_op_kinds()
    assert len(kinds) > 10
    for op, k in kinds.items():
        role = inst.ROLE_OF_OP.get(op)
        if role is None:
            assert not k, f"{op} is limited to {k} but has no role"
        else:
            assert k == {"full", role}, op
    assert set(inst.ROLE_OF_OP) <= set(kinds)


def test_serves_and_pick():
    assert inst.serves("full", "vae") and inst.serves("vae", "vae") and not inst.serves("clip", "vae")
    full = {"name": "main", "service": "full", "primary": True}
    clip = {"name": "clip", "service": "clip", "primary": False}
    vae = {"name": "vae", "service": "vae", "primary": False}
    vae2 = {"name": "vae2", "service": "vae", "primary": False}
    assert inst.pick([full, clip, vae], "vae") is vae and inst.pick([full, clip, vae], "clip") is clip
    assert inst.pick([clip, full], "vae") is full  # no dedicated one: the full one
    assert inst.pick([clip], "vae") is None
    assert inst.pick([vae, vae2], "vae") is vae  # ties: file order
    down = {**vae, "state": "error"}
    assert inst.pick([full, down], "vae") is full  # a running full one before a dead dedicated one
    assert inst.pick([down, {**vae2, "state": "running"}], "vae")["name"] == "vae2"
    assert inst.pick([clip, down], "vae") is down  # nothing better: its error is the answer
    assert inst.pick([full, clip], "vae", "clip") is clip  # a name wins whatever it serves
    assert inst.pick([full, clip], "vae", "nope") is None
    assert inst.pick([clip, full], None) is full and inst.pick([clip], None) is clip and inst.pick([], "vae") is None


def test_the_primary_port_is_the_top_level_port(tmp_path):
    # Clients that read settings.port (ComfyUI's nodes, the CLI) must reach the primary
    # even when only the first table names its port.
    s = _load(tmp_path, TWO.replace("port = 19283", "port = 20300"))
    assert s.port == 20300 and s.sources["port"] == "file"
    assert [spec.port for spec in inst.instance_specs(s)] == [20300, 19284]
    # LUNA_PORT / --port aim at the primary: they replace the table's port.
    s = _load(tmp_path, TWO, env={"LUNA_PORT": "20400"})
    assert inst.instance_specs(s)[0].port == 20400 and s.port == 20400
    s = _load(tmp_path, TWO, overrides={"port": 20500})
    assert inst.instance_specs(s)[0].port == 20500
    # Two different values in one file: located error, tolerant load keeps the top-level one.
    text = "port = 20600\n" + TWO
    with pytest.raises(SettingsError) as info:
        _load(tmp_path, text)
    assert info.value.key == "instances[1].port" and info.value.line == text.splitlines().index("port = 19283") + 1
    assert "top-level port = 20600" in info.value.message
    s = _load(tmp_path, text, tolerant=True)
    assert s.problems and inst.instance_specs(s)[0].port == 20600


def test_each_further_instance_has_its_own_warm_start_file(tmp_path):
    s = _load(tmp_path, TWO)
    clip, vae = inst.instance_specs(s)
    assert clip.settings.state_file.name == "state.json" and vae.settings.state_file.name == "state-vae.json"
    (only,) = inst.instance_specs(_load(tmp_path, "port = 20100\n"))
    assert only.settings.state_file == s.state_file
