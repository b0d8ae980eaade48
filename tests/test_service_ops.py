"""The op table (luna_daemon/ops/): importing luna_daemon.service registers every op, and
the registered set is the one docs/protocol.md "Operations" documents."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

from luna_daemon import instances, service

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _documented_ops() -> set[str]:
    """The op names of the table under docs/protocol.md's "## Operations" heading."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text.split("\n## Operations\n", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert len(names) == len(set(names)), f"an op documented twice: {names}"
    return set(names)


def _registered_in_fresh_process(first_import: str) -> list[str]:
    """The table as a new process sees it after ``first_import``, then luna_daemon.service."""
    code = (f"import json, {first_import}\n"
            "import luna_daemon.service as s\n"
            "print(json.dumps(sorted(s._OPS)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_documented_ops_are_the_expected_set():
    # Guards the parser: a docs edit that breaks the table must not make the test vacuous.
    assert _documented_ops() == {
        "ping", "hello", "status", "ps", "register_roots", "unload", "shutdown", "shm_register", "echo",
        "vae_load", "vae_encode", "vae_decode", "clip_load", "clip_tokenize", "clip_encode",
        "vae_load_sd", "clip_load_sd", "lora_has", "lora_put", "lora_load", "lora_list",
    }


@pytest.mark.parametrize("first_import", ["luna_daemon.service", "luna_daemon.server", "luna_daemon.ops.clip"])
def test_importing_the_service_registers_every_documented_op(first_import):
    # A fresh process: in this one other tests may already have imported every op group,
    # which would hide a group that luna_daemon.service forgot to import.
    assert set(_registered_in_fresh_process(first_import)) == _documented_ops()


def test_only_ping_and_hello_answer_without_the_token():
    assert {name for name, (_, auth, _) in service._OPS.items() if not auth} == {"ping", "hello"}


def test_each_op_is_served_by_the_instances_of_its_role():
    # instances.ROLE_OF_OP routes clients; the table decides what an instance answers:
    # both must agree, or a routed request would come back wrong_instance.
    for name, (_, _, kinds) in service._OPS.items():
        role = instances.ROLE_OF_OP.get(name)
        want = {"full", role} if role else {"full", "vae", "clip"}
        assert kinds == want, (name, sorted(kinds))
