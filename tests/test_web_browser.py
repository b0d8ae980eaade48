"""The dashboard in a real browser: headless Chromium driven by Playwright.

Real host, real daemon, real monitor, real tiny models; the browser gets its login the
way a user does, through the link the tray opens (``host.dashboard_url(page)``).
Screenshots of every page are kept under ``test-artifacts/web/``.

With ``CI=true`` these tests never skip: a missing Chromium or Playwright is a failure.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from luna_daemon.client import DaemonClient
from luna_daemon.host import Host
from luna_daemon.models.devices import available_devices
from luna_daemon.settings_help import help_text
from luna_daemon.web import settings_io

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run",
        # Lets one test play a DNS-rebinding page: this name resolves to 127.0.0.1.
        "--host-resolver-rules=MAP rebind.test 127.0.0.1"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
WAIT_MS = 15_000
IN_CI = os.environ.get("CI", "").lower() == "true"

if not IN_CI:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (scripts/system-deps.sh installs it); CI=true makes this a failure",
                    allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed; CI=true makes this a failure")

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.e2e


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is required for the browser tests"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _checked_page(browser, width: int = 1280, scheme: str | None = None):
    """A fresh browser context and page that fails the test on any page error or console
    error (a CSP violation, a broken script) unless the test expects them. ``scheme``:
    the system colour scheme the page sees ("light" / "dark")."""
    ctx = browser.new_context(viewport={"width": width, "height": 860}, accept_downloads=True,
                              **({"color_scheme": scheme} if scheme else {}))
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.problems = problems  # type: ignore[attr-defined]
    pg.expect_problems = False  # type: ignore[attr-defined]
    yield pg
    ctx.close()
    if not pg.expect_problems:  # type: ignore[attr-defined]
        assert problems == [], problems


@pytest.fixture
def page(browser, running):
    """See _checked_page. Depends on ``running`` so the page closes before the host does
    (no reconnect noise)."""
    yield from _checked_page(browser)


@pytest.fixture
def running(make_settings):
    h = Host(make_settings(), log_to_stderr=False)
    h.start_monitor()
    assert h.monitor is not None
    h.daemon.start()
    yield h
    h.close(10)


@pytest.fixture
def dclient(running):
    c = DaemonClient(*running.daemon.address, token=running.daemon.token, timeout=60)
    yield c
    c.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_dashboard(page: Page, host: Host, which: str) -> None:
    """Open a page exactly as the tray does and wait until it is live and logged in."""
    page.goto(host.dashboard_url(which))
    expect(page.locator("#conn-label")).to_have_text("live", timeout=WAIT_MS)
    expect(page.locator("#auth-badge")).to_have_text("logged in", timeout=WAIT_MS)
    expect(page.locator(f"#page-{which}")).to_be_visible()


def colour(page: Page, selector: str) -> str:
    return page.eval_on_selector(selector, "e => getComputedStyle(e).backgroundColor")


# ----------------------------------------------------------------------------- status
def test_status_page_shows_running_and_start_stop_work(page, running):
    open_dashboard(page, running, "status")
    expect(page.locator("#state-label")).to_have_text("running", timeout=WAIT_MS)
    expect(page.locator("#status-state")).to_have_text("running")
    assert colour(page, "#status-dot") == "rgb(30, 185, 70)"  # the tray's green
    assert "login=" not in page.url, "the one-time secret is taken out of the address bar"
    expect(page.locator("#st-engine")).to_have_text("standalone")
    expect(page.locator("#devices-body")).to_contain_text("cpu")
    expect(page.locator("#btn-start")).to_be_disabled()
    expect(page.locator("#btn-stop")).to_be_enabled()
    shot(page, "status")

    page.click("#btn-stop")
    expect(page.locator("#state-label")).to_have_text("stopped", timeout=WAIT_MS)
    assert colour(page, "#status-dot") == "rgb(150, 150, 150)"  # gray
    assert running.daemon.state == "stopped"
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{running.monitor.port}/healthz", timeout=10)
    assert exc.value.code == 503
    shot(page, "status-stopped")

    page.click("#btn-start")
    expect(page.locator("#state-label")).to_have_text("running", timeout=WAIT_MS)
    assert running.daemon.state == "running"


def test_stopped_daemon_shows_no_live_looking_zeros(page, running):
    # Running with nobody connected is a measurement: 0. Stopped, nothing is measured:
    # "—" and "stopped", never a 0 that looks like one.
    open_dashboard(page, running, "status")
    expect(page.locator("#state-label")).to_have_text("running", timeout=WAIT_MS)
    saved = page.locator("[data-testid=memory-saved]")
    expect(saved).to_have_text("0 ComfyUI instances share 0 models: saved 0 B")
    for sel in ("#st-clients", "#st-queue", "#st-inflight", "#st-models", "#st-rpm"):
        expect(page.locator(sel)).to_have_text("0")

    page.click("#btn-stop")
    expect(page.locator("#state-label")).to_have_text("stopped", timeout=WAIT_MS)
    expect(saved).to_have_text("Memory saved: — (stopped)")
    for sel in ("#st-clients", "#st-queue", "#st-inflight", "#st-models", "#st-rpm"):
        expect(page.locator(sel)).to_have_text("—")
    expect(page.locator("#devices-body td:last-child").first).to_have_text("—")  # its models' bytes
    # Still so after the next periodic status message (its numbers are zeros).
    page.wait_for_timeout(2500)
    expect(page.locator("#st-clients")).to_have_text("—")
    expect(saved).to_have_text("Memory saved: — (stopped)")
    shot(page, "status-stopped-figures")

    page.click("#btn-start")
    expect(page.locator("#state-label")).to_have_text("running", timeout=WAIT_MS)
    expect(page.locator("#st-clients")).to_have_text("0", timeout=WAIT_MS)
    expect(saved).to_have_text("0 ComfyUI instances share 0 models: saved 0 B", timeout=WAIT_MS)


def test_without_a_login_link_the_page_is_read_only(page, browser, running):
    url = running.dashboard_url("status")
    open_dashboard_page = browser.new_page()
    try:
        open_dashboard_page.goto(url)  # the first tab uses the secret...
        expect(open_dashboard_page.locator("#auth-badge")).to_have_text("logged in", timeout=WAIT_MS)
    finally:
        open_dashboard_page.close()
    page.goto(url)  # ...a second use of the same link gets nothing
    expect(page.locator("#state-label")).to_have_text("running", timeout=WAIT_MS)
    expect(page.locator("#auth-badge")).to_have_text("read-only")
    expect(page.locator("#banner")).to_contain_text("already used")
    expect(page.locator("#btn-stop")).to_be_disabled()
    page.goto(f"http://127.0.0.1:{running.monitor.port}/#page=settings")
    expect(page.locator("#banner")).to_contain_text("Read-only", timeout=WAIT_MS)
    expect(page.locator("#settings-save")).to_be_disabled()
    # Even forcing the button open, the server refuses.
    reply = page.evaluate("""() => new Promise((resolve) => {
        const ws = new WebSocket(`ws://${location.host}/ws`);
        ws.onopen = () => ws.send(JSON.stringify({type: "stop", id: 1}));
        ws.onmessage = (e) => { const m = JSON.parse(e.data); if (m.type === "reply") resolve(m); };
    })""")
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    assert running.daemon.state == "running"


def test_page_resyncs_after_a_gap_in_events(page, running):
    open_dashboard(page, running, "status")
    page.wait_for_function("() => window.lunaDashboard.lastSeq !== null", timeout=WAIT_MS)
    before = page.evaluate("window.lunaDashboard.snapshots")
    # Pretend two events never arrived: the next one shows a gap and the page must ask
    # the server for a fresh snapshot instead of trusting its picture.
    page.evaluate("window.lunaDashboard.lastSeq -= 2")
    running.events.emit("warning", message="after the gap")
    page.wait_for_function(f"() => window.lunaDashboard.snapshots > {before}", timeout=WAIT_MS)
    running.events.emit("warning", message="stream resumed")
    expect(page.locator("#warnings")).to_contain_text("stream resumed", timeout=WAIT_MS)


# ----------------------------------------------------------------------------- logs
def test_client_request_appears_in_live_log(page, running, dclient, model_dir):
    import torch

    open_dashboard(page, running, "logs")
    log_view = page.locator("#log-view")
    expect(log_view).to_contain_text("daemon running", timeout=WAIT_MS)

    info = dclient.vae_load(str(model_dir / "vae_folder"))
    dclient.vae_decode(info["model"], torch.zeros(1, 4, 8, 8))
    expect(log_view).to_contain_text("vae_decode from", timeout=10_000)  # bounded: 10 s
    expect(log_view).to_contain_text("loaded vae vae_folder")

    # Level filter: request lines are info-level activity.
    page.select_option("#log-level", "WARNING")
    expect(log_view).not_to_contain_text("vae_decode from")
    page.select_option("#log-level", "INFO")
    expect(log_view).to_contain_text("vae_decode from")
    # Text search.
    page.fill("#log-search", "loaded vae")
    expect(log_view.locator(".log-line")).to_have_count(1)
    page.fill("#log-search", "")
    # Pause holds new lines back; resume shows them.
    page.click("#log-pause")
    dclient.vae_encode(info["model"], torch.zeros(1, 64, 64, 3))
    expect(page.locator("#log-pause")).to_contain_text("new", timeout=10_000)
    expect(log_view).not_to_contain_text("vae_encode from")
    page.click("#log-pause")
    expect(log_view).to_contain_text("vae_encode from")
    # A failing request shows as a warning line.
    with pytest.raises(Exception):
        dclient.vae_decode("vae-missing", torch.zeros(1, 4, 8, 8))
    expect(page.locator(".log-line.WARNING")).to_contain_text("vae_decode", timeout=10_000)
    shot(page, "logs")

    with page.expect_download() as dl:
        page.click("#log-download")
    assert "loaded vae vae_folder" in Path(dl.value.path()).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- models
def test_unload_from_models_page_removes_it_from_ps(page, running, dclient, model_dir):
    info = dclient.vae_load(str(model_dir / "vae_folder"))
    clip = dclient.clip_load([str(model_dir / "clip_l")], "sd1")
    open_dashboard(page, running, "models")
    row = page.locator(f'tr[data-model="{info["model"]}"]')
    expect(row).to_contain_text("vae_folder", timeout=WAIT_MS)
    expect(row).to_contain_text("fp32")
    expect(row).to_contain_text("never")  # keep_alive forever
    expect(page.locator(f'tr[data-model="{clip["model"]}"]')).to_contain_text("clip_l")

    # A load in progress shows a progress bar (events straight from the daemon's bus).
    running.events.emit("model_loading", model="vae-inprogress", kind="vae",
                        paths=["/models/vae/sdxl_vae.safetensors"], progress=0.4)
    bar = page.locator('tr[data-loading="vae-inprogress"] progress')
    expect(bar).to_be_visible(timeout=WAIT_MS)
    assert abs(bar.evaluate("b => b.value") - 0.4) < 1e-6
    shot(page, "models")
    running.events.emit("model_loaded", model="vae-inprogress", kind="vae", paths=["/models/vae/sdxl_vae.safetensors"],
                        device="cpu", bytes=0)
    expect(bar).to_have_count(0, timeout=WAIT_MS)

    row.locator("button", has_text="Unload").click()
    expect(row).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#models-msg")).to_contain_text("unloaded vae_folder")
    assert [m["id"] for m in dclient.ps()] == [clip["model"]]

    page.click("#btn-unload-all")
    expect(page.locator("#models-empty")).to_be_visible(timeout=WAIT_MS)
    assert dclient.ps() == []


# ----------------------------------------------------------------------------- settings
def test_settings_precision_change_writes_toml_and_offers_restart(page, running, model_dir):
    config = Path(running.settings.config_file)
    open_dashboard(page, running, "settings")
    expect(page.locator("#settings-file")).to_have_text(str(config))
    offered = page.eval_on_selector_all("#f-vae_device option", "os => os.map(o => o.value)")
    assert offered == settings_io.device_choices(available_devices()), "only devices that exist"

    # A bad value: a clear message at the field, nothing written.
    page.fill("#f-keep_alive", "soon")
    page.click("#settings-save")
    expect(page.locator("#f-keep_alive ~ .err")).to_contain_text("expected a duration", timeout=WAIT_MS)
    assert not config.exists()
    page.click("#settings-revert")
    expect(page.locator("#f-keep_alive")).to_have_value("forever")

    page.select_option("#f-vae_dtype", "fp16")
    page.click("#settings-save")
    notice = page.locator("#settings-notice")
    expect(notice).to_be_visible(timeout=WAIT_MS)
    expect(notice).to_contain_text("Restart needed: changes to vae_dtype")
    expect(page.locator("#settings-restart")).to_be_visible()
    assert tomllib.loads(config.read_text(encoding="utf-8")) == {"vae_dtype": "fp16"}
    shot(page, "settings")

    page.click("#settings-restart")
    expect(page.locator("#settings-notice-text")).to_contain_text("restarted", timeout=30_000)
    expect(page.locator("#state-label")).to_have_text("running", timeout=WAIT_MS)
    assert running.daemon.state == "running"
    # The restarted daemon loads with the new precision by default.
    with DaemonClient(*running.daemon.address, token=running.daemon.token, timeout=60) as c:
        assert c.vae_load(str(model_dir / "vae_folder"))["dtype"] == "fp16"


def test_scope_widening_settings_are_read_only_and_refused(page, running, tmp_path):
    config = Path(running.settings.config_file)
    open_dashboard(page, running, "settings")
    for key in ("comfyui_root", "model_roots", "port", "monitor_port"):
        expect(page.locator(f"#f-{key}")).not_to_be_editable()
        expect(page.locator(f"#f-{key} ~ .hint")).to_contain_text("config.toml")
    expect(page.locator("#f-engine")).to_be_disabled()
    expect(page.locator("#f-vae_dtype")).to_be_enabled()
    expect(page.locator("#f-keep_alive")).to_be_editable()
    # Forcing the field open (as a script on the page could): the server still refuses,
    # and says so next to the field; nothing is written.
    evil = tmp_path / "evil"
    (evil / "comfy").mkdir(parents=True)
    (evil / "comfy" / "sd.py").write_text("raise SystemExit('imported from a web page')\n", encoding="utf-8")
    page.evaluate("""(path) => { const e = document.getElementById("f-comfyui_root");
        e.readOnly = false; e.value = path; e.dispatchEvent(new Event("input", { bubbles: true })); }""", str(evil))
    page.click("#settings-save")
    expect(page.locator("#f-comfyui_root ~ .err")).to_contain_text("cannot be changed from the dashboard", timeout=WAIT_MS)
    expect(page.locator("#settings-msg")).to_contain_text("Not saved")
    shot(page, "settings-read-only")
    assert not config.exists()
    assert running.settings.comfyui_root != str(evil)


def test_logs_page_without_login_shows_no_log_lines(page, running):
    page.goto(f"http://127.0.0.1:{running.monitor.port}/#page=logs")
    expect(page.locator("#conn-label")).to_have_text("live", timeout=WAIT_MS)
    expect(page.locator("#log-view")).to_contain_text("only to a logged-in page", timeout=WAIT_MS)
    expect(page.locator("#log-view")).not_to_contain_text("daemon running")
    expect(page.locator("#log-download")).to_be_disabled()


# ----------------------------------------------------------------------------- foreign pages
class _EvilHandler(http.server.BaseHTTPRequestHandler):
    target = 0

    def do_GET(self):  # noqa: N802 - http.server API
        body = f"""<!doctype html><title>evil</title><script>
        const out = {{}};
        const ws = new WebSocket("ws://127.0.0.1:{self.target}/ws");
        ws.onopen = () => {{ out.ws = "open"; ws.send(JSON.stringify({{type: "stop", id: 1}})); }};
        ws.onmessage = (e) => {{ out.msg = (out.msg || "") + e.data; }};
        ws.onerror = () => {{ out.ws = out.ws || "error"; }};
        ws.onclose = () => {{ out.closed = true; }};
        fetch("http://127.0.0.1:{self.target}/api/status").then(r => r.text())
          .then(t => {{ out.fetch = "read:" + t; }}, e => {{ out.fetch = "blocked:" + e; }});
        window.result = out;
        </script>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


def test_page_from_another_site_gets_nothing(page, running):
    page.expect_problems = True  # the refused WebSocket and fetch log console errors
    _EvilHandler.target = running.monitor.port
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EvilHandler)
    t = threading.Thread(target=evil.serve_forever, daemon=True)
    t.start()
    try:
        page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        page.wait_for_function("window.result && window.result.closed && window.result.fetch", timeout=WAIT_MS)
        result = page.evaluate("window.result")
        assert result.get("ws") == "error" and "msg" not in result, result
        assert result["fetch"].startswith("blocked:"), result
        assert running.daemon.state == "running"

        # DNS rebinding: a name that resolves to 127.0.0.1 still is not this server.
        resp = page.goto(f"http://rebind.test:{running.monitor.port}/api/status")
        assert resp is not None and resp.status == 403
        assert "state" not in page.content()
    finally:
        evil.shutdown()
        evil.server_close()
    assert any("refused" in json.dumps(line) for line in running.log_tail.since(0))


# ----------------------------------------------------------------------------- several instances
@pytest.fixture
def pair(tmp_path, model_dir):
    """A host with a VAE-only primary and a CLIP-only child process (free ports), started."""
    from luna_daemon.settings import Settings

    config = tmp_path / "pair.toml"
    config.write_text(
        f'engine = "standalone"\nmonitor_port = 0\nlock_port = 0\nhealth_interval = 0.5\n'
        f'model_roots = ["{model_dir.as_posix()}"]\n\n'
        '[[instances]]\nname = "vae"\nservice = "vae"\nport = 0\n\n'
        '[[instances]]\nname = "clip"\nservice = "clip"\nport = 0\n')
    h = Host(Settings.load(config, env={"LUNA_HOME": str(tmp_path / "home")}), log_to_stderr=False)
    try:
        h.start_monitor()
        assert h.monitor is not None and h.start_all() == {}
        yield h
    finally:
        h.close(10)


@pytest.fixture
def pair_page(browser, pair):
    yield from _checked_page(browser)


def test_stop_on_one_instance_card_stops_only_that_instance(pair_page, pair):
    page, h = pair_page, pair
    open_dashboard(page, h, "status")
    cards = page.locator("[data-testid=instance-card]")
    expect(cards).to_have_count(2, timeout=WAIT_MS)
    vae, clip = page.locator("[data-instance=vae]"), page.locator("[data-instance=clip]")
    expect(vae.locator("h2")).to_have_text("vae (primary)")
    for c in (vae, clip):
        expect(c.locator("[data-testid=instance-state]")).to_have_text("running", timeout=WAIT_MS)
    expect(clip.locator("[data-field=service]")).to_have_text("clip")
    expect(clip.locator("[data-field=address]")).to_have_text(f"127.0.0.1:{h.instance('clip').address[1]}")
    assert colour(page, "[data-instance=clip] .dot") == "rgb(30, 185, 70)"
    shot(page, "instances")

    for c in (vae, clip):  # running, nobody connected: a measured 0
        for field in ("clients", "queue", "models"):
            expect(c.locator(f"[data-field={field}]")).to_have_text("0", timeout=WAIT_MS)

    clip.locator("[data-testid=instance-stop]").click()
    expect(clip.locator("[data-testid=instance-state]")).to_have_text("stopped", timeout=WAIT_MS)
    for field in ("clients", "queue", "models"):  # stopped: nothing measured
        expect(clip.locator(f"[data-field={field}]")).to_have_text("—")
        expect(vae.locator(f"[data-field={field}]")).to_have_text("0")
    # One instance still runs: the memory-saved line is a figure, not "stopped".
    expect(page.locator("[data-testid=memory-saved]")).to_contain_text("saved 0 B")
    expect(clip.locator("[data-testid=instance-msg]")).to_contain_text("stop: done (stopped)")
    assert colour(page, "[data-instance=clip] .dot") == "rgb(150, 150, 150)"  # gray, and the word says it too
    expect(vae.locator("[data-testid=instance-state]")).to_have_text("running")
    assert (h.daemon.state, h.instance("clip").state) == ("running", "stopped")
    # Some stopped on purpose, the rest running: the host counts as running.
    expect(page.locator("#state-label")).to_have_text("running")
    expect(clip.locator("[data-testid=instance-start]")).to_be_enabled()
    expect(clip.locator("[data-testid=instance-stop]")).to_be_disabled()
    shot(page, "instances-one-stopped")

    # The log viewer can show one instance's lines only.
    page.click("nav a[data-page=logs]")
    expect(page.locator("#log-instance-label")).to_be_visible()
    page.select_option("#log-instance", "clip")
    expect(page.locator("#log-view .log-line").first).to_contain_text("[clip]", timeout=WAIT_MS)
    texts = page.locator("#log-view .log-line").all_inner_texts()
    assert texts and all("[clip]" in t for t in texts)


# ----------------------------------------------------------------------------- charts, themes, 420 px
@pytest.fixture
def charting(make_settings, monkeypatch):
    """A running host whose chart history is sampled every 0.3 s (5 s in production)."""
    from luna_daemon.web import history

    monkeypatch.setattr(history, "SAMPLE_INTERVAL", 0.3)
    h = Host(make_settings(), log_to_stderr=False)
    try:
        h.start_monitor()
        h.daemon.start()
        yield h
    finally:
        h.close(10)


def _points(page: Page, testid: str, series: str) -> int:
    """How many data points the line of ``series`` in chart ``testid`` has."""
    return page.evaluate(
        """([testid, series]) => {
            const p = document.querySelector(`[data-testid=${testid}] path.chart-line[data-series="${series}"]`);
            return p ? (p.getAttribute("d").match(/[ML]/g) || []).length : 0;
        }""", [testid, series])


def _no_overflow(page: Page) -> tuple[int, int]:
    return page.evaluate("() => [document.scrollingElement.scrollWidth, innerWidth]")


@pytest.mark.parametrize("scheme", ["dark", "light"])
def test_charts_render_live_points_and_hover_shows_values(browser, charting, model_dir, scheme):
    h = charting
    for pg in _checked_page(browser, 1280, scheme):
        with DaemonClient(*h.daemon.address, token=h.daemon.token, timeout=60) as c:
            c.vae_load(str(model_dir / "vae_folder"))
            open_dashboard(pg, h, "status")
            # Requests while the page watches: the points arrive over the WebSocket.
            end = time.monotonic() + WAIT_MS / 1000
            while time.monotonic() < end and _points(pg, "chart-latency", "ping p95") < 3:
                c.ping()
                time.sleep(0.05)
            assert _points(pg, "chart-latency", "ping p95") >= 3, "the latency chart has no line for ping"
            assert _points(pg, "chart-rps", "ping") >= 3
            assert _points(pg, "chart-load", "clients") >= 4
            assert _points(pg, "chart-memory", "weights") >= 4
            expect(pg.locator("[data-testid=chart-memory] figcaption").first).to_have_text("Memory: cpu")

            # Hover: the tip names the time and each series with its value.
            rps = pg.locator("[data-testid=chart-rps] svg")
            box = rps.bounding_box()
            assert box is not None
            rps.hover(position={"x": box["width"] - 20, "y": box["height"] / 2})
            tip = pg.locator("[data-testid=chart-rps] [data-testid=chart-tip]")
            expect(tip).to_be_visible()
            expect(tip).to_contain_text(re.compile(r"ping: [0-9.]+/s"))
            mem = pg.locator("[data-testid=chart-memory] svg").first
            mem.hover()
            expect(pg.locator("[data-testid=chart-memory] [data-testid=chart-tip]").first).to_contain_text(
                re.compile(r"weights: [0-9.]+ (KiB|MiB|GiB)"))

            # The labeled memory bar in the top row (every instance together).
            bar = pg.locator("[data-testid=memory-card] [data-testid=membar]").first
            expect(bar).to_contain_text("weights")
            expect(bar).to_contain_text("free")
            widths = bar.locator(".seg").evaluate_all("ss => ss.map(s => s.getBoundingClientRect().width)")
            assert widths[0] > 0, "the weights part of the bar shows"
            # The top row is full: the memory card sits on the right of the traffic card.
            top = pg.evaluate("""() => [...document.querySelectorAll('#page-status > .cards > .card')]
                .slice(0, 4).map(c => c.getBoundingClientRect().top)""")
            assert len({round(t) for t in top}) == 1, f"the four top cards are one row: {top}"
            bg = pg.evaluate("() => getComputedStyle(document.body).backgroundColor")
            assert bg == ("rgb(20, 22, 26)" if scheme == "dark" else "rgb(244, 245, 247)"), bg
            shot(pg, f"charts-1280-{scheme}")


def test_every_page_fits_420px_and_settings_have_help(browser, charting, model_dir):
    h = charting
    for pg in _checked_page(browser, 420):
        with DaemonClient(*h.daemon.address, token=h.daemon.token, timeout=60) as c:
            c.vae_load(str(model_dir / "vae_folder"))
            c.clip_load([str(model_dir / "clip_l")], "sd1")
            open_dashboard(pg, h, "status")
            expect(pg.locator("[data-testid=chart-rps] svg")).to_be_visible()
            pg.wait_for_function("() => document.querySelectorAll('[data-testid=chart-load] path.chart-line').length > 0",
                                 timeout=WAIT_MS)
            for which in ("status", "models", "logs", "settings"):
                pg.click(f"nav a[data-page={which}]")
                expect(pg.locator(f"#page-{which}")).to_be_visible()
                if which == "models":
                    expect(pg.locator("#models-body tr")).to_have_count(2, timeout=WAIT_MS)
                if which == "logs":
                    expect(pg.locator("#log-view .log-line").first).to_be_visible(timeout=WAIT_MS)
                width, inner = _no_overflow(pg)
                assert width <= inner, f"{which}: the page is {width} px wide in a {inner} px window"
                shot(pg, f"{which}-420")
            helps = pg.eval_on_selector_all(".field", "fs => fs.map(f => [f.querySelector('[name]').name, "
                                                      "(f.querySelector('.help') || {}).textContent || ''])")
            assert helps and all(text for _, text in helps), helps
            assert all(text == help_text(name) for name, text in helps)
