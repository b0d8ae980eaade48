"""luna_daemon.units and the dashboard's static/units.js: one set of rules, checked on
the same values (the JS runs in node, the same file the browser loads)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from luna_daemon.units import fmt_bytes, fmt_duration

UNITS_JS = Path(__file__).resolve().parents[1] / "luna_daemon" / "web" / "static" / "units.js"

SIZES = [0, 1, 1023, 1024, 1536, 1048575, 1048576, 1310720, 4089446, 4_100_000, 15_000_000,
         25_276 * 10**6, 2**30 - 1, 3 * 2**30 + 2**29, 5 * 2**40, 2**50, None, -2048]
DURATIONS = [None, -1, -1.0, 0, 0.0004, 0.0005, 0.25, 0.9994, 0.9996, 1, 1.25, 1.5, 2.05, 9.94, 9.96, 59.4, 59.5, 60, 61, 330,
             3599.6, 3600, 3660, 7500, 86399, 86400, 90000, 273605, 10**7]


def test_sizes_are_binary_with_one_decimal():
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(1023) == "1023 B"
    assert fmt_bytes(4089446) == "3.9 MiB"
    assert fmt_bytes(1310720) == "1.3 MiB"  # a tie rounds half up (toFixed/format would not agree)
    assert fmt_bytes(1048575) == "1.0 MiB"  # not "1024.0 KiB"
    assert fmt_bytes(25_276 * 10**6) == "23.5 GiB"
    assert fmt_bytes(None) == "—"


def test_durations_in_two_whole_units_and_forever():
    assert fmt_duration(-1) == fmt_duration(None) == "forever"
    assert fmt_duration(0) == "0 s"
    assert fmt_duration(0.25) == "250 ms"
    assert fmt_duration(1.47) == "1.5 s"
    assert fmt_duration(9.96) == "10 s"
    assert fmt_duration(45) == "45 s"
    assert fmt_duration(300) == "5 min"
    assert fmt_duration(330) == "5 min 30 s"
    assert fmt_duration(7500) == "2 h 5 min"
    assert fmt_duration(273605) == "3 d 4 h"
    assert fmt_duration(59.5) == "1 min"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_dashboard_formats_exactly_like_python():
    script = (f"const u = require({json.dumps(str(UNITS_JS))});"
              f"const sizes = {json.dumps(SIZES)}, durs = {json.dumps(DURATIONS)};"
              "process.stdout.write(JSON.stringify({b: sizes.map(u.fmtBytes), d: durs.map(u.fmtDuration)}));")
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    js = json.loads(out)
    assert js["b"] == [fmt_bytes(v) for v in SIZES]
    assert js["d"] == [fmt_duration(v) for v in DURATIONS]


def test_cli_prints_sizes_and_durations_in_the_shared_units(daemon, tmp_path, model_dir, monkeypatch, capsys):
    """``status``, ``ps``, ``load`` and ``config --show`` against a real daemon (issue 12 #13)."""
    from luna_daemon import cli

    monkeypatch.setenv("LUNA_HOME", str(tmp_path / "home"))  # the daemon fixture's home: its token
    monkeypatch.setenv("LUNA_KEEP_ALIVE", "forever")
    monkeypatch.setenv("LUNA_IDLE_TIMEOUT", "5m")
    monkeypatch.setenv("LUNA_LORA_CACHE_BYTES", "2GiB")
    port = ["--port", str(daemon.address[1])]
    vae = str(model_dir / "vae_file" / "tiny_vae.safetensors")
    assert cli.main(["load", "vae", vae, "--keep-alive", "330s", *port]) == 0
    loaded = capsys.readouterr().out
    nbytes = daemon.registry.entries()[0].describe()["bytes"]
    assert f", {fmt_bytes(nbytes)}, keep_alive 5 min 30 s" in loaded, loaded
    assert cli.main(["ps", *port]) == 0
    ps = capsys.readouterr().out
    assert fmt_bytes(nbytes) in ps and " MB " not in ps and "in 5 min" in ps, ps
    assert cli.main(["status", *port]) == 0
    status = capsys.readouterr().out
    assert "uptime " in status and " MB" not in status and "B," in status, status
    assert cli.main(["config", "--show"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert " forever " in rows["keep_alive"] and "-1" not in rows["keep_alive"], rows["keep_alive"]
    assert " 5 min " in rows["idle_timeout"] and " 2.0 GiB " in rows["lora_cache_bytes"]
    assert " 2.0 GiB " in rows["max_body_bytes"] and "(default)" in rows["max_body_bytes"]
