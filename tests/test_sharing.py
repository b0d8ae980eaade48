"""Memory saved (issue 16 item 1): client identities in ``hello``, per-model users, the
``sharing`` figure of ``status`` -- with real client processes against a real ``serve``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, serve_env

from luna_daemon.client import DaemonClient, DaemonError, wait_for_daemon
from luna_daemon.models.sharing import (
    MAX_TEXT,
    MAX_USERS_PER_MODEL,
    Identity,
    Sharing,
    combine,
    parse_identity,
    summary,
)
from luna_daemon.protocol import LunaError

# One ComfyUI-like client process: announces ``comfyui`` = argv[1], loads the tiny VAE (and,
# with argv[4] == "clip", the tiny CLIP), runs one op on each, prints "ready" and holds its
# pooled connection open until stdin closes.
_CLIENT = r"""
import sys, torch
from luna_daemon.client import DaemonClient
name, port, token, use_clip, vae, clip = sys.argv[1:7]
c = DaemonClient("127.0.0.1", int(port), token=token, timeout=60, identity={"comfyui": name, "name": name})
m = c.vae_load(vae)["model"]
c.vae_decode(m, torch.zeros(1, 4, 4, 4))
if use_clip == "clip":
    k = c.clip_load([clip], "sd1")["model"]
    c.clip_encode(k, text="a cat")
print("ready", flush=True)
sys.stdin.read()
c.close()
"""


def _env(tmp_path, model_dir, **extra):
    return serve_env(tmp_path / "home", model_dir, **extra)


@contextlib.contextmanager
def _serve(env, *, wait_ports=()):
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for port in (int(env["LUNA_PORT"]), *wait_ports):
            wait_for_daemon("127.0.0.1", port, 90, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        proc.stderr.close()


def _token(env) -> str:
    return (Path(env["LUNA_HOME"]) / "config" / "token").read_text().strip()


@contextlib.contextmanager
def _clients(env, model_dir, specs):
    """Start one _CLIENT process per (name, use_clip); yields the Popens once all are ready."""
    procs = []
    try:
        for name, use_clip in specs:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _CLIENT, name, env["LUNA_PORT"], _token(env), "clip" if use_clip else "-",
                 str(model_dir / "vae_folder"), str(model_dir / "clip_l")],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout.readline().strip() == "ready", f"client exited with {p.wait(30)}"
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            p.stdout.close()


def _get(env, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{env['LUNA_MONITOR_PORT']}{path}", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, line_start: str) -> float:
    found = [ln for ln in text.splitlines() if ln.startswith(line_start + " ")]
    assert len(found) == 1, (line_start, [ln for ln in text.splitlines() if "saved" in ln or "sharing" in ln])
    return float(found[0].rsplit(" ", 1)[1])


def _wait_for(fn, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.1)


def test_three_client_processes_share_a_vae_and_two_a_clip(tmp_path, model_dir):
    env = _env(tmp_path, model_dir, LUNA_SHARING_WINDOW_S="1")
    with _serve(env), DaemonClient("127.0.0.1", int(env["LUNA_PORT"]), token=_token(env), timeout=30) as c:
        with _clients(env, model_dir, [("comfy-a", True), ("comfy-b", True), ("comfy-c", False)]) as procs:
            sizes = {m["kind"]: m["bytes"] for m in c.ps()}
            assert set(sizes) == {"vae", "clip"} and all(sizes.values())
            sh = c.status()["sharing"]
            assert (sh["clients"], sh["models"]) == (3, 2), sh
            assert sh["saved_bytes"] == 2 * sizes["vae"] + sizes["clip"], (sh, sizes)
            assert {(p["kind"], p["users"]) for p in sh["per_model"]} == {("vae", 3), ("clip", 2)}
            assert sorted(i[1] for i in sh["identities"]) == ["comfy-a", "comfy-b", "comfy-c"]
            assert {i[0] for i in sh["identities"]} == {p.pid for p in procs}
            # The CLI shows the one line.
            st = subprocess.run([sys.executable, "-m", "luna_daemon", "status"], env=env, capture_output=True,
                                text=True, timeout=120, check=False)
            assert summary(sh) in st.stdout and "3 ComfyUI instances share 2 models: saved" in st.stdout, st.stdout
            # The dashboard's status (its top card shows total.text) and /metrics.
            web = json.loads(_get(env, "/api/status"))["sharing"]
            assert web["total"] == {"clients": 3, "models": 2, "saved_bytes": sh["saved_bytes"], "text": summary(sh)}
            metrics = _get(env, "/metrics")
            assert _metric(metrics, 'luna_memory_saved_bytes{instance="main"}') == sh["saved_bytes"]
            assert _metric(metrics, 'luna_sharing_clients{instance="main"}') == 3
            assert _metric(metrics, 'luna_host_memory_saved_bytes{instance="main"}') == sh["saved_bytes"]
            # comfy-c exits: its connection closes, and after the window (1 s here) it no longer counts.
            procs[2].stdin.close()
            assert procs[2].wait(30) == 0
            after = _wait_for(lambda: (s := c.status()["sharing"])["clients"] == 2 and s, "comfy-c dropping out")
            assert after["saved_bytes"] == sizes["vae"] + sizes["clip"], after
            # This (anonymous) client's own op on the VAE does not make it a user.
            vae = next(m["id"] for m in c.ps() if m["kind"] == "vae")
            import torch

            c.vae_decode(vae, torch.zeros(1, 4, 4, 4))
            assert c.status()["sharing"]["clients"] == 2
        # Every client gone: nothing is shared, nothing saved.
        gone = _wait_for(lambda: (s := c.status()["sharing"])["clients"] == 0 and s, "all clients dropping out")
        assert (gone["models"], gone["saved_bytes"]) == (0, 0)


def test_a_client_counts_while_its_connection_is_open(tmp_path, model_dir):
    """Window 0: only an open connection keeps a client counted."""
    env = _env(tmp_path, model_dir, LUNA_SHARING_WINDOW_S="0")
    with _serve(env), DaemonClient("127.0.0.1", int(env["LUNA_PORT"]), token=_token(env), timeout=30) as c:
        with _clients(env, model_dir, [("comfy-a", False), ("comfy-b", False)]):
            time.sleep(0.2)  # past the (zero) window: the open connections alone count
            sh = c.status()["sharing"]
            assert (sh["clients"], sh["models"], sh["saved_bytes"]) == (2, 1, c.ps()[0]["bytes"]), sh
        _wait_for(lambda: c.status()["sharing"]["clients"] == 0, "closed connections dropping out")


@pytest.mark.parametrize("identity, says", [
    ("me", "must be an object"),
    ([1, "x"], "must be an object"),
    ({"comfyui": "x"}, "client.pid"),
    ({"pid": -5}, "client.pid"),
    ({"pid": 0}, "client.pid"),
    ({"pid": True}, "client.pid"),
    ({"pid": "123"}, "client.pid"),
    ({"pid": 1.5}, "client.pid"),
    ({"pid": 2**40}, "client.pid"),
    ({"pid": 42, "comfyui": 7}, "client.comfyui must be a string"),
    ({"pid": 42, "name": ["x"]}, "client.name must be a string"),
    ({"pid": 42, "comfyui": "x" * (MAX_TEXT + 1)}, f"at most {MAX_TEXT}"),
    ({"pid": 42, "name": "\u00e9" * 100_000}, f"at most {MAX_TEXT}"),
])
def test_hostile_identities_are_typed_errors_and_the_daemon_serves_on(client, identity, says):
    with pytest.raises(DaemonError) as err:
        client.call("hello", {"client": identity})
    assert err.value.code == "bad_args" and says in err.value.message, err.value.message
    assert client.ping()["pong"] is True
    assert client.status()["sharing"]["clients"] == 0


def test_identity_via_the_client_and_ops_in_process(daemon, model_dir):
    """The in-process daemon: a client's identity reaches the registry; control characters
    in names are replaced; an unload forgets the model's users."""
    with DaemonClient(*daemon.address, token=daemon.token, timeout=60, identity={"comfyui": "a\x1b[31m", "name": "n"}) as a, \
            DaemonClient(*daemon.address, token=daemon.token, timeout=60, identity={"comfyui": "b"}) as b:
        m = a.vae_load(str(model_dir / "vae_folder"))["model"]
        b.vae_load(str(model_dir / "vae_folder"))
        sh = a.status()["sharing"]
        assert (sh["clients"], sh["saved_bytes"]) == (2, a.ps()[0]["bytes"])
        assert sorted(i[1] for i in sh["identities"]) == ["a?[31m", "b"]
        a.unload(m)
        assert a.status()["sharing"] == {**sh, "clients": 0, "models": 0, "saved_bytes": 0, "per_model": [], "identities": []}


def test_rule_window_bound_and_combine():
    """The counting rule itself, on a clock the test moves."""
    now = [100.0]
    s = Sharing(window=60, clock=lambda: now[0])

    class M:
        def __init__(self, id, nbytes):
            self.id, self.kind, self.paths, self.nbytes = id, "vae", [f"/m/{id}"], nbytes

    models = [M("v", 1000), M("c", 300)]
    a, b, c = Identity(1, "a"), Identity(2, "b"), Identity(3, "c")
    s.connected(a)
    for ident in (a, b, c):
        s.used("v", ident)
    s.used("c", a)
    s.used("c", b)
    snap = s.snapshot(models)
    assert (snap["clients"], snap["models"], snap["saved_bytes"]) == (3, 2, 2 * 1000 + 300)
    now[0] += 60  # exactly the window: still counted
    assert s.snapshot(models)["clients"] == 3
    now[0] += 0.5  # past it: only a (connection open) counts
    snap = s.snapshot(models)
    assert (snap["clients"], snap["models"], snap["saved_bytes"]) == (1, 2, 0)
    s.disconnected(a)
    assert s.snapshot(models)["clients"] == 0
    # At most MAX_USERS_PER_MODEL per model: the least recently active one goes first.
    for pid in range(10, 10 + MAX_USERS_PER_MODEL + 5):
        now[0] += 1
        s.used("v", Identity(pid, ""))
    assert len(s._users["v"]) == MAX_USERS_PER_MODEL and Identity(10, "") not in s._users["v"]
    s.forget("v")
    s.forget("c")
    assert s._users == {} and s._names == {}
    # Host total: one client on two instances counts once; models and bytes add up.
    one = {"clients": 2, "models": 1, "saved_bytes": 10, "identities": [[1, "a"], [2, "b"]]}
    two = {"clients": 2, "models": 1, "saved_bytes": 5, "identities": [[1, "a"], [3, "c"]]}
    assert combine([one, two, None]) == {"clients": 3, "models": 2, "saved_bytes": 15}
    assert summary(combine([one, two])) == "3 ComfyUI instances share 2 models: saved 15 B"


def test_the_ComfyUI_connection_announces_a_valid_identity(daemon, model_dir, monkeypatch):
    from luna_daemon.comfy_nodes.connection import client_identity, make_client

    monkeypatch.setattr(sys, "argv", ["main.py", "--port", "8190"])
    ident, name = parse_identity(client_identity())
    assert ident.pid == os.getpid() and name == "ComfyUI :8190"
    import dataclasses

    settings = dataclasses.replace(daemon.settings, port=daemon.address[1])  # settings say port 0 (a free one)
    with make_client(settings) as c:  # what the nodes' Connection uses
        c.vae_load(str(model_dir / "vae_folder"))
        assert c.status()["sharing"]["identities"] == [[os.getpid(), ident.comfyui]]
    with pytest.raises(LunaError):
        parse_identity({"pid": 0})


def test_a_client_of_two_instances_counts_once_in_the_host_total(tmp_path, model_dir):
    """clip (primary) + vae (child process) instances; two routed clients use both."""
    env = _env(tmp_path, model_dir, LUNA_SHARING_WINDOW_S="600")
    vae_port = free_port()
    cfg = Path(env["LUNA_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'[[instances]]\nname = "clip"\nservice = "clip"\n\n'
                   f'[[instances]]\nname = "vae"\nservice = "vae"\nport = {vae_port}\n', encoding="utf-8")
    with _serve(env, wait_ports=(vae_port,)), _clients(env, model_dir, [("comfy-a", True), ("comfy-b", True)]):
        st = subprocess.run([sys.executable, "-m", "luna_daemon", "status", "--json"], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
        out = json.loads(st.stdout)
        by_name = {b["name"]: b["status"]["sharing"] for b in out["instances"]}
        assert by_name["vae"]["clients"] == by_name["clip"]["clients"] == 2, by_name
        vae_b, clip_b = by_name["vae"]["per_model"][0]["bytes"], by_name["clip"]["per_model"][0]["bytes"]
        assert out["sharing_total"] == {"clients": 2, "models": 2, "saved_bytes": vae_b + clip_b}
        human = subprocess.run([sys.executable, "-m", "luna_daemon", "status"], env=env, capture_output=True,
                               text=True, timeout=120, check=False).stdout
        assert "2 ComfyUI instances share 2 models: saved" in human.splitlines()[1], human
        # The dashboard reads the child through its poller: wait for its first answer.
        metrics = _wait_for(lambda: (m := _get(env, "/metrics")) and 'luna_sharing_clients{instance="vae"} 2.0' in m and m,
                            "the vae instance's sharing in /metrics")
        assert _metric(metrics, 'luna_host_sharing_clients{instance="clip"}') == 2
        assert _metric(metrics, 'luna_host_memory_saved_bytes{instance="clip"}') == vae_b + clip_b


def test_tray_texts_show_the_saved_figure():
    from luna_daemon.tray.menu import (
        HEALTHY,
        InstanceState,
        TrayState,
        build_view,
        sharing_changes,
        status_summary,
    )

    sh = {"clients": 2, "models": 1, "saved_bytes": 3 * 1024**3, "identities": [[11, "a"], [12, "b"]]}
    one = TrayState(daemon="running", health=HEALTHY, models=1, clients=2, **sharing_changes({"sharing": sh}))
    view = build_view(one)
    assert view.status.endswith("· saved 3.0 GiB"), view.status
    assert "2 ComfyUI instances share 1 model: saved 3.0 GiB" in view.detail and "share 1 model" in view.title
    assert status_summary({"state": "running", "sharing": sh}).endswith("2 ComfyUI instances share 1 model: saved 3.0 GiB")
    # Nothing shared: the row stays as it was.
    assert "saved" not in build_view(TrayState(daemon="running", health=HEALTHY)).status
    # Several instances: a client of both counts once, bytes and models add up.
    a = InstanceState("clip", daemon="running", health=HEALTHY, **sharing_changes({"sharing": sh}))
    b = InstanceState("vae", daemon="running", health=HEALTHY, **sharing_changes(
        {"sharing": {"models": 1, "saved_bytes": 1024**3, "identities": [[11, "a"], [13, "c"]]}}))
    multi = build_view(TrayState(daemon="running", instances=(a, b)))
    assert "3 ComfyUI instances share 2 models: saved 4.0 GiB" in multi.detail, multi.detail
    assert "saved 4.0 GiB" in multi.status


@pytest.mark.e2e
def test_dashboard_top_card_shows_the_saved_figure(make_settings, model_dir):
    """The dashboard's top card (``#st-saved``) in headless Chromium, as the tray opens it."""
    import test_web_browser as wb  # skips (outside CI) without Chromium / Playwright

    from luna_daemon.host import Host

    host = Host(make_settings(), log_to_stderr=False)
    try:
        host.start_monitor()
        host.daemon.start()
        addr, token = host.daemon.address, host.daemon.token
        with DaemonClient(*addr, token=token, timeout=60, identity={"comfyui": "a"}) as a, \
                DaemonClient(*addr, token=token, timeout=60, identity={"comfyui": "b"}) as b, \
                wb.sync_playwright() as p:
            a.vae_load(str(model_dir / "vae_folder"))
            b.vae_load(str(model_dir / "vae_folder"))
            text = summary(a.status()["sharing"])
            assert text.startswith("2 ComfyUI instances share 1 model: saved ")
            browser = p.chromium.launch(executable_path=wb.CHROMIUM, args=wb.ARGS)
            try:
                for width in (1280, 420):
                    page = browser.new_page(viewport={"width": width, "height": 860})
                    wb.open_dashboard(page, host, "status")
                    saved = page.get_by_test_id("memory-saved")
                    wb.expect(saved).to_have_text(text, timeout=wb.WAIT_MS)
                    wb.expect(saved).to_be_visible()
                    wb.shot(page, f"memory-saved-{width}")
                    page.close()
            finally:
                browser.close()
    finally:
        host.close(10)
