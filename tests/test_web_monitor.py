"""The web monitor at the protocol level: real server, real sockets, real daemon.

HTTP through http.client (so the Host header is ours to choose), WebSockets through the
websockets sync client, daemon requests through DaemonClient, models from models/tiny.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
import tomllib

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from luna_daemon.client import DaemonClient, DaemonError
from luna_daemon.host import Host
from luna_daemon.models.devices import available_devices
from luna_daemon.web import settings_io
from luna_daemon.web.monitor import MAX_MESSAGE, Monitor, MonitorError

WAIT = 15.0


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def host(make_settings):
    """A host with its monitor up and the daemon stopped."""
    h = Host(make_settings(), log_to_stderr=False)
    h.start_monitor()
    assert h.monitor is not None, "monitor did not start"
    yield h
    h.close(10)


@pytest.fixture
def running(host):
    host.daemon.start()
    return host


@pytest.fixture
def dclient(running):
    c = DaemonClient(*running.daemon.address, token=running.daemon.token, timeout=60)
    yield c
    c.close()


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        hdrs = {"Host": f"127.0.0.1:{port}", **(headers or {})}
        conn.request("GET", path, headers=hdrs)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def bearer(host) -> dict[str, str]:
    """The header a script that read the token file sends to a session-only endpoint."""
    return {"Authorization": f"Bearer {host.daemon.token}"}


def ws_connect(port: int, **kw):
    return connect(f"ws://127.0.0.1:{port}/ws", open_timeout=WAIT, **kw)


def recv_json(ws, timeout: float = WAIT) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def recv_until(ws, pred, timeout: float = WAIT) -> tuple[dict, list[dict]]:
    """Messages until one satisfies ``pred``; returns it and everything before it."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching message within {timeout}s; saw {[m.get('type') + ':' + str(m.get('name', '')) for m in seen]}")
        m = recv_json(ws, left)
        if pred(m):
            return m, seen
        seen.append(m)


def request(ws, msg: dict, msg_id: int = 1) -> dict:
    ws.send(json.dumps({**msg, "id": msg_id}))
    reply, _ = recv_until(ws, lambda m: m.get("type") == "reply" and m.get("id") == msg_id)
    return reply


def login(ws, **cred) -> dict:
    ws.send(json.dumps({"type": "login", **cred}))
    msg, _ = recv_until(ws, lambda m: m.get("type") == "auth")
    return msg


def secret_of(url: str) -> str:
    m = re.search(r"[#&]login=([A-Za-z0-9_\-]+)", url)
    assert m, url
    return m.group(1)


def metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    status, headers, body = http_get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, instance: str = "main", **labels: str) -> tuple[str, tuple]:
    """A metric_samples key: every series carries its instance's name."""
    return name, tuple(sorted({"instance": instance, **labels}.items()))


# ----------------------------------------------------------------------------- health
def test_healthz_follows_daemon_state(host):
    port = host.monitor.port
    status, _, body = http_get(port, "/healthz")
    assert (status, body) == (503, b"stopped\n")
    host.daemon.start()
    status, headers, body = http_get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["content-type"].startswith("text/plain")
    host.daemon.stop(10)
    assert http_get(port, "/healthz")[:3:2] == (503, b"stopped\n")


def _listening_socket() -> socket.socket:
    """A port some other program holds."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    return blocker


def test_healthz_shows_error_and_monitor_outlives_failed_daemon(make_settings):
    blocker = _listening_socket()
    taken = blocker.getsockname()[1]
    h = Host(make_settings(port=taken), log_to_stderr=False)
    h.start_monitor()
    try:
        with pytest.raises(Exception):
            h.daemon.start()
        status, _, body = http_get(h.monitor.port, "/healthz")
        assert status == 503
        assert body.startswith(b"error: ") and str(taken).encode() in body
        # The dashboard and the logs are still served: that is when they matter most.
        status, _, body = http_get(h.monitor.port, "/api/status")
        assert status == 200 and json.loads(body)["state"] == "error"
        status, _, body = http_get(h.monitor.port, "/api/logs?since=0", bearer(h))
        assert any("failed" in line["message"] or "in use" in line["message"] for line in json.loads(body)["lines"])
        with ws_connect(h.monitor.port) as ws:
            snap = recv_json(ws)
            assert snap["type"] == "snapshot" and snap["status"]["state"] == "error" and snap["status"]["colour"] == "red"
    finally:
        h.close(5)
        blocker.close()


# ----------------------------------------------------------------------------- metrics
def test_metrics_parse_and_counters_move(running, dclient, model_dir):
    port = running.monitor.port
    before = metric_samples(port)
    assert before[key("luna_daemon_up")] == 1.0
    assert before[key("luna_daemon_state", state="running")] == 1.0
    assert before[key("luna_daemon_state", state="stopped")] == 0.0
    assert before[key("luna_daemon_uptime_seconds")] >= 0.0
    ping_ok = before.get(key("luna_daemon_requests_total", op="ping", outcome="ok"), 0.0)
    ping_n = before.get(key("luna_daemon_request_duration_seconds_count", op="ping"), 0.0)

    for _ in range(3):
        dclient.ping()
    with pytest.raises(DaemonError):
        dclient.unload("vae-doesnotexist")
    info = dclient.vae_load(str(model_dir / "vae_folder"))

    after = metric_samples(port)
    assert after[key("luna_daemon_requests_total", op="ping", outcome="ok")] >= ping_ok + 3
    assert after[key("luna_daemon_requests_total", op="unload", outcome="not_found")] == 1.0
    assert after[key("luna_daemon_requests_total", op="vae_load", outcome="ok")] == 1.0
    count = after[key("luna_daemon_request_duration_seconds_count", op="ping")]
    assert count >= ping_n + 3
    assert after[key("luna_daemon_request_duration_seconds_bucket", le="+Inf", op="ping")] == count
    assert after[key("luna_daemon_request_duration_seconds_sum", op="ping")] > 0
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                     if k[0] == "luna_daemon_request_duration_seconds_bucket" and dict(k[1])["op"] == "vae_load")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "histogram buckets must be cumulative"
    assert after[key("luna_daemon_models_loaded", kind="vae")] == 1.0
    assert after[key("luna_daemon_model_bytes", device="cpu")] == info["bytes"] > 0
    assert after[key("luna_daemon_connected_clients")] >= 1
    assert key("luna_daemon_queue_depth") in after
    assert key("luna_daemon_lora_cache_bytes") in after
    assert key("luna_daemon_lora_cache_hits_total") in after
    assert key("luna_daemon_lora_cache_misses_total") in after
    # One daemon: every series is labelled with its instance, "main", and nothing else changed.
    assert {dict(labels).get("instance") for _, labels in after} == {"main"}

    running.daemon.stop(10)
    stopped = metric_samples(port)
    assert stopped[key("luna_daemon_up")] == 0.0
    assert stopped[key("luna_daemon_state", state="stopped")] == 1.0
    # Counters stay visible while stopped (they reset only when a new daemon starts).
    assert stopped[key("luna_daemon_requests_total", op="vae_load", outcome="ok")] == 1.0
    assert stopped[key("luna_daemon_models_loaded", kind="vae")] == 0.0
    assert stopped[key("luna_daemon_lora_cache_bytes")] == 0.0  # no cache while stopped


# ----------------------------------------------------------------------------- origin / host
def test_websocket_from_foreign_origin_is_refused(host):
    port = host.monitor.port
    for origin in ("http://evil.example", f"http://evil.example:{port}", f"http://127.0.0.1:{port + 1 if port < 65535 else 1}", "null"):
        with pytest.raises(InvalidStatus) as exc:
            ws_connect(port, origin=origin)
        assert exc.value.response.status_code == 403, origin
    # Its own origins (the page served by this port) are accepted.
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        with ws_connect(port, origin=origin) as ws:
            assert recv_json(ws)["type"] == "snapshot"


def test_configured_allowed_origin_is_accepted(make_settings):
    h = Host(make_settings(allowed_origins=["http://tools.example:8080"]), log_to_stderr=False)
    h.start_monitor()
    try:
        with ws_connect(h.monitor.port, origin="http://tools.example:8080") as ws:
            assert recv_json(ws)["type"] == "snapshot"
        with pytest.raises(InvalidStatus):
            ws_connect(h.monitor.port, origin="http://tools.example:8081")
    finally:
        h.close(5)


def test_dns_rebinding_host_header_is_refused(host):
    port = host.monitor.port
    for path in ("/", "/api/status", "/api/logs", "/metrics", "/healthz"):
        status, _, body = http_get(port, path, {"Host": f"evil.example:{port}"})
        assert status == 403, path
        assert b"Host" in body
    assert http_get(port, "/api/status", {"Host": f"localhost:{port}"})[0] == 200
    assert http_get(port, "/api/status", {"Host": f"127.0.0.1:{port + 1 if port < 65535 else 1}"})[0] == 403
    # A WebSocket whose Host names another site (a rebinding page) is refused too.
    sock = socket.create_connection(("127.0.0.1", port))
    with pytest.raises(InvalidStatus) as exc:
        connect(f"ws://evil.example:{port}/ws", sock=sock, open_timeout=WAIT)
    assert exc.value.response.status_code == 403


def test_cross_site_fetch_of_api_is_refused(host):
    port = host.monitor.port
    assert http_get(port, "/api/status", {"Origin": "http://evil.example"})[0] == 403
    assert http_get(port, "/api/logs", {"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert http_get(port, "/api/logs", {"Sec-Fetch-Site": "same-site"})[0] == 403
    assert http_get(port, "/api/logs", {"Sec-Fetch-Site": "same-origin", **bearer(host)})[0] == 200


# ----------------------------------------------------------------------------- authority
def test_state_changing_messages_need_the_token(running, tmp_path):
    port = running.monitor.port
    d = running.daemon
    config = running.settings.config_file
    with ws_connect(port, origin=f"http://127.0.0.1:{port}") as ws:
        snap = recv_json(ws)
        assert snap["type"] == "snapshot" and snap["authenticated"] is False
        for i, msg in enumerate([{"type": "stop"}, {"type": "restart"}, {"type": "unload", "all": True},
                                 {"type": "save_settings", "values": {"vae_dtype": "fp16"}},
                                 {"type": "stop", "token": "not-the-token"}], start=1):
            reply = request(ws, msg, i)
            assert reply["ok"] is False and reply["error"]["code"] == "unauthorized", msg
        assert d.state == "running"
        assert not __import__("os").path.exists(config)
        # Wrong credentials get nothing.
        assert login(ws, secret="made-up")["ok"] is False
        assert login(ws, token="wrong")["ok"] is False
        assert login(ws, session="made-up")["ok"] is False
        assert request(ws, {"type": "stop"}, 10)["error"]["code"] == "unauthorized"

    # The tray's login link: one use only, then a session.
    url = running.dashboard_url("status")
    secret = secret_of(url)
    with ws_connect(port, origin=f"http://127.0.0.1:{port}") as ws:
        recv_json(ws)
        auth = login(ws, secret=secret)
        assert auth["ok"] is True and auth["session"]
        session = auth["session"]
        assert d.token not in json.dumps(auth), "the page must never receive the token"
    with ws_connect(port, origin=f"http://127.0.0.1:{port}") as ws:
        recv_json(ws)
        assert login(ws, secret=secret)["ok"] is False, "a login secret works once"
        assert login(ws, session=session)["ok"] is True
        reply = request(ws, {"type": "stop"}, 1)
        assert reply["ok"] is True and reply["result"]["state"] == "stopped"
        assert d.state == "stopped"
    # A non-browser client holding the token may act per message.
    with ws_connect(port) as ws:
        recv_json(ws)
        reply = request(ws, {"type": "start", "token": d.token}, 1)
        assert reply["ok"] is True and d.state == "running"


def test_login_secret_expires(make_settings):
    h = Host(make_settings(), log_to_stderr=False)
    mon = Monitor(h, login_ttl=0.3)
    mon.start()
    try:
        url = mon.url_for("logs")
        assert re.fullmatch(rf"http://127\.0\.0\.1:{mon.port}/#page=logs&login=[A-Za-z0-9_\-]{{20,}}", url)
        time.sleep(0.6)
        with ws_connect(mon.port) as ws:
            recv_json(ws)
            auth = login(ws, secret=secret_of(url))
            assert auth["ok"] is False and "expired" in auth["error"]
    finally:
        mon.stop()
        h.close(5)


def test_url_for_pages(host):
    urls = {host.monitor.url_for(p) for p in ("status", "models", "logs", "settings")}
    assert len({secret_of(u) for u in urls}) == 4, "every link has its own secret"
    assert host.dashboard_url("settings").startswith(f"http://127.0.0.1:{host.monitor.port}/#page=settings&login=")
    with pytest.raises(ValueError):
        host.monitor.url_for("admin")


# ----------------------------------------------------------------------------- events
def test_snapshot_on_connect_then_events_follow_a_model_load(running, dclient, model_dir):
    port = running.monitor.port
    with ws_connect(port) as ws:
        snap = recv_json(ws)
        assert snap["type"] == "snapshot" and snap["reason"] == "connect"
        assert snap["status"]["state"] == "running" and snap["status"]["colour"] == "green"
        assert snap["models"] == []
        assert login(ws, token=running.daemon.token)["ok"]
        snap, _ = recv_until(ws, lambda m: m.get("type") == "snapshot")
        assert snap["reason"] == "login"
        assert isinstance(snap["logs"], list) and snap["logs"], "a logged-in snapshot carries the recent log"
        assert snap["settings"]["file"] == running.settings.config_file
        last = snap["seq"]

        info = dclient.vae_load(str(model_dir / "vae_folder"))
        loaded, before = recv_until(ws, lambda m: m.get("type") == "event" and m["name"] == "model_loaded")
        events = [m for m in before if m["type"] == "event"] + [loaded]
        assert [e["seq"] for e in events] == list(range(last + 1, last + 1 + len(events))), "gap-free sequence"
        loading = [e for e in events if e["name"] == "model_loading"]
        assert loading and loading[0]["data"]["model"] == info["model"] and "progress" in loading[0]["data"]
        assert loaded["data"]["model"] == info["model"] and loaded["data"]["device"] == "cpu"
        # The models view follows without asking.
        status, _ = recv_until(ws, lambda m: m.get("type") == "status" and m["models"])
        assert status["models"][0]["id"] == info["model"] and status["models"][0]["file"] == "vae_folder"
        last = loaded["seq"]

        # A request by a client shows up as an event for the live log.
        dclient.vae_decode(info["model"], __import__("torch").zeros(1, 4, 8, 8))
        req, _ = recv_until(ws, lambda m: m.get("type") == "event" and m["name"] == "request"
                            and m["data"]["op"] == "vae_decode")
        assert req["seq"] > last and req["data"]["ms"] > 0

        # A gap on the page's side: it asks, it gets a fresh snapshot with a current seq.
        ws.send(json.dumps({"type": "snapshot"}))
        again, _ = recv_until(ws, lambda m: m.get("type") == "snapshot")
        assert again["reason"] == "requested" and again["seq"] >= req["seq"]
        assert [m["id"] for m in again["models"]] == [info["model"]]

    status, _, body = http_get(port, "/api/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["models"]] == [info["model"]]


def test_unload_over_websocket_emits_model_unloaded(running, dclient, model_dir):
    info = dclient.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))
    with ws_connect(running.monitor.port) as ws:
        recv_json(ws)
        assert login(ws, token=running.daemon.token)["ok"]
        reply = request(ws, {"type": "unload", "model": "vae-nope"}, 1)
        assert reply["ok"] is False and reply["error"]["code"] == "not_found"
        ws.send(json.dumps({"type": "unload", "model": info["model"], "id": 2}))
        got: dict[str, dict] = {}

        def both(m):
            if m.get("type") == "reply" and m.get("id") == 2:
                got["reply"] = m
            elif m.get("type") == "event" and m["name"] == "model_unloaded":
                got["event"] = m
            return len(got) == 2

        recv_until(ws, both)
        assert got["reply"]["ok"] is True and got["reply"]["result"]["unloaded"][0]["id"] == info["model"]
        assert got["event"]["data"]["model"] == info["model"]
    assert dclient.ps() == []


def test_slow_client_is_resynced_and_never_slows_the_emitter(make_settings):
    h = Host(make_settings(), log_to_stderr=False)
    mon = Monitor(h, queue_limit=50)
    mon.start()
    try:
        # max_queue=1: the client stops reading its socket after one frame, so the
        # server's writes back up like a stalled browser tab.
        with connect(f"ws://127.0.0.1:{mon.port}/ws", max_queue=1, open_timeout=WAIT) as ws:
            assert recv_json(ws)["type"] == "snapshot"
            payload = "x" * 4000
            done = threading.Event()

            def flood():
                for i in range(12000):  # ~48 MB: far more than any socket buffer
                    h.events.emit("warning", message=payload, i=i)
                done.set()

            t = threading.Thread(target=flood, daemon=True)
            t.start()
            # Would hang forever if the subscriber waited for the stalled client.
            assert done.wait(60), "emitting events blocked on a slow WebSocket client"
            snap, skipped = recv_until(ws, lambda m: m.get("type") == "snapshot", timeout=60)
            assert snap["reason"] == "overflow" and snap["dropped"] > 0
            assert len(skipped) < 12000
            # Let the backlog drain (more resyncs may follow while it does), then the
            # stream continues gap-free from the last seq the client saw.
            last = snap["seq"]
            while True:
                try:
                    m = recv_json(ws, timeout=1.0)
                except TimeoutError:
                    break
                if m["type"] in ("event", "snapshot"):
                    last = m["seq"]
            h.events.emit("warning", message="after")
            ev, _ = recv_until(ws, lambda m: m.get("type") == "event" and m["data"].get("message") == "after")
            assert ev["seq"] == last + 1
    finally:
        mon.stop()
        h.close(5)


def test_bad_messages_get_errors_and_size_is_limited(host):
    with ws_connect(host.monitor.port) as ws:
        recv_json(ws)
        ws.send(b"\x00\x01")
        assert recv_until(ws, lambda m: m.get("type") == "error")[0]["error"]["code"] == "bad_message"
        ws.send("{not json")
        assert recv_until(ws, lambda m: m.get("type") == "error")[0]["error"]["code"] == "bad_message"
        reply = request(ws, {"type": "launch_missiles"}, 7)
        assert reply["ok"] is False and reply["error"]["code"] == "unknown_type"
        ws.send(json.dumps({"type": "ping", "pad": "y" * (MAX_MESSAGE + 10)}))
        with pytest.raises(ConnectionClosed) as exc:
            for _ in range(100):
                ws.recv(timeout=WAIT)
        assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009  # message too big


# ----------------------------------------------------------------------------- HTTP routes
def test_logs_api_since(host):
    logging.getLogger("luna_daemon.tests").warning("marker-%s", "7731")
    status, _, body = http_get(host.monitor.port, "/api/logs?since=0", bearer(host))
    data = json.loads(body)
    assert status == 200
    hit = [line for line in data["lines"] if line["message"] == "marker-7731"]
    assert hit and hit[0]["level"] == "WARNING" and data["last"] >= hit[0]["seq"]
    status, _, body = http_get(host.monitor.port, f"/api/logs?since={data['last']}", bearer(host))
    assert json.loads(body)["lines"] == [] or all(l["seq"] > data["last"] for l in json.loads(body)["lines"])
    status, headers, body = http_get(host.monitor.port, "/api/logfile", bearer(host))
    assert status == 200 and b"marker-7731" in body
    assert "attachment" in headers["content-disposition"]


def test_dashboard_static_files_and_headers(host):
    port = host.monitor.port
    status, headers, body = http_get(port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<title>Luna Daemon" in body
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and f"ws://127.0.0.1:{port}" in csp
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    for asset in ("app.js", "style.css", "favicon.svg"):
        assert http_get(port, f"/static/{asset}")[0] == 200, asset
    for bad in ("/static/../monitor.py", "/static/%2e%2e/monitor.py", "/static/", "/nope", "/api/nope"):
        assert http_get(port, bad)[0] == 404, bad
    assert b"cdn" not in http_get(port, "/static/app.js")[2].lower() and b"http" not in body.replace(b"http-equiv", b"")


# ----------------------------------------------------------------------------- lifecycle
def test_port_in_use_is_named_and_stop_frees_the_port(make_settings):
    blocker = _listening_socket()
    taken = blocker.getsockname()[1]
    h = Host(make_settings(monitor_port=taken), log_to_stderr=False)
    try:
        with pytest.raises(MonitorError) as exc:
            Monitor(h).start()
        assert str(taken) in str(exc.value) and "monitor_port" in str(exc.value)
        warnings = []
        h.events.subscribe(lambda e: warnings.append(e) if e.type == "warning" else None)
        h.start_monitor()  # the host logs and carries on without a dashboard
        assert h.monitor is None and warnings and str(taken) in warnings[0].data["message"]
    finally:
        blocker.close()
        h.close(5)

    h = Host(make_settings(), log_to_stderr=False)
    mon = Monitor(h)
    mon.start()
    port = mon.port
    with ws_connect(port) as ws:
        recv_json(ws)
        mon.stop()
        with pytest.raises(ConnectionClosed):
            for _ in range(100):
                ws.recv(timeout=WAIT)
    mon.stop()  # idempotent
    assert mon.port is None
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))  # the port is free again
    s.close()
    h.close(5)


# ----------------------------------------------------------------------------- settings
def test_settings_save_validates_and_keeps_user_keys(make_settings, tmp_path):
    config = tmp_path / "home" / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('# mine\nstop_timeout = "20s"\nlog_level = "DEBUG"\nvae_dtype = "fp32"  # small VAEs\n', encoding="utf-8")
    h = Host(make_settings(clip_dtype="fp32"), log_to_stderr=False)
    h.start_monitor()
    try:
        assert h.settings.config_file == str(config)
        with ws_connect(h.monitor.port) as ws:
            snap = recv_json(ws)
            desc = snap["settings"]
            assert desc["choices"]["device"] == settings_io.device_choices(available_devices())
            assert desc["fields"]["vae_dtype"] == {"value": "fp32", "source": "file", "overridden": False,
                                                   "restart": "daemon", "locked": False, "hint": "",
                                                   "help": "VAE precision: auto, fp32, fp16, bf16"}
            assert desc["fields"]["clip_dtype"]["overridden"] is True  # set by a flag in this test
            assert login(ws, token=h.daemon.token)["ok"]

            bad = request(ws, {"type": "save_settings", "values": {
                "vae_dtype": "fp64", "clip_device": "cuda:7", "max_model_bytes": "cpu", "keep_alive": "soon",
                "lora_cache_bytes": "lots", "notifications": "perhaps"}}, 1)
            assert bad["ok"] is False and bad["error"]["code"] == "invalid"
            errors = bad["result"]["errors"]
            assert set(bad["result"]["codes"].values()) == {"invalid"}
            assert "fp16" in errors["vae_dtype"] and "fp64" in errors["vae_dtype"]
            assert "cuda:7" in errors["clip_device"] and "not a device" in errors["clip_device"]
            assert "device=size" in errors["max_model_bytes"] and "byte size" in errors["lora_cache_bytes"]
            assert "keep_alive" not in errors["keep_alive"] and "duration" in errors["keep_alive"]
            assert "true or false" in errors["notifications"]
            # A setting that is not on the page is read-only too; a made-up key is unknown.
            bad = request(ws, {"type": "save_settings", "values": {"token": "x", "max_body_bytes": "1GiB"}}, 3)
            assert bad["error"]["code"] == "read_only"
            assert "unknown setting" in bad["result"]["errors"]["token"]
            assert "cannot be changed from the dashboard" in bad["result"]["errors"]["max_body_bytes"]
            assert config.read_text(encoding="utf-8").startswith("# mine"), "nothing written on error"

            ok = request(ws, {"type": "save_settings", "values": {
                "vae_dtype": "fp16", "keep_alive": "30m", "notifications": False, "max_model_bytes": "cpu=2GiB",
                "clip_dtype": "fp16"}}, 2)
            assert ok["ok"] is True, ok
            res = ok["result"]
            # keep_alive applies live (read on each use); a precision default reaches the
            # loaded models only through a restart.
            assert set(res["restart"]) == {"vae_dtype"}
            assert res["overridden"] == ["clip_dtype"]  # set by a flag here
            snap2, _ = recv_until(ws, lambda m: m.get("type") == "snapshot")
            assert snap2["settings"]["fields"]["vae_dtype"]["value"] == "fp16"

        data = tomllib.loads(config.read_text(encoding="utf-8"))
        assert data["vae_dtype"] == "fp16" and data["keep_alive"] == "30m" and data["notifications"] is False
        assert data["max_model_bytes"] == {"cpu": "2GiB"} and data["clip_dtype"] == "fp16"
        assert data["stop_timeout"] == "20s" and data["log_level"] == "DEBUG", "the user's keys are kept"
        text = config.read_text(encoding="utf-8")
        assert text.startswith('# mine\nstop_timeout = "20s"\nlog_level = "DEBUG"\n'), "comments and layout are kept"
        assert 'vae_dtype = "fp16"  # small VAEs\n' in text, "a changed value keeps its line and comment"
        assert (config.parent / "config.toml.bak").read_text(encoding="utf-8").startswith("# mine")
        # Applied to the live settings the daemon starts from, except flag/env overrides.
        assert h.settings.vae_dtype == "fp16" and h.settings.keep_alive == 1800.0
        assert h.settings.max_model_bytes == {"cpu": 2 * 1024**3} and h.settings.notifications is False
        assert h.settings.clip_dtype == "fp32", "the flag keeps winning"
        # And the file loads cleanly through the normal loader.
        from luna_daemon.settings import Settings

        assert Settings.load(config, env={"LUNA_HOME": str(tmp_path / "home")}).vae_dtype == "fp16"
    finally:
        h.close(5)


# ----------------------------------------------------------------------------- hostile input (issue 11)
def last_log_seq(host) -> int:
    lines = host.log_tail.since(0, 5000)
    return lines[-1]["seq"] if lines else 0


def errors_logged(host, since: int) -> list[dict]:
    """Log records after ``since`` that are errors or carry a traceback."""
    return [line for line in host.log_tail.since(since, 5000)
            if line["level"] in ("ERROR", "CRITICAL") or "Traceback" in line["text"]]


def raw_http(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One GET with exactly these header lines (duplicates and all); the status and body."""
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(head.encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_duplicate_or_malformed_host_and_origin_get_400(host):
    port = host.monitor.port
    good = f"127.0.0.1:{port}"
    cases = {
        "two Host": [("Host", good), ("Host", good)],
        "two different Host": [("Host", good), ("Host", f"evil.example:{port}")],
        "Host list": [("Host", f"{good}, evil.example")],
        "Host with userinfo": [("Host", f"user@{good}")],
        "empty Host": [("Host", "")],
        "no Host": [],
        "two Origin": [("Host", good), ("Origin", f"http://{good}"), ("Origin", f"http://{good}")],
        "Origin not a URL": [("Host", good), ("Origin", "javascript:alert(1)")],
        "Origin broken IPv6": [("Host", good), ("Origin", "http://[::1")],
        "two Sec-Fetch-Site": [("Host", good), ("Sec-Fetch-Site", "same-origin"), ("Sec-Fetch-Site", "cross-site")],
    }
    mark = last_log_seq(host)
    for path in ("/api/status", "/ws", "/", "/healthz"):
        for name, headers in cases.items():
            status, body = raw_http(port, path, headers)
            assert status == 400, (path, name, status, body)
            assert 0 < len(body) < 300 and b"Traceback" not in body, (path, name, body)
    # A path that urlsplit would read as a broken IPv6 netloc is just not found.
    assert raw_http(port, "//[", [("Host", good)])[0] == 404
    # The good request still works, and the server logged no error or traceback.
    assert raw_http(port, "/api/status", [("Host", good)])[0] == 200
    assert errors_logged(host, mark) == []


def test_unexpected_error_in_a_route_is_a_short_500_and_one_log_line(host, monkeypatch):
    from luna_daemon.web import views

    def broken(*args, **kwargs):
        raise RuntimeError("the models view exploded")

    # Fault injection into a dependency of the route (the route's error handling is
    # what is under test): a view that fails the way a half-torn-down daemon can.
    monkeypatch.setattr(views, "models", broken)
    mark = last_log_seq(host)
    status, headers, body = http_get(host.monitor.port, "/api/models")
    assert status == 500 and headers["content-type"].startswith("text/plain")
    assert len(body) < 200 and b"Traceback" not in body and b"exploded" not in body
    lines = errors_logged(host, mark)
    assert len(lines) == 1, lines
    assert "/api/models" in lines[0]["message"] and "exploded" in lines[0]["message"]
    assert "Traceback" not in lines[0]["text"] and "\n" not in lines[0]["text"]
    # The server keeps answering.
    assert http_get(host.monitor.port, "/api/status")[0] == 200


def test_deep_or_odd_websocket_messages_get_typed_errors(host):
    mark = last_log_seq(host)
    with ws_connect(host.monitor.port) as ws:
        recv_json(ws)
        ws.send("[" * 50_000)  # under the size limit; recursion would blow up the parser
        err, _ = recv_until(ws, lambda m: m.get("type") == "error")
        assert err["error"]["code"] == "bad_message" and "nested" in err["error"]["message"]
        deep: object = "x"
        for _ in range(40):
            deep = [deep]
        ws.send(json.dumps({"type": "ping", "id": 1, "pad": deep}))
        err, _ = recv_until(ws, lambda m: m.get("type") == "error")
        assert err["error"]["code"] == "bad_message" and "nested" in err["error"]["message"]
        for i, odd in enumerate([["stop"], {"a": 1}, None, 7], start=10):
            reply = request(ws, {"type": odd}, i)
            assert reply["ok"] is False and reply["error"]["code"] == "bad_message", odd
        ws.send(json.dumps({"type": "ping", "id": 100}))
        assert recv_until(ws, lambda m: m.get("type") == "pong" and m.get("id") == 100)[0]
        # Far over the size limit: a clean 1009 close, not an internal error (1011).
        ws.send("[" * 200_000)
        with pytest.raises(ConnectionClosed) as exc:
            for _ in range(100):
                ws.recv(timeout=WAIT)
        assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009
    assert MAX_MESSAGE <= 64 * 1024
    assert errors_logged(host, mark) == []


# ----------------------------------------------------------------------------- sessions per endpoint
def test_log_endpoints_need_a_session_health_and_metrics_stay_open(host):
    port = host.monitor.port
    logging.getLogger("luna_daemon.tests").warning("private-prompt-%s", "5512")
    for path in ("/api/logs?since=0", "/api/logfile"):
        for creds in ({}, {"X-Luna-Session": "made-up"}, {"Authorization": "Bearer wrong"},
                      {"Authorization": f"Basic {host.daemon.token}"}):
            status, headers, body = http_get(port, path, creds)
            assert status == 401, (path, creds)
            assert b"5512" not in body and b"session" in body, body
    for path, want in (("/healthz", 503), ("/metrics", 200), ("/api/status", 200), ("/api/models", 200), ("/", 200)):
        assert http_get(port, path)[0] == want, path

    # The page's session (from the tray's login link) and the token both unlock them.
    with ws_connect(port) as ws:
        recv_json(ws)
        session = login(ws, secret=secret_of(host.dashboard_url("logs")))["session"]
    status, _, body = http_get(port, "/api/logs?since=0", {"X-Luna-Session": session})
    assert status == 200 and any(line["message"] == "private-prompt-5512" for line in json.loads(body)["lines"])
    status, _, body = http_get(port, "/api/logfile", {"Authorization": f"Bearer {host.daemon.token}"})
    assert status == 200 and b"private-prompt-5512" in body


def test_websocket_without_a_session_gets_no_log_lines(host):
    noisy = logging.getLogger("luna_daemon.tests")
    noisy.warning("private-prompt-4411")
    with ws_connect(host.monitor.port) as ws:
        snap = recv_json(ws)
        assert snap["type"] == "snapshot" and snap["logs"] == []
        last = snap["seq"]
        noisy.warning("private-prompt-4412")
        hidden, seen = recv_until(ws, lambda m: m.get("type") == "event")
        assert hidden["name"] == "hidden" and hidden["seq"] == last + 1, "the stream stays gap-free"
        assert "private-prompt" not in json.dumps([hidden, *seen])

        assert login(ws, token=host.daemon.token)["ok"]
        snap, _ = recv_until(ws, lambda m: m.get("type") == "snapshot")
        assert snap["reason"] == "login" and snap["authenticated"] is True
        assert {"private-prompt-4411", "private-prompt-4412"} <= {line["message"] for line in snap["logs"]}
        noisy.warning("private-prompt-4413")
        ev, _ = recv_until(ws, lambda m: m.get("type") == "event" and m["name"] == "log")
        assert ev["data"]["line"]["message"] == "private-prompt-4413"


# ----------------------------------------------------------------------------- scope-widening settings
SCOPE_KEYS = ("port", "monitor_port", "model_roots", "comfyui_root", "engine")


def test_dashboard_cannot_widen_what_the_daemon_runs_or_reads(running, tmp_path):
    d = running.daemon
    port = running.monitor.port
    config = running.settings.config_file
    before = {k: getattr(running.settings, k) for k in (*SCOPE_KEYS, "preload", "allowed_origins")}
    # A folder that passes for a ComfyUI root: the daemon would import its comfy/sd.py.
    evil = tmp_path / "evil"
    (evil / "comfy").mkdir(parents=True)
    (evil / "comfy" / "sd.py").write_text("raise SystemExit('imported code from a web page')\n", encoding="utf-8")
    with ws_connect(port, origin=f"http://127.0.0.1:{port}") as ws:
        fields = recv_json(ws)["settings"]["fields"]
        for key in SCOPE_KEYS:
            assert fields[key]["locked"] is True, key
            assert "config.toml" in fields[key]["hint"], key
        for key in settings_io.EDITABLE:
            assert fields[key]["locked"] is False, key
        assert login(ws, secret=secret_of(running.dashboard_url("settings")))["ok"]

        widen = {"comfyui_root": str(evil), "model_roots": "/", "engine": "comfy", "port": "19283",
                 "monitor_port": "19285", "preload": "vae:/etc/passwd", "log_dir": str(tmp_path),
                 "allowed_origins": "http://evil.example"}
        for i, msg in enumerate([{"type": "save_settings", "values": widen},
                                 # the token in the message does not unlock them either
                                 {"type": "save_settings", "values": widen, "token": d.token},
                                 # one locked key spoils the whole save
                                 {"type": "save_settings", "values": {"vae_dtype": "fp16", "comfyui_root": str(evil)}}],
                                start=1):
            reply = request(ws, msg, i)
            assert reply["ok"] is False and reply["error"]["code"] == "read_only", reply
            errors = reply["result"]["errors"]
            assert set(errors) == set(msg["values"]) - {"vae_dtype"}, errors
            for key, text in errors.items():
                assert "cannot be changed from the dashboard" in text and "config.toml" in text, (key, text)
            assert not __import__("os").path.exists(config), "nothing written"
        assert {k: getattr(running.settings, k) for k in before} == before
        assert running.settings.vae_dtype != "fp16"
        # A restart from the page starts the same daemon as before.
        reply = request(ws, {"type": "restart"}, 9)
        assert reply["ok"] is True and d.state == "running"
    assert d.snapshot()["engine"] == "standalone"


# ----------------------------------------------------------------------------- several instances
def wait_for(pred, timeout: float = WAIT, what: str = "condition"):
    """Poll ``pred`` until it returns something truthy (bounded); returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.1)


def api_status(host) -> dict:
    status, _, body = http_get(host.monitor.port, "/api/status")
    assert status == 200
    return json.loads(body)


def card(host, name: str) -> dict:
    return next(i for i in api_status(host)["instances"] if i["name"] == name)


@pytest.fixture(scope="module")
def pair_host(tmp_path_factory, model_dir):
    """A real Host with a VAE-only primary (in-process) and a CLIP-only child process, both
    on free ports, from a config.toml with two [[instances]] tables; all started. Shared by
    the tests below (a child start costs seconds); each leaves both instances running,
    the hung-child test comes last."""
    from luna_daemon.settings import Settings

    tmp_path = tmp_path_factory.mktemp("pair")
    config = tmp_path / "pair.toml"
    config.write_text(
        f'engine = "standalone"\nmonitor_port = 0\nlock_port = 0\nhealth_interval = 0.5\n'
        f'model_roots = ["{model_dir.as_posix()}"]\n\n'
        '[[instances]]\nname = "vae"\nservice = "vae"\nport = 0\n\n'
        '[[instances]]\nname = "clip"\nservice = "clip"\nport = 0\n')
    h = Host(Settings.load(config, env={"LUNA_HOME": str(tmp_path / "home")}), log_to_stderr=False)
    try:
        h.start_monitor()
        assert h.monitor is not None
        assert h.start_all() == {}
        yield h
    finally:
        h.close(10)


def test_every_instance_has_a_card_metrics_and_its_own_actions(pair_host, model_dir):
    h = pair_host
    port = h.monitor.port
    child = h.instance("clip")
    s = api_status(h)
    assert s["overall"] == "running" and s["overall_colour"] == "green"
    assert [(i["name"], i["primary"], i["service"], i["state"], i["colour"]) for i in s["instances"]] == [
        ("vae", True, "vae", "running", "green"), ("clip", False, "clip", "running", "green")]
    assert s["instances"][1]["address"] == f"127.0.0.1:{child.address[1]}"
    assert set(s["instances"][1]["devices"]) == {"vae", "clip"}

    # A model loaded on the child shows on its card, in the models list and in /metrics.
    with DaemonClient(*child.address, token=child.token, timeout=60) as c:
        info = c.clip_load([str(model_dir / "clip_l")])
    wait_for(lambda: card(h, "clip")["models"] == 1, what="the child's card showing its model")
    status, _, body = http_get(port, "/api/models")
    assert [(m["instance"], m["id"]) for m in json.loads(body)["models"]] == [("clip", info["model"])]
    samples = wait_for(lambda: (m := metric_samples(port)).get(
        key("luna_daemon_requests_total", "clip", op="clip_load", outcome="ok")) == 1.0 and m, what="child metrics")
    assert samples[key("luna_daemon_up", "vae")] == samples[key("luna_daemon_up", "clip")] == 1.0
    assert samples[key("luna_daemon_models_loaded", "clip", kind="clip")] == 1.0
    assert samples[key("luna_daemon_models_loaded", "vae", kind="clip")] == 0.0
    assert key("luna_daemon_requests_total", "vae", op="clip_load", outcome="ok") not in samples
    assert samples[key("luna_daemon_model_bytes", "clip", device="cpu")] == info["bytes"] > 0
    # The child's histogram, from its status answer's latency.
    assert samples[key("luna_daemon_request_duration_seconds_count", "clip", op="clip_load")] == 1.0
    assert samples[key("luna_daemon_request_duration_seconds_bucket", "clip", le="+Inf", op="clip_load")] == 1.0
    assert samples[key("luna_daemon_request_duration_seconds_sum", "clip", op="clip_load")] > 0
    assert all("instance" in dict(labels) for _, labels in samples)

    with ws_connect(port) as ws:
        recv_json(ws)
        assert login(ws, token=h.daemon.token)["ok"]
        # Unknown or malformed instance names: a typed error naming the configured ones.
        for i, bad in enumerate(["nope", 7, None], start=1):
            reply = request(ws, {"type": "stop", "instance": bad}, i)
            assert reply["ok"] is False and reply["error"]["code"] == "bad_args", bad
        assert "configured: vae, clip" in request(ws, {"type": "unload", "all": True, "instance": "x"}, 4)["error"]["message"]
        assert (h.daemon.state, child.state) == ("running", "running")

        reply = request(ws, {"type": "unload", "all": True, "instance": "clip"}, 5)
        assert reply["ok"] is True and [(u["instance"], u["id"]) for u in reply["result"]["unloaded"]] == [
            ("clip", info["model"])]

        # Stopping one instance leaves the other serving.
        reply = request(ws, {"type": "stop", "instance": "clip"}, 6)
        assert reply["ok"] is True and reply["result"]["state"] == "stopped"
        assert (h.daemon.state, child.state) == ("running", "stopped")
        s = api_status(h)
        assert [i["state"] for i in s["instances"]] == ["running", "stopped"] and s["overall"] == "running"
        stopped = metric_samples(port)
        assert stopped[key("luna_daemon_up", "clip")] == 0.0 and stopped[key("luna_daemon_up", "vae")] == 1.0
        # Its counters stay visible while it is stopped, as the primary's do.
        assert stopped[key("luna_daemon_requests_total", "clip", op="clip_load", outcome="ok")] == 1.0
        assert request(ws, {"type": "unload", "all": True, "instance": "clip"}, 7)["error"]["code"] == "not_running"

        reply = request(ws, {"type": "start", "instance": "clip"}, 8)
        assert reply["ok"] is True and reply["result"]["state"] == "running" and child.state == "running"

        # No instance: the top-level Stop / Start act on all.
        reply = request(ws, {"type": "stop"}, 9)
        assert reply["ok"] is True and reply["result"]["states"] == {"vae": "stopped", "clip": "stopped"}
        assert api_status(h)["overall"] == "stopped"
        reply = request(ws, {"type": "start"}, 10)
        assert reply["ok"] is True and reply["result"]["states"] == {"vae": "running", "clip": "running"}


def test_chart_history_sums_every_instance(pair_host, model_dir):
    from luna_daemon.web.history import History
    from luna_daemon.web.views import models

    h = pair_host
    child = h.instance("clip")
    clock = [1_000_000.0]
    hist = History(h, h.monitor.children, clock=lambda: clock[0])

    def child_pings() -> int:
        cached = h.monitor.children.get("clip") or {}
        return ((cached.get("status") or {}).get("requests") or {}).get("by_op", {}).get("ping", {}).get("ok", 0)

    with DaemonClient(*child.address, token=child.token, timeout=60) as c:
        info = c.clip_load([str(model_dir / "clip_l")])
        wait_for(lambda: card(h, "clip")["models"] >= 1, what="the child's card showing its model")
        before = child_pings()
        hist.sample()
        for _ in range(10):
            c.ping()
        # The child's numbers come from the poller's status answers (every 0.5 s here).
        wait_for(lambda: child_pings() >= before + 10, what="the poller fetching the child's counters")
        clock[0] += 10.0
        got = hist.sample()
        loaded = sum(m["bytes"] for m in models(h, h.monitor.children) if m["device"] == "cpu")
        c.unload(info["model"])
    assert got["ops"]["ping"]["rps"] >= 1.0, got["ops"]   # the child's 10 pings in 10 s (or more)
    assert got["ops"]["ping"]["p95"] is not None
    assert got["clients"] >= 1
    assert loaded > 0 and got["mem"]["cpu"]["weights"] == loaded  # the child's model counted


def test_log_viewer_filters_by_instance_and_downloads_each_file(pair_host):
    h = pair_host
    port = h.monitor.port
    status, _, body = http_get(port, "/api/logs?since=0&limit=5000", bearer(h))
    lines = json.loads(body)["lines"]
    assert {ln["instance"] for ln in lines} >= {"vae", "clip"}, "the child's forwarded lines are in the tail"
    for name in ("vae", "clip"):
        status, _, body = http_get(port, f"/api/logs?since=0&instance={name}", bearer(h))
        got = json.loads(body)["lines"]
        assert status == 200 and got and {ln["instance"] for ln in got} == {name}
    status, _, body = http_get(port, "/api/logs?instance=nope", bearer(h))
    assert status == 400 and b"configured: vae, clip" in body
    status, headers, body = http_get(port, "/api/logfile?instance=clip", bearer(h))
    assert status == 200 and 'filename="luna-daemon-clip.log"' in headers["content-disposition"]
    assert body, "the child writes its own log file"
    assert http_get(port, "/api/logfile?instance=nope", bearer(h))[0] == 400
    assert http_get(port, "/api/logfile?instance=clip")[0] == 401, "still needs a session"


def test_a_hung_child_never_holds_up_the_dashboard_or_metrics(pair_host):
    import os
    import signal

    h = pair_host
    child = h.instance("clip")
    pid = child.pid
    assert pid
    os.kill(pid, signal.SIGSTOP)  # the process exists and holds its port but answers nothing
    try:
        for _ in range(3):
            t0 = time.monotonic()
            samples = metric_samples(h.monitor.port)
            status = api_status(h)
            # Bounded, not a speed claim: a scrape that waited on the child would hang.
            assert time.monotonic() - t0 < 5.0
            assert key("luna_daemon_up", "clip") in samples and len(status["instances"]) == 2
            time.sleep(0.6)  # past a poll interval, so the poller has tried the child
    finally:
        os.kill(pid, signal.SIGCONT)
