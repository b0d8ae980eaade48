"""The tray app, for real.

Part 1 (no screen needed, never skipped): TrayApp with a real Host, a real daemon on free
ports and real pings; only pystray's drawing backend is replaced by a minimal headless
subclass of ``pystray._base.Icon`` (the same base every real backend extends), so the
colours, menu states, notifications and clean Exit are checked on every machine.

Part 2 (``e2e``): the real tray under Xvfb + trayer + a session D-Bus + dunst, with the
GTK backend: launched as ``python luna_daemon/tray_app.py``, looked at through
screenshots and screen pixels, driven through xdotool (right-click, keyboard in the GTK
menu). Screenshots go to ``test-artifacts/tray/``. With ``CI=true`` these tests fail
instead of skipping when the system packages are missing.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tray_helpers import (
    finish_tray_app,
    free_port,
    glyph_state,
    instances_toml,
    listening,
    port_free,
    start_tray_app,
    wait_until,
    write_config,
)

from luna_daemon.instance import ALREADY_RUNNING
from luna_daemon.tray import autostart
from luna_daemon.tray.menu import HEALTHY, InstanceState, TrayState, build_view

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "tray"
TRAY_SCRIPT = ROOT / "luna_daemon" / "tray_app.py"
CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture
def tray_app(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    started: list = []

    def make(**overrides):
        app, host, thread, result = start_tray_app(tmp_path, **overrides)
        started.append((app, host, thread))
        return app, host, thread, result

    yield make
    for app, host, thread in started:
        finish_tray_app(app, host, thread)


# =============================================================================================
# Part 1: TrayApp with a headless pystray backend
# =============================================================================================
def test_trayapp_colours_tell_the_truth(tray_app):
    from luna_daemon import protocol

    app, host, thread, result = tray_app(max_connections=1)
    icon = app.icon
    port = host.settings.port
    wait_until(lambda: app.view.colour == "green", 20, "green")
    # gray at launch, yellow while starting, green only after the tray's own ping.
    assert icon.colours[0] == "gray"
    assert icon.colours.index("yellow") < icon.colours.index("green")
    assert app.state.health == HEALTHY and app.state.daemon == "running"
    assert "port %d" % port in app.view.title

    # Idle health probes (every 0.3 s, real pings) change nothing the user sees: no redraws,
    # and the tray's own probe connections are never shown as clients.
    time.sleep(0.5)
    updates, colours = icon.menu_updates, len(icon.colours)
    time.sleep(1.5)
    assert (icon.menu_updates, len(icon.colours)) == (updates, colours)
    assert app.state.clients == 0 and app.view.colour == "green"

    # Saturate the daemon (max_connections=1): the real ping is refused -> red with the reason.
    # Only an authenticated request in flight holds a slot against newcomers (idle ones are
    # evicted): an echo whose 32 MB answer is not read keeps it in flight.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    holder.connect(("127.0.0.1", port))
    holder.sendall(b"".join(bytes(b) for b in protocol.request(1, "echo", {"reply_shape": [8 * 1024 * 1024]}, host.daemon.token)[0]))
    wait_until(lambda: host.daemon.server.in_flight == 1, 10, "the echo answer to hold the only slot")
    try:
        wait_until(lambda: app.view.colour == "red", 10, "red while the daemon refuses connections")
        assert "max_connections" in app.view.title, app.view.title
        assert app.view.item("status").label.startswith("Not responding")
        wait_until(lambda: any("not responding" in msg for _t, msg in icon.notes), 5, "a notification")
        assert app.view.item("stop").enabled  # a hung daemon must still be stoppable
    finally:
        holder.close()
    wait_until(lambda: app.view.colour == "green", 10, "green again after recovery")

    # A daemon warning becomes a notification; the same text again is rate-limited.
    before = len(icon.notes)
    host.events.emit("warning", message="memory budget pressure on cpu: evicting x.safetensors")
    host.events.emit("warning", message="memory budget pressure on cpu: evicting x.safetensors")
    assert [m for _t, m in icon.notes[before:]] == ["memory budget pressure on cpu: evicting x.safetensors"]

    # Stop from the menu: yellow, then gray, and the port is really closed.
    icon.activate("Stop Daemon")
    wait_until(lambda: app.view.colour == "gray", 20, "gray after Stop")
    assert "yellow" in icon.colours[icon.colours.index("red"):]
    assert port_free(port)
    assert not app.view.item("stop").enabled and app.view.item("start").enabled

    # Check Status while stopped answers honestly.
    icon.activate("Check Status")
    wait_until(lambda: icon.notes and icon.notes[-1][0] == "Luna Daemon status", 10, "status notification")
    assert icon.notes[-1][1].startswith("Stopped")

    # Start again -> green; Exit -> run() returns 0 and all ports are free.
    icon.activate("Start Daemon")
    wait_until(lambda: app.view.colour == "green", 20, "green after Start")
    icon.activate("Exit")
    thread.join(30)
    assert not thread.is_alive() and result["code"] == 0
    assert port_free(port) and port_free(host.lock.port)


def test_tray_health_probes_are_not_client_traffic(tray_app):
    """Issue 12 #12: supervision (the tray's pings and status calls) is not counted as
    requests or clients, and emits no client / request events (the dashboard's log lines)."""
    from luna_daemon.client import DaemonClient

    app, host, thread, result = tray_app()
    seen: list = []
    unsubscribe = host.events.subscribe(lambda e: seen.append(e.type))
    try:
        wait_until(lambda: app.view.colour == "green", 20, "green")
        for _ in range(4):  # menu opens: probes with a status call, besides the 0.3 s pings
            app._want_probe(status=True)
            time.sleep(0.4)
        time.sleep(1.0)  # several more health intervals
        client_events = {"client_connected", "client_disconnected", "request", "request_failed"}
        assert not client_events & set(seen), seen
        assert host.daemon.service.stats.snapshot()["total"] == 0
        assert host.daemon.snapshot()["clients"] == 0
        n0 = len(app.icon.notes)
        app.icon.activate("Check Status")
        wait_until(lambda: len(app.icon.notes) > n0, 10, "the status notification")
        assert "0 clients · 0 requests (0 failed)" in app.icon.notes[-1][1], app.icon.notes[-1]

        # A real client is still a client: counted, announced, shown.
        with DaemonClient("127.0.0.1", host.settings.port, token=host.daemon.token) as c:
            c.ping()
            assert host.daemon.snapshot()["clients"] == 1
            wait_until(lambda: app.state.clients == 1, 10, "the tray to show the real client")
        wait_until(lambda: "client_disconnected" in seen, 10, "the real client's disconnect")
        assert seen.count("client_connected") == 1
        assert host.daemon.service.stats.snapshot()["total"] == 1
        wait_until(lambda: app.state.clients == 0, 10, "the client gone from the status line")
    finally:
        unsubscribe()


def test_supervisor_role_needs_the_token(tray_app):
    """A program without the token cannot hide its traffic from the stats."""
    from luna_daemon.client import DaemonClient, DaemonError

    app, host, thread, result = tray_app()
    wait_until(lambda: app.view.colour == "green", 20, "green")
    port = host.settings.port
    with DaemonClient("127.0.0.1", port, token="not-the-token", supervisor=True) as c:
        with pytest.raises(DaemonError) as err:
            c.ping()
        assert err.value.code == "unauthorized"
    with DaemonClient("127.0.0.1", port, token=host.daemon.token) as c:
        with pytest.raises(DaemonError) as err:
            c.call("hello", {"role": "supervisor"})  # hello carries no token
        assert err.value.code == "unauthorized"
        with pytest.raises(DaemonError) as err:
            c.call("hello", {"role": ["x"] * 5})
        assert err.value.code == "bad_args"
        by_op = c.status()["requests"]["by_op"]
    assert by_op["hello"] == {"unauthorized": 2, "bad_args": 1}, by_op
    assert host.daemon.snapshot()["state"] == "running"


def _fake_opener(bindir: Path, body: str) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    opener = bindir / "xdg-open"
    opener.write_text("#!/bin/sh\n" + body + "\n")
    opener.chmod(opener.stat().st_mode | stat.S_IEXEC)


def _zombies() -> list:
    import psutil

    return [c for c in psutil.Process().children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("opener", ["exits 4", "missing"])
def test_trayapp_says_what_to_open_by_hand_when_the_opener_fails(tray_app, tmp_path, monkeypatch, opener):
    """Issue 12 #10: xdg-open failing (rc 4, as seen) or absent gives a notification with the
    URL / path to open by hand, and leaves no zombie child."""
    bindir = tmp_path / "bin"
    if opener == "exits 4":
        _fake_opener(bindir, "exit 4")
    else:
        bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))  # a browser-less desktop: nothing else to find
    app, host, thread, result = tray_app(monitor=True)
    secrets: list[str] = []
    for label, what in (("Open Dashboard", "the dashboard"), ("View Logs", "the log viewer")):
        n0 = len(app.icon.notes)
        app.icon.activate(label)
        title, msg = wait_until(lambda: app.icon.notes[n0:] and app.icon.notes[-1], 15, f"a notification for {label}")
        assert title.startswith(f"Luna Daemon: could not open {what}"), title
        assert msg.startswith("Could not open a browser") and "by hand" in msg, msg
        assert f"http://127.0.0.1:{host.settings.monitor_port}/" in msg, msg
        assert ("exited with code 4" in msg) == (opener == "exits 4"), msg
        if label == "View Logs":
            assert str(host.settings.log_file) in msg
        secrets.append(msg.split("#", 1)[1].split()[0])  # the URL's one-time login secret
    assert _zombies() == []
    # The log file says the same, but never with the login secret.
    log_text = host.settings.log_file.read_text()
    assert "by hand" in log_text and not any(sec in log_text for sec in secrets), secrets


def test_open_target_reaps_an_opener_that_outlives_its_wait(tmp_path, monkeypatch):
    import psutil

    from luna_daemon.tray.app import open_target

    bindir = tmp_path / "bin"
    _fake_opener(bindir, "sleep 1; exit 0")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin:/bin")
    before = {c.pid for c in psutil.Process().children()}  # other tests' children (a display...)
    open_target("http://127.0.0.1:1/", wait=0.1)  # still running: taken as success
    kids = [c for c in psutil.Process().children() if c.pid not in before]
    assert kids, "the opener should still run"

    def reaped() -> bool:  # gone, not a zombie: its exit status was collected
        return not any(k.pid in {c.pid for c in psutil.Process().children()} for k in kids)

    wait_until(reaped, 10, "the opener to exit and be reaped")
    _fake_opener(bindir, "exit 3")
    with pytest.raises(OSError, match="exited with code 3"):
        open_target("/no/such/file")
    assert _zombies() == []


def test_trayapp_start_failure_is_red_with_reason(tray_app):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        app, host, thread, result = tray_app(port=port)
        wait_until(lambda: app.view.colour == "red", 20, "red when the port is taken")
        assert "already in use" in app.view.title and str(port) in app.view.title
        # (The notification follows the redraw on the daemon's thread: wait for it.)
        wait_until(lambda: any("already in use" in m for _t, m in app.icon.notes), 5, "the error notification")
        # exactly one notification for one failure (state=error and the warning are merged)
        assert sum("already in use" in m for _t, m in app.icon.notes) == 1
        assert app.view.item("start").enabled and not app.view.item("stop").enabled
    finally:
        blocker.close()
    app.icon.activate("Start Daemon")
    wait_until(lambda: app.view.colour == "green", 20, "green after the port was freed")
    app.request_exit()
    thread.join(30)
    assert result["code"] == 0


def test_trayapp_unload_and_start_at_login(tray_app, tmp_path, model_dir):
    from luna_daemon.client import DaemonClient

    app, host, thread, result = tray_app(model_roots=[str(model_dir)])
    wait_until(lambda: app.view.colour == "green", 20, "green")
    assert not app.view.item("unload").enabled  # nothing loaded yet
    with DaemonClient("127.0.0.1", host.settings.port, token=host.daemon.token, timeout=60) as c:
        c.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))
        wait_until(lambda: app.state.models == 1, 10, "the status line to count the model")
        # one real client is connected; the tray's own probes (every 0.3 s) are not counted
        app._want_probe(status=True)
        time.sleep(1.0)
        label = app.view.item("status").label
        assert label.startswith("Running · 1 model · 1 client · ") and label.endswith(("KiB", "MiB")), label
        assert app.state.memory_bytes > 0  # the loaded model's bytes, from a real status call
    wait_until(lambda: app.state.clients == 0, 10, "the client to be gone from the status line")
    assert "1 model" in app.view.item("status").label and app.view.item("unload").enabled
    app.icon.activate("Unload All Models")
    wait_until(lambda: app.state.models == 0, 20, "models unloaded")
    assert host.daemon.registry is not None and host.daemon.registry.entries() == []

    # Start at Login: the checkbox is what is on disk, both ways.
    assert app.view.item("autostart").checked is False
    app.icon.activate("Start at Login")
    wait_until(lambda: app.view.item("autostart").checked is True, 10, "checked")
    path = autostart.entry_path()
    assert path.is_file() and str(tmp_path / "xdg") in str(path)
    assert "-m luna_daemon tray" in path.read_text()
    app.icon.activate("Start at Login")
    wait_until(lambda: app.view.item("autostart").checked is False, 10, "unchecked")
    assert not path.exists()
    app.request_exit()
    thread.join(30)
    assert result["code"] == 0


def _pings(port: int, token: str) -> bool:
    from luna_daemon.client import DaemonClient

    with DaemonClient("127.0.0.1", port, token=token, timeout=10) as c:
        return c.ping()["pong"] is True


def _children_named(pid: int, name: str) -> list:
    """The ``serve --instance NAME`` child processes of ``pid`` (psutil.Process list)."""
    import psutil

    out = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            argv = c.cmdline()
        except psutil.Error:
            continue
        if "--instance" in argv and argv[argv.index("--instance") + 1:][:1] == [name]:
            out.append(c)
    return out


def _wait_status(app, want: str, timeout: float) -> None:
    """The status line to start with ``want`` (an unclean stop under load adds its reason)."""
    try:
        wait_until(lambda: app.view.status.startswith(want), timeout, repr(want))
    except AssertionError:
        raise AssertionError(f"status line {app.view.status!r} after {timeout}s, wanted {want!r}") from None


@pytest.mark.timeout(240)
def test_trayapp_supervises_two_instances(tray_app, tmp_path, monkeypatch):
    """Issue 14: a VAE and a CLIP instance in one tray -- worst colour, a status line and a
    submenu per instance, a killed child red then green again, one stopped alone."""
    import signal

    import psutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the child (serve --instance clip) inherits it
    vae_port, clip_port = free_port(), free_port()
    # The primary listens on the top-level port (the override beats a table's, see instances.py).
    app, host, thread, result = tray_app(port=vae_port, instances=[dict(name="vae", service="vae"),
                                                                   dict(name="clip", service="clip", port=clip_port)])
    icon = app.icon
    assert app.multi and list(host.instances) == ["vae", "clip"]
    wait_until(lambda: app.view.colour == "green", 60, "green with both instances up")
    assert app.view.status == "vae: running · clip: running"
    assert f"vae: running (port {vae_port})" in app.view.title and f"clip: running (port {clip_port})" in app.view.title
    token = host.daemon.token
    assert _pings(vae_port, token) and _pings(clip_port, token)
    labels = [it.text for it in icon.menu.items if it.text != "- - - -"]  # pystray.Menu.SEPARATOR
    assert labels[:6] == ["vae: running · clip: running", "Start Daemon", "Stop Daemon", "Check Status",
                          "vae: running", "clip: running"]
    clip_row = next(i for i in icon.menu.items if i.text == "clip: running")
    assert [i.text for i in clip_row.submenu.items] == ["Start", "Stop", "Check Status"]

    # Check Status lists every instance, each from a real status call.
    n0 = len(icon.notes)
    icon.activate("Check Status")
    title, body = wait_until(lambda: icon.notes[n0:] and icon.notes[-1], 15, "the status notification")
    assert title == "Luna Daemon status"
    lines = body.splitlines()
    assert lines[0].startswith(f"vae: Running on port {vae_port}") and lines[1].startswith(f"clip: Running on port {clip_port}"), body

    # SIGKILL the child: red (naming it), then green again after the host restarted it.
    child = wait_until(lambda: _children_named(os.getpid(), "clip"), 10, "the clip child process")[0]
    seen = len(icon.colours)
    n0 = len(icon.notes)
    child.send_signal(signal.SIGKILL)
    wait_until(lambda: "red" in icon.colours[seen:], 30, "red after the child was killed")
    # One notification for one failure, naming the instance and the reason.
    wait_until(lambda: any(msg.startswith("Daemon 'clip' error: killed by signal 9") for _t, msg in icon.notes[n0:]),
               10, "the notification naming clip")
    wait_until(lambda: app.view.colour == "green" and app.view.status == "vae: running · clip: running",
               60, "green again after the restart")
    assert icon.colours[-1] == "green"
    new_child = _children_named(os.getpid(), "clip")
    assert new_child and new_child[0].pid != child.pid
    assert _pings(clip_port, token)

    # Stop one instance from its submenu: the other keeps serving; stopped on purpose = green.
    icon.activate("clip: running", "Stop")
    _wait_status(app, "vae: running · clip: stopped", 60)
    assert app.view.colour == "green"
    assert _pings(vae_port, token)
    wait_until(lambda: port_free(clip_port), 15, "the clip port to be free")
    assert not app.view.item("stop:clip").enabled and app.view.item("start:clip").enabled
    n0 = len(icon.notes)
    icon.activate(app.view.item("instance:clip").label, "Check Status")  # "clip: stopped"
    title, body = wait_until(lambda: icon.notes[n0:] and icon.notes[-1], 15, "the clip status notification")
    assert title == "Luna Daemon status: clip" and body.startswith("stopped"), (title, body)

    # Start Daemon acts on all: clip comes back; Stop Daemon stops both -> gray.
    icon.activate("Start Daemon")
    _wait_status(app, "vae: running · clip: running", 60)
    wait_until(lambda: app.view.colour == "green", 30, "green with both again")
    assert _pings(clip_port, token)
    icon.activate("Stop Daemon")
    wait_until(lambda: app.view.colour == "gray", 60, "gray with both stopped")
    assert app.view.status.startswith("vae: stopped") and " · clip: stopped" in app.view.status, app.view.status
    assert port_free(vae_port) and port_free(clip_port)

    # Exit: run() returns 0, no child left behind.
    icon.activate("Start Daemon")
    wait_until(lambda: app.view.colour == "green", 60, "green before Exit")
    pid = _children_named(os.getpid(), "clip")[0].pid
    icon.activate("Exit")
    thread.join(60)
    assert not thread.is_alive() and result["code"] == 0
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15,
               "the clip child to exit")
    assert port_free(vae_port) and port_free(clip_port)


@pytest.mark.timeout(240)
def test_a_frozen_instance_does_not_hold_up_the_other_instances_probe(tray_app, monkeypatch):
    """A SIGSTOPped child accepts TCP but never answers: its probe waits out its whole
    timeout. The other instance, started meanwhile, must still turn green right after its
    own ping -- not behind the frozen one's probe -- and the frozen one turns red by itself."""
    import psutil

    from luna_daemon.tray.menu import FAILING

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the child (serve --instance clip) inherits it
    # The tray's probe timeout is min(10, max(2, health_interval)): 6 s per hung read here,
    # far longer than a start plus one ping of an idle daemon.
    interval = 6.0
    vae_port, clip_port = free_port(), free_port()
    app, host, thread, result = tray_app(port=vae_port, health_interval=interval,
                                         instances=[dict(name="vae", service="vae"),
                                                    dict(name="clip", service="clip", port=clip_port)])
    wait_until(lambda: app.view.colour == "green", 60, "green with both instances up")
    app.click("stop:vae")
    wait_until(lambda: app.instance_state("vae").daemon == "stopped", 30, "vae stopped")
    running_at: list[float] = []

    def on_event(e) -> None:
        if e.type == "state" and (e.data.get("instance") or "vae") == "vae" and e.data.get("state") == "running":
            running_at.append(time.monotonic())

    unsubscribe = host.events.subscribe(on_event)
    child = psutil.Process(host.instance("clip").snapshot()["pid"])
    child.suspend()
    try:
        app._want_probe()  # a probe of the frozen clip starts now and hangs until its timeout
        time.sleep(0.3)
        app.click("start:vae")
        wait_until(lambda: running_at, 30, "vae running again")
        wait_until(lambda: app.instance_state("vae").health == HEALTHY, 4 * interval, "vae's own probe")
        healthy_after = time.monotonic() - running_at[0]
        # One ping of a local idle daemon plus scheduling; the hung probe would add ~6 s.
        assert healthy_after < 2.0, f"vae turned green {healthy_after:.1f}s after it ran: it waited behind clip"
        assert app.instance_state("clip").daemon == "running"  # the supervisor has not killed it yet
        wait_until(lambda: app.instance_state("clip").health == FAILING, 4 * interval, "the frozen clip red")
        assert app.view.colour == "red" and "clip: not responding" in app.view.status, app.view.status
    finally:
        unsubscribe()
        try:
            child.resume()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.timeout(240)
def test_check_status_asks_every_instance_at_once(tray_app, monkeypatch):
    """Two frozen children (SIGSTOP: they accept TCP, never answer): Check Status waits out
    one probe timeout, not one per frozen instance in turn, and names both."""
    import psutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    interval = 4.0  # probe timeout min(10, max(2, interval)) = 4 s per hung read
    app, host, thread, result = tray_app(port=free_port(), health_interval=interval,
                                         instances=[dict(name="main", service="full"),
                                                    dict(name="vae", service="vae", port=free_port()),
                                                    dict(name="clip", service="clip", port=free_port())])
    wait_until(lambda: app.view.colour == "green", 90, "green with all three instances up")
    children = [psutil.Process(host.instance(n).snapshot()["pid"]) for n in ("vae", "clip")]
    for child in children:
        child.suspend()
    try:
        n0 = len(app.icon.notes)
        t0 = time.monotonic()
        app.click("check")
        replies = lambda: [m for t, m in app.icon.notes[n0:] if t == "Luna Daemon status"]  # noqa: E731
        wait_until(replies, 60, "the status notification")  # (health alerts come too, titled otherwise)
        took = time.monotonic() - t0
        text = replies()[0]
        assert "vae: Not responding" in text and "clip: Not responding" in text, text
        assert text.startswith("main: "), text
        # One probe timeout (plus a status read of main); in turn it would be >= 2 timeouts.
        assert took < 1.6 * interval, f"Check Status took {took:.1f}s: the frozen instances were asked in turn"
    finally:
        for child in children:
            try:
                child.resume()
            except psutil.NoSuchProcess:
                pass


# =============================================================================================
# Part 2: the real tray on a virtual screen
# =============================================================================================
def _session_or_skip():
    from luna_daemon.tray.xsession import missing_tools

    missing = missing_tools() if sys.platform.startswith("linux") else ["Linux with X11 tools"]
    if missing:
        reason = "system packages for the real-tray test are missing: " + ", ".join(missing) + \
                 " (install them with scripts/system-deps.sh as root)"
        if CI:
            pytest.fail("CI=true: " + reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def xs(tmp_path_factory):
    _session_or_skip()
    from luna_daemon.tray.xsession import XSession

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "index.txt").unlink(missing_ok=True)  # the index lists this run's screenshots
    session = XSession(tmp_path_factory.mktemp("xsession")).start()
    yield session
    session.stop()


def shot(xs, name: str) -> Path:
    path = xs.screenshot(ARTIFACTS / f"{name}.png")
    print(f"screenshot: {path}")
    with open(ARTIFACTS / "index.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{path}\n")
    return path


class RealTray:
    """``python luna_daemon/tray_app.py`` in the virtual session, on free ports."""

    WM_CLASS = "tray_app.py"  # the GTK backend names its windows after the script

    def __init__(self, xs, tmp: Path, instances: list[dict] | None = None, **settings: str):
        self.xs = xs
        self.tmp = tmp
        if instances:  # [[instances]] in the config file under LUNA_HOME
            write_config(tmp / "luna", instances_toml(instances))
        self.port, self.monitor_port, self.lock_port = free_port(), free_port(), free_port()
        self.port = int(settings.pop("port", self.port))
        bindir = tmp / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        self.opened = tmp / "opened.txt"
        opener = bindir / "xdg-open"  # records what the tray asks the desktop to open
        # LUNA_TEST_OPEN_RC: its exit code (4 = what xdg-open says without a browser).
        opener.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >> "$LUNA_TEST_OPENED"\nexit "${LUNA_TEST_OPEN_RC:-0}"\n')
        opener.chmod(opener.stat().st_mode | stat.S_IEXEC)
        env = xs.env()
        env.update(
            PYSTRAY_BACKEND="gtk", LUNA_HOME=str(tmp / "luna"), HOME=str(tmp / "home"),
            XDG_CONFIG_HOME=str(tmp / "xdg"), LUNA_PORT=str(self.port), LUNA_MONITOR_PORT=str(self.monitor_port),
            LUNA_LOCK_PORT=str(self.lock_port), LUNA_ENGINE="standalone", HF_HUB_OFFLINE="1",
            LUNA_TEST_OPENED=str(self.opened), PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        for k, v in settings.items():
            env[f"LUNA_{k.upper()}"] = str(v)
        self.env = env
        self.log = tmp / "luna" / "logs" / "luna-daemon.log"
        self.out = open(tmp / "tray.out", "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(TRAY_SCRIPT)], cwd=str(tmp), env=env,
                                     stdout=self.out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return (self.tmp / "tray.out").read_text(errors="replace")

    def wait_docked(self, timeout: float = 30):
        icons = wait_until(lambda: self._alive() and self.xs.docked_icons(self.WM_CLASS), timeout, "the icon docked in trayer")
        return icons[0]

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"tray exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        return True

    def wait_colour(self, colour: str, timeout: float = 30) -> float:
        """Wait for the docked icon's colour, then check its glyph reads the same state in
        grayscale (issue 16: a state must not be told by colour alone)."""
        wait_until(lambda: self._alive() and self.xs.panel_colour() == colour, timeout,
                   f"the docked icon to turn {colour}", interval=0.03)
        took = time.monotonic() - self.started
        try:
            wait_until(lambda: self.glyph() == colour, 5, f"the {colour} state's glyph on screen (grayscale)")
        except AssertionError as e:
            grab = ARTIFACTS / f"glyph-not-{colour}.png"
            self.xs.grab(self.wait_docked(5).rect).save(grab)
            raise AssertionError(f"{e}; the icon as grabbed: {grab}") from None
        return took

    def glyph(self) -> str | None:
        icon = self.wait_docked(5)
        return glyph_state(self.xs.grab(icon.rect))

    def open_menu(self):
        icon = self.wait_docked(10)
        self.xs.right_click(*icon.rect.centre)
        menu = wait_until(lambda: self.xs.menus(self.WM_CLASS), 10, "the menu window")[0]
        self.xs.park_mouse()  # a pointer over the menu would select items under it
        time.sleep(0.3)  # let GTK finish mapping and drawing the popup
        return menu

    def activate(self, key: str, state: TrayState, screenshot: str | None = None, sub: str | None = None) -> None:
        """Open the menu and activate ``key`` with the keyboard, as a user can; ``sub``: then
        open ``key``'s submenu (Right) and activate ``sub`` in it.

        GTK's keyboard navigation skips disabled rows and separators, so the number of
        presses is the item's position among the enabled ones in the view for ``state``.
        """
        view = build_view(state)
        enabled = [it.key for it in view.items if not it.separator and it.enabled]
        assert key in enabled, f"{key} is not enabled in {state}"
        i = enabled.index(key)
        self.open_menu()
        presses = ["Down"] * (i + 1) if i < len(enabled) - i else ["Up"] * (len(enabled) - i)
        self.xs.keys(*presses)
        if sub is not None:
            inner = [it.key for it in view.item(key).submenu if it.enabled]
            assert sub in inner, f"{sub} is not enabled in {state}"
            # Right opens the submenu with its first enabled row selected.
            time.sleep(0.2)
            self.xs.keys("Right")
            time.sleep(0.3)
            if inner.index(sub):
                self.xs.keys(*["Down"] * inner.index(sub))
        time.sleep(0.2)
        if screenshot:
            shot(self.xs, screenshot)
        self.xs.keys("Return")
        wait_until(lambda: not self.xs.menus(self.WM_CLASS), 10, "the menu to close")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()


@pytest.fixture
def real_tray(xs, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    trays: list[RealTray] = []

    def make(**settings) -> RealTray:
        t = RealTray(xs, tmp_path / f"tray{len(trays)}", **settings)
        trays.append(t)
        return t

    yield make
    for t in trays:
        t.stop()
    wait_until(lambda: not xs.docked_icons(RealTray.WM_CLASS), 15, "no icon left in the tray")


def _notified(xs, since: int, pred, timeout: float, what: str) -> dict:
    return wait_until(lambda: next((n for n in xs.notifications()[since:] if pred(n)), None), timeout, what)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_real_tray_end_to_end(xs, real_tray):
    from luna_daemon.client import DaemonClient
    from luna_daemon.settings import Settings

    # Autostart after 3 s so the gray start is observable on screen.
    tray = real_tray(autostart_delay="3")
    tray.wait_docked(30)
    # Docked is not yet painted: on a loaded machine the first frame can lag the embed.
    first = wait_until(xs.panel_colour, 5, "the docked icon to be drawn", interval=0.03)
    assert first == "gray", "the icon must start gray"
    shot(xs, "01-docked-gray")

    green_after = tray.wait_colour("green", 40)
    shot(xs, "02-green")
    print(f"launch -> green: {green_after:.2f}s (autostart_delay 3s)")
    log_text = tray.log.read_text()
    assert log_text.index("tray icon gray") < log_text.index("tray icon yellow") < log_text.index("tray icon green")
    token = Settings.load(env={"LUNA_HOME": tray.env["LUNA_HOME"]}).token_path.read_text().strip()
    with DaemonClient("127.0.0.1", tray.port, token=token, timeout=10) as c:
        assert c.ping()["pong"] is True
    monitor_up = listening(tray.monitor_port)
    running = TrayState(daemon="running", health=HEALTHY, dashboard=monitor_up)

    # A second launch is refused and makes the first one show its status.
    n0 = len(xs.notifications())
    second = subprocess.run([sys.executable, str(TRAY_SCRIPT)], env=tray.env, cwd=str(tray.tmp),
                            capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert ALREADY_RUNNING in second.stdout
    note = _notified(xs, n0, lambda n: n["summary"] == "Luna Daemon is already running", 15, "the 'show' notification")
    assert note["body"].startswith(f"Running on port {tray.port}"), note
    shot(xs, "03-second-launch-notification")

    # Right-click opens the GTK menu.
    menu = tray.open_menu()
    path = shot(xs, "04-menu-open")
    from PIL import Image

    region = Image.open(path).convert("RGB").crop((menu.rect.x, menu.rect.y, menu.rect.x + menu.rect.w, menu.rect.y + menu.rect.h))
    light = sum(1 for px in region.getdata() if sum(px) > 600)
    assert light > 0.5 * menu.rect.w * menu.rect.h, "the menu window is not drawn"
    assert menu.rect.h > 200, "expected ten rows and separators"
    xs.keys("Escape")
    wait_until(lambda: not xs.menus(RealTray.WM_CLASS), 10, "the menu to close")

    # Stop Daemon -> gray and the port is freed.
    tray.activate("stop", running, screenshot="05-menu-stop-selected")
    tray.wait_colour("gray", 60)
    wait_until(lambda: port_free(tray.port), 10, "the daemon port to be free")
    shot(xs, "06-stopped-gray")

    # Start Daemon -> green again.
    tray.activate("start", TrayState(daemon="stopped", dashboard=monitor_up))
    tray.wait_colour("green", 40)
    shot(xs, "07-restarted-green")

    # Check Status -> a real status call and a notification with its summary.
    n0 = len(xs.notifications())
    tray.activate("check", running)
    note = _notified(xs, n0, lambda n: n["summary"] == "Luna Daemon status", 15, "the status notification")
    assert note["body"].startswith("Running on port %d" % tray.port) and "engine" in note["body"]
    shot(xs, "08-check-status-notification")
    # Issue 12 #12: the real tray's start ping, health pings and Check Status are supervision,
    # not client traffic: the restarted daemon has counted no request and no other client.
    with DaemonClient("127.0.0.1", tray.port, token=token, timeout=10) as c:
        st = c.status()
    assert st["requests"]["total"] == 0, st["requests"]
    assert st["clients"] <= 1, st  # at most this client

    # View Logs -> the dashboard's log page when the monitor runs, else the log file;
    # always through the desktop's opener (xdg-open), never a fixed editor.
    tray.activate("logs", running)
    opened = wait_until(lambda: tray.opened.exists() and tray.opened.read_text().strip(), 10, "xdg-open to be called")
    if monitor_up:
        assert opened.startswith(f"http://127.0.0.1:{tray.monitor_port}/"), opened
    else:
        assert opened == str(tray.log), opened

    # Start at Login -> an XDG autostart file; the checkbox shows it; again -> removed.
    desktop = Path(tray.env["XDG_CONFIG_HOME"]) / "autostart" / autostart.DESKTOP_NAME
    tray.activate("autostart", running)
    wait_until(desktop.is_file, 10, "the autostart .desktop file")
    tray.open_menu()
    shot(xs, "09-start-at-login-checked")
    xs.keys("Escape")
    wait_until(lambda: not xs.menus(RealTray.WM_CLASS), 10, "the menu to close")
    tray.activate("autostart", running.with_(autostart=True))
    wait_until(lambda: not desktop.exists(), 10, "the autostart file to be removed")

    # Exit -> exit code 0, icon gone, all three ports free.
    tray.activate("exit", running)
    assert tray.proc.wait(60) == 0, tray.output()[-3000:]
    wait_until(lambda: not xs.docked_icons(RealTray.WM_CLASS), 15, "the icon to leave the tray")
    for name, port in (("daemon", tray.port), ("monitor", tray.monitor_port)):
        assert port_free(port), f"{name} port {port} still in use after Exit"
    # The lock port is free too: nobody listens, and it can be bound again right away
    # (even after the refused launch above left TIME_WAIT connections on it).
    assert not listening(tray.lock_port), "the lock port is still held after Exit"
    assert port_free(tray.lock_port), f"lock port {tray.lock_port} cannot be bound again after Exit"
    shot(xs, "10-exited")


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_real_tray_red_when_port_taken_then_recovers(xs, real_tray):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        n0 = len(xs.notifications())
        tray = real_tray(port=str(port), autostart_delay="0")
        tray.wait_docked(30)
        tray.wait_colour("red", 40)
        note = _notified(xs, n0, lambda n: "already in use" in n["body"], 15, "the error notification")
        assert str(port) in note["body"]
        shot(xs, "11-port-taken-red")
        # Issue 12 #11: the red row holds a short reason, so the menu stays narrow (it was
        # ~600 px with the whole message); Check Status gives the whole reason, uncut.
        monitor_up = listening(tray.monitor_port)
        red = TrayState(daemon="error", detail="x", dashboard=monitor_up)
        menu = tray.open_menu()
        shot(xs, "11b-red-menu")
        print(f"red menu width: {menu.rect.w}px")
        assert menu.rect.w < 450, f"the red menu is {menu.rect.w}px wide"
        xs.keys("Escape")
        wait_until(lambda: not xs.menus(RealTray.WM_CLASS), 10, "the menu to close")
        n0 = len(xs.notifications())
        tray.activate("check", red)
        note = _notified(xs, n0, lambda n: n["summary"] == "Luna Daemon status", 15, "the red Check Status notification")
        assert "already in use" in note["body"] and "luna-daemon stop" in note["body"], note  # the end of the message
    finally:
        blocker.close()
    tray.activate("start", TrayState(daemon="error", detail="x", dashboard=monitor_up))
    tray.wait_colour("green", 40)
    shot(xs, "12-recovered-green")
    tray.proc.terminate()  # SIGTERM = a clean Exit too (logout, service managers)
    assert tray.proc.wait(60) == 0
    for p in (tray.port, tray.monitor_port, tray.lock_port):
        assert port_free(p)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_real_tray_says_what_to_open_when_xdg_open_fails(xs, real_tray):
    """Issue 12 #10: xdg-open exits 4 -> a notification with the URL to open by hand; the
    opener is reaped (no zombie child of the tray)."""
    import psutil

    tray = real_tray(test_open_rc="4")
    tray.wait_colour("green", 40)
    monitor_up = listening(tray.monitor_port)
    running = TrayState(daemon="running", health=HEALTHY, dashboard=monitor_up)
    for key in ("dashboard", "logs") if monitor_up else ("logs",):
        n0 = len(xs.notifications())
        tray.activate(key, running)
        note = _notified(xs, n0, lambda n: "by hand" in n["body"], 20, f"the could-not-open notification ({key})")
        assert "exited with code 4" in note["body"], note
        want = f"http://127.0.0.1:{tray.monitor_port}/" if monitor_up else str(tray.log)
        assert want in note["body"], note
        shot(xs, f"13-could-not-open-{key}")
    kids = psutil.Process(tray.proc.pid).children(recursive=True)
    assert not [k for k in kids if k.status() == psutil.STATUS_ZOMBIE], kids


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_real_tray_that_cannot_start_falls_back_to_headless(xs, tmp_path):
    """A display but no session bus: the GTK backend fails; the daemon must still serve."""
    from luna_daemon.client import DaemonUnavailable, wait_for_daemon

    port, monitor_port, lock_port = free_port(), free_port(), free_port()
    env = xs.env()
    env.update(PYSTRAY_BACKEND="gtk", DBUS_SESSION_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus", LUNA_HOME=str(tmp_path / "luna"),
               HOME=str(tmp_path / "home"), LUNA_PORT=str(port), LUNA_MONITOR_PORT=str(monitor_port),
               LUNA_LOCK_PORT=str(lock_port), LUNA_ENGINE="standalone", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(TRAY_SCRIPT)], env=env, cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:  # fails at once if the host exits: it must keep running without its tray
            wait_for_daemon("127.0.0.1", port, 60, proc=proc, token="")
        except DaemonUnavailable as exc:
            pytest.fail(f"the daemon did not serve without a tray: {exc}")
        log_text = (tmp_path / "luna" / "logs" / "luna-daemon.log").read_text()
        assert "the system tray failed" in log_text and "running the daemon headless" in log_text
    finally:
        proc.terminate()
        assert proc.wait(60) == 0  # and it is not kept alive by pystray's setup thread
    for p in (port, monitor_port, lock_port):
        assert port_free(p)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_real_tray_two_instances(xs, real_tray):
    """Issue 14 on screen: a VAE and a CLIP instance (the CLIP one a child process) in the
    GTK tray -- green, SIGKILL of the child -> red -> green, clip stopped from its submenu
    while vae keeps answering, the status line naming both."""
    import signal

    import psutil

    from luna_daemon.settings import Settings

    clip_port = free_port()
    # The primary (vae) listens on the tray's LUNA_PORT; the child on its table's port.
    tray = real_tray(autostart_delay="0", instances=[dict(name="vae", service="vae"),
                                                     dict(name="clip", service="clip", port=clip_port)])
    vae_port = tray.port
    tray.wait_docked(30)
    tray.wait_colour("green", 60)
    shot(xs, "20-two-instances-green")
    token = Settings.load(env={"LUNA_HOME": tray.env["LUNA_HOME"]}).token_path.read_text().strip()
    assert _pings(vae_port, token) and _pings(clip_port, token)
    # The status line / title name both (the title is logged with every colour change).
    both = f"vae: running (port {vae_port}) · clip: running (port {clip_port})"
    wait_until(lambda: both in tray.log.read_text(), 10, "the green title naming both instances")
    monitor_up = listening(tray.monitor_port)

    def state(clip: str = "running") -> TrayState:
        return TrayState(dashboard=monitor_up, instances=(
            InstanceState("vae", "vae", "running", health=HEALTHY, port=vae_port),
            InstanceState("clip", "clip", clip, health=HEALTHY, port=clip_port)))

    menu = tray.open_menu()
    shot(xs, "21-two-instances-menu")
    assert menu.rect.h > 250, "expected the instance rows besides the usual ones"
    xs.keys("Escape")
    wait_until(lambda: not xs.menus(RealTray.WM_CLASS), 10, "the menu to close")

    # SIGKILL the child: red with its exit reason, then green after the host restarted it.
    child = wait_until(lambda: _children_named(tray.proc.pid, "clip"), 10, "the clip child")[0]
    n0 = len(xs.notifications())
    child.send_signal(signal.SIGKILL)
    tray.wait_colour("red", 30)
    _notified(xs, n0, lambda n: n["body"].startswith("Daemon 'clip' error: killed by signal 9"), 15,
              "the notification naming the instance")
    shot(xs, "22-child-killed-red")
    assert _pings(vae_port, token)  # the other instance never stopped serving
    tray.wait_colour("green", 60)
    shot(xs, "23-child-restarted-green")
    assert _children_named(tray.proc.pid, "clip")[0].pid != child.pid
    assert _pings(clip_port, token)
    log_text = tray.log.read_text()
    red_line = next(line for line in log_text.splitlines() if "tray icon red" in line)
    assert "clip: error" in red_line or "clip: not responding" in red_line, red_line

    # Stop clip from its own submenu: vae still answers, the icon stays green.
    tray.activate("instance:clip", state(), screenshot="24-clip-submenu-stop", sub="stop:clip")
    wait_until(lambda: port_free(clip_port), 60, "the clip port to be free")
    wait_until(lambda: not _children_named(tray.proc.pid, "clip"), 30, "the clip child to exit")
    assert _pings(vae_port, token)
    tray.wait_colour("green", 10)  # stopped on purpose: the running one decides
    shot(xs, "25-clip-stopped-green")

    # Its submenu starts it again.
    tray.activate("instance:clip", state("stopped"), sub="start:clip")
    wait_until(lambda: _children_named(tray.proc.pid, "clip"), 30, "a new clip child")
    wait_until(lambda: listening(clip_port), 60, "clip serving again")
    tray.wait_colour("green", 60)
    assert _pings(clip_port, token)

    # SIGTERM = Exit: code 0, no child left, every port free.
    pids = [c.pid for c in _children_named(tray.proc.pid, "clip")]
    tray.proc.terminate()
    assert tray.proc.wait(60) == 0, tray.output()[-3000:]
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 15, "the child to exit with the tray")
    for p in (vae_port, clip_port, tray.monitor_port, tray.lock_port):
        assert port_free(p)
