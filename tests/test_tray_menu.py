"""The tray's view model and notification policy -- pure, no screen, no pystray (icons: test_icons.py)."""

from __future__ import annotations

import pytest

from luna_daemon.tray.app import tray_unavailable_reason
from luna_daemon.tray.menu import (
    FAILING,
    HEALTHY,
    MENU_KEYS,
    REASON_MAX,
    STATUS_MAX,
    TITLE_MAX,
    UNKNOWN,
    InstanceState,
    TrayState,
    build_view,
    colour_for,
    short_reason,
    status_summary,
)
from luna_daemon.tray.notify import Notifier

# (state, expected colour, enabled keys among the actionable items)
ALWAYS = {"check", "logs", "autostart", "exit"}
CASES = [
    (TrayState(daemon="stopped"), "gray", ALWAYS | {"start"}),
    (TrayState(daemon="starting"), "yellow", ALWAYS),
    (TrayState(daemon="running", health=UNKNOWN), "yellow", ALWAYS | {"stop"}),
    (TrayState(daemon="running", health=HEALTHY), "green", ALWAYS | {"stop"}),
    (TrayState(daemon="running", health=HEALTHY, models=2), "green", ALWAYS | {"stop", "unload"}),
    (TrayState(daemon="running", health=FAILING, health_detail="timeout"), "red", ALWAYS | {"stop"}),
    (TrayState(daemon="stopping"), "yellow", ALWAYS),
    (TrayState(daemon="error", detail="port 19283 in use"), "red", ALWAYS | {"start"}),
    (TrayState(daemon="running", health=HEALTHY, busy="exiting"), "yellow", set()),
]


@pytest.mark.parametrize("state,colour,enabled", CASES, ids=[f"{c[0].daemon}-{c[0].health}-{c[0].busy or 'idle'}-{c[0].models}" for c in CASES])
def test_every_state_has_a_colour_and_the_right_items(state, colour, enabled):
    view = build_view(state)
    assert colour_for(state) == colour == view.colour
    keys = [it.key for it in view.items if not it.separator]
    assert tuple(keys) == MENU_KEYS
    assert {it.key for it in view.items if not it.separator and it.enabled} == enabled
    assert view.item("status").enabled is False
    assert view.item("autostart").checked is False
    assert all(it.checked is None for it in view.items if it.key != "autostart")
    assert len(view.title) <= TITLE_MAX


@pytest.mark.parametrize("dashboard", [True, False])
def test_dashboard_items_follow_the_monitor(dashboard):
    view = build_view(TrayState(daemon="running", health=HEALTHY, dashboard=dashboard))
    assert view.item("dashboard").enabled is dashboard
    assert view.item("settings").enabled is dashboard
    assert view.item("logs").enabled  # the log file works without the monitor


def test_start_at_login_checkbox_is_the_state_given():
    assert build_view(TrayState(autostart=True)).item("autostart").checked is True
    assert build_view(TrayState(autostart=False)).item("autostart").checked is False
    assert not build_view(TrayState(autostart_supported=False)).item("autostart").enabled


def test_labels_are_live():
    v = build_view(TrayState(daemon="running", health=HEALTHY, models=1, clients=3, memory_bytes=1_500_000_000, port=4321))
    assert v.status == "Running · 1 model · 3 clients · 1.4 GiB"  # luna_daemon.units: binary
    assert v.item("status").label == v.status
    assert v.title == "Luna Daemon — Running · 1 model · 3 clients · 1.4 GiB · port 4321"
    v2 = build_view(TrayState(daemon="running", health=HEALTHY, models=2, clients=1, memory_bytes=0))
    assert v2.status == "Running · 2 models · 1 client · 0 B"
    assert build_view(TrayState(daemon="starting")).status == "Starting…"
    assert build_view(TrayState(daemon="stopping")).status == "Stopping…"
    assert build_view(TrayState(daemon="stopped")).status == "Stopped"
    assert "deadline" in build_view(TrayState(daemon="stopped", detail="stop deadline of 30s exceeded")).status


def test_red_titles_carry_the_reason():
    err = build_view(TrayState(daemon="error", detail="port 19283 on 127.0.0.1 is already in use"))
    assert err.title == "Luna Daemon — Error: port 19283 on 127.0.0.1 is already in use"
    hung = build_view(TrayState(daemon="running", health=FAILING, health_detail="no answer to 'ping' within 5s"))
    assert hung.title == "Luna Daemon — Not responding: no answer to 'ping' within 5s"
    assert hung.status.startswith("Not responding")
    long = build_view(TrayState(daemon="error", detail="x" * 500 + "\nsecond line"))
    assert len(long.title) == TITLE_MAX and long.title.endswith("…") and "\n" not in long.title


PORT_TAKEN = ("daemon port 19283 on 127.0.0.1 is already in use by python3 (pid 4242, 'luna-daemon serve'); "
              "stop that program ('luna-daemon stop' stops a daemon) or set port in the config file")


def test_red_menu_row_is_short_the_full_reason_is_in_detail_and_title():
    # The tester saw a ~600 px wide menu: the row carries the first clause, cut short.
    for st in (TrayState(daemon="error", detail=PORT_TAKEN),
               TrayState(daemon="running", health=FAILING, health_detail=PORT_TAKEN)):
        v = build_view(st)
        prefix = "Error: " if st.daemon == "error" else "Not responding: "
        assert v.status.startswith(prefix + "daemon port 19283") and v.status.endswith("…"), v.status
        assert len(v.status) <= len(prefix) + REASON_MAX
        assert v.detail == prefix + PORT_TAKEN  # Check Status: nothing cut off
        assert PORT_TAKEN[:60] in v.title and len(v.title) <= TITLE_MAX
    ok = build_view(TrayState(daemon="running", health=HEALTHY))
    assert ok.detail == ok.status  # nothing to shorten


def test_short_reason_takes_the_first_clause():
    assert short_reason("no answer to 'ping' within 5s") == "no answer to 'ping' within 5s"
    assert short_reason("invalid setting port: must be 1-65535") == "invalid setting port…"
    assert short_reason("boom") == "boom"
    assert short_reason("a" * 100) == "a" * (REASON_MAX - 1) + "…"
    assert short_reason("line one\nline two") == "line one line two"
    assert short_reason("x" * 60 + "; more") == "x" * (REASON_MAX - 1) + "…"


def test_green_needs_a_successful_probe():
    # the daemon saying "running" is not enough: the tray's own ping decides
    assert colour_for(TrayState(daemon="running")) == "yellow"
    assert colour_for(TrayState(daemon="running", health=HEALTHY)) == "green"
    # a stale healthy probe never makes a stopped or failed daemon green
    assert colour_for(TrayState(daemon="stopped", health=HEALTHY)) == "gray"
    assert colour_for(TrayState(daemon="error", health=HEALTHY)) == "red"


def test_equal_states_give_equal_views():
    a = TrayState(daemon="running", health=HEALTHY, models=1)
    assert build_view(a) == build_view(a.with_())
    assert build_view(a) != build_view(a.with_(models=2))
    # while still checking, counts are not shown yet, so nothing needs redrawing
    assert build_view(a.with_(health=UNKNOWN)) == build_view(a.with_(health=UNKNOWN, models=2))


def test_summary_uses_the_shared_units():
    text = status_summary({
        "state": "running", "port": 19283, "models": 2, "clients": 1, "engine": "standalone", "uptime": 3725,
        "requests": {"total": 10, "errors": 1}, "devices": {"cpu": {"models_bytes": 2_000_000}, "cuda:0": {"models_bytes": 1_000_000_000}},
    })
    assert text == "Running on port 19283 · 2 models (955.6 MiB) · 1 client · 10 requests (1 failed) · engine standalone · up 1 h 2 min"


# ----------------------------------------------------------------------------- notifications
class RecordingBackend:
    """Stands in for a pystray icon's notify(): the class attribute pystray defines per backend."""

    HAS_NOTIFICATION = True

    def __init__(self, fail: bool = False):
        self.shown: list[tuple[str, str]] = []
        self.fail = fail

    def notify(self, message, title=None):
        if self.fail:
            raise RuntimeError("org.freedesktop.Notifications was not provided by any .service files")
        self.shown.append((title, message))


class NoNotifications(RecordingBackend):
    HAS_NOTIFICATION = False


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_alerts_are_rate_limited_per_text_and_overall():
    backend, clock = RecordingBackend(), Clock()
    n = Notifier(backend, repeat_after=60, burst=3, window=60, clock=clock)
    assert n.alert("port in use") is True
    assert n.alert("port in use") is False  # same text within a minute
    clock.t += 61
    assert n.alert("port in use") is True
    assert n.alert("model failed to load: a") is True
    assert n.alert("model failed to load: b") is True
    assert n.alert("model failed to load: c") is False  # burst of 3 per window reached
    clock.t += 61
    assert n.alert("model failed to load: c") is True
    assert [m for _t, m in backend.shown] == [
        "port in use", "port in use", "model failed to load: a", "model failed to load: b", "model failed to load: c"]
    assert n.suppressed == 2


def test_alerts_obey_the_setting_replies_do_not():
    backend = RecordingBackend()
    on = {"v": False}
    n = Notifier(backend, enabled=lambda: on["v"])
    assert n.alert("daemon failed") is False and backend.shown == []
    assert n.reply("Running on port 1") is True  # the user asked (Check Status)
    on["v"] = True
    assert n.alert("daemon failed") is True


def test_backends_without_notifications_are_skipped_silently():
    assert Notifier(NoNotifications()).alert("x") is False
    assert Notifier(NoNotifications()).reply("x") is False
    assert Notifier(None).reply("x") is False
    assert Notifier(RecordingBackend(fail=True)).alert("x") is False  # no notification service


# ----------------------------------------------------------------------------- headless decision
def test_tray_needs_a_display_on_linux():
    assert "no display" in tray_unavailable_reason({}, "linux")
    assert tray_unavailable_reason({"DISPLAY": ":0"}, "linux") is None
    assert tray_unavailable_reason({"WAYLAND_DISPLAY": "wayland-0"}, "linux") is None
    assert tray_unavailable_reason({}, "win32") is None
    assert tray_unavailable_reason({}, "darwin") is None
    assert "dummy" in tray_unavailable_reason({"DISPLAY": ":0", "PYSTRAY_BACKEND": "dummy"}, "linux")


# ----------------------------------------------------------------------------- several instances
def _two(clip: dict | None = None, vae: dict | None = None, **tray) -> TrayState:
    base = dict(daemon="running", health=HEALTHY)
    return TrayState(instances=(
        InstanceState("clip", "clip", port=19283, **{**base, **(clip or {})}),
        InstanceState("vae", "vae", port=19284, **{**base, **(vae or {})}),
    ), **tray)


OK, CHECKING = dict(daemon="running", health=HEALTHY), dict(daemon="running", health=UNKNOWN)
STOPPED = dict(daemon="stopped", health=UNKNOWN)
WORST = [
    (OK, OK, "green"),
    (OK, STOPPED, "green"),  # stopped on purpose: every wanted instance answers
    (STOPPED, STOPPED, "gray"),
    (OK, CHECKING, "yellow"),  # green needs the tray's own ping of *each* running instance
    (OK, dict(daemon="starting"), "yellow"),
    (STOPPED, dict(daemon="stopping"), "yellow"),
    (OK, dict(daemon="error", detail="exited with code 1"), "red"),
    (dict(daemon="starting"), dict(daemon="error", detail="killed by signal 9"), "red"),
    (OK, dict(daemon="running", health=FAILING, health_detail="timeout"), "red"),
    (STOPPED, dict(daemon="error", detail="x"), "red"),
]


@pytest.mark.parametrize("clip,vae,colour", WORST, ids=[f"{a['daemon']}+{b['daemon']}-{c}" for a, b, c in WORST])
def test_several_instances_show_the_worst_colour(clip, vae, colour):
    s = _two(clip, vae)
    assert colour_for(s) == build_view(s).colour == colour
    assert build_view(s.with_(busy="exiting")).colour == "yellow"


def test_several_instances_status_line_names_each():
    v = build_view(_two(vae=dict(daemon="error", detail="exited with code 1: Traceback (most recent call last) boom")))
    assert v.status == "clip: running · vae: error (exited with code 1…)"
    assert v.item("status").label == v.status and not v.item("status").enabled
    assert len(v.status) <= STATUS_MAX
    assert v.title == "Luna Daemon — clip: running (port 19283) · vae: error (exited with code 1…)"
    # Check Status while not everything runs: one line per instance, the reasons uncut.
    assert v.detail.splitlines() == ["clip: running on port 19283 · 0 models · 0 clients · 0 B",
                                     "vae: error (exited with code 1: Traceback (most recent call last) boom)"]
    assert build_view(_two(vae=CHECKING)).status == "clip: running · vae: checking…"
    assert build_view(_two(vae=dict(daemon="running", health=FAILING, health_detail="t"))).status == \
        "clip: running · vae: not responding"
    assert build_view(_two(clip=dict(daemon="starting"), vae=STOPPED)).status == "clip: starting… · vae: stopped"
    assert build_view(_two(restart_needed=("port",))).status == "clip: running · vae: running · restart needed"
    assert build_view(_two(busy="exiting")).status == "Exiting…"
    # a long reason on both still leaves both names in the row
    long = build_view(_two(clip=dict(daemon="error", detail="y" * 300), vae=dict(daemon="error", detail="z" * 300)))
    assert long.status.startswith("clip: error (") and " · vae: error (" in long.status
    assert len(long.status) <= STATUS_MAX and len(long.title) <= TITLE_MAX


def test_several_instances_get_one_submenu_each_after_check_status():
    v = build_view(_two(vae=STOPPED))
    keys = [it.key for it in v.items if not it.separator]
    assert keys == ["status", "start", "stop", "check", "instance:clip", "instance:vae", *MENU_KEYS[4:]]
    clip, vae = v.item("instance:clip"), v.item("instance:vae")
    assert (clip.label, vae.label) == ("clip: running", "vae: stopped")
    assert [(it.key, it.label) for it in clip.submenu] == [("start:clip", "Start"), ("stop:clip", "Stop"),
                                                          ("check:clip", "Check Status")]
    assert {it.key for it in clip.submenu if it.enabled} == {"stop:clip", "check:clip"}
    assert {it.key for it in vae.submenu if it.enabled} == {"start:vae", "check:vae"}
    assert v.item("stop:clip") is clip.submenu[1]  # item() finds submenu rows too
    # Start / Stop Daemon act on all: each is offered when one instance can take it.
    assert v.item("start").enabled and v.item("stop").enabled
    both_up = build_view(_two())
    assert not both_up.item("start").enabled and both_up.item("stop").enabled
    both_down = build_view(_two(STOPPED, STOPPED))
    assert both_down.item("start").enabled and not both_down.item("stop").enabled
    assert build_view(_two(vae=dict(daemon="running", health=HEALTHY, models=1))).item("unload").enabled
    assert not both_up.item("unload").enabled
    exiting = build_view(_two(busy="exiting"))
    assert not any(it.enabled for it in exiting.items if it.key != "-")
    assert not any(sub.enabled for it in exiting.items for sub in it.submenu)


def test_one_instance_is_the_single_daemon_view_exactly():
    single = TrayState(daemon="running", health=HEALTHY, models=1, port=4321)
    one = single.with_(instances=(InstanceState("main", daemon="running", health=HEALTHY, models=1, port=4321),))
    assert build_view(one) == build_view(single)
    assert not any(it.submenu for it in build_view(one).items)


def test_instance_rows_name_the_service_when_the_name_does_not():
    s = TrayState(instances=(InstanceState("main", "full", "running", health=HEALTHY),
                             InstanceState("gpu1", "clip", "stopped")))
    v = build_view(s)
    assert (v.item("instance:main").label, v.item("instance:gpu1").label) == ("main (full): running", "gpu1 (clip): stopped")
    assert v.status == "main: running · gpu1: stopped"


def test_tray_state_keeps_one_definition_of_an_instance():
    # The single-daemon fields are the primary's InstanceState, read and changed through it.
    s = TrayState(daemon="running", health=HEALTHY, models=1, port=4321, dashboard=True)
    assert s.instances == (InstanceState("main", daemon="running", health=HEALTHY, models=1, port=4321),)
    assert s.primary is s.instances[0] and (s.daemon, s.models, s.port) == ("running", 1, 4321)
    assert TrayState().port == 19283 and TrayState().daemon == "stopped"
    moved = s.with_(models=3, busy="exiting")
    assert moved.primary.models == 3 and moved.busy == "exiting" and moved.dashboard and s.models == 1
    # Several instances: a primary keyword changes the first instance only.
    two = _two().with_(daemon="error", detail="boom")
    assert [(i.name, i.daemon) for i in two.instances] == [("clip", "error"), ("vae", "running")]
    assert build_view(two).status.startswith("clip: error (boom)")
    with pytest.raises(TypeError, match="daemn"):
        TrayState(daemn="running")
    with pytest.raises(AttributeError):
        _ = s.no_such_field
