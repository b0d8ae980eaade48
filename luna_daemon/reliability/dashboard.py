"""Scenario 6: the dashboard (monitor port) under hostile HTTP and WebSocket input, and
scope-widening settings saved from a logged-in browser session.

The HTTP / WebSocket cases hit the main ``serve`` daemon's monitor. The widening case
needs what a browser gets from the tray's "Open Dashboard" -- a one-time login link --
so it runs against a small host process (``Host`` with daemon and monitor, as the tray
and ``serve`` compose it) that prints its login links: the flow of
tests/test_web_monitor.py, with the page's own ``Origin``.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from luna_daemon.netutil import free_port
from luna_daemon.reliability.harness import Background, Suite, kill, read_line, send_line, traceback_failure
from luna_daemon.reliability.wire import call, http_get, http_raw

HOST_CHILD = textwrap.dedent(r'''
    import json, sys
    from luna_daemon.host import Host
    from luna_daemon.settings import Settings
    h = Host(Settings.load())
    h.acquire()
    h.start_monitor()
    try:
        h.daemon.start()
    except Exception as exc:
        sys.stdout.write(json.dumps({"error": str(exc)}) + "\n"); sys.stdout.flush()
    urls = [h.dashboard_url("settings") for _ in range(int(sys.argv[1]))] if h.monitor else []
    # Replies to the suite go on stdout, one JSON line each (the daemon logs to stderr).
    sys.stdout.write(json.dumps({"monitor_port": h.monitor.port if h.monitor else None, "urls": urls}) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()  # until the suite is done with it
    h.close(10)
''')


def _ws_outcome(port: int, message: str) -> dict[str, Any]:
    """Send one message after the snapshot: an error/reply message, or the close code."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    out: dict[str, Any] = {}
    try:
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10, close_timeout=2, max_size=None) as ws:
            ws.recv(timeout=10)
            ws.send(message)
            m = _ws_wait(ws, lambda m: m.get("type") in ("error", "reply"), 10)
            out["reply"] = None if m is None else ((m.get("error") or {}).get("code") or m.get("type"))
            out["hung"] = m is None
    except ConnectionClosed as exc:
        out["close_code"] = exc.rcvd.code if exc.rcvd is not None else None
    except (OSError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _ws_wait(ws: Any, pred: Callable[[dict], bool], timeout: float = 15.0) -> dict | None:
    """The first message that satisfies ``pred`` within ``timeout``, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            return None
        if isinstance(m, dict) and pred(m):
            return m
    return None


class DashboardHost:
    """The login-link host process, started in the background (``ready``)."""

    def __init__(self, suite: Suite):
        work = suite.work
        self.home = work.root / "home-dashboard"
        (self.home / "config").mkdir(parents=True)
        self.evil = work.root / "evil-comfyui"
        self.marker = work.root / "evil-code-ran"
        (self.evil / "comfy").mkdir(parents=True)
        # Importing any of it would run code a web page chose (the package's __init__ runs first).
        for name in ("__init__.py", "sd.py"):
            (self.evil / "comfy" / name).write_text(f"open({str(self.marker)!r}, 'w').write('ran')\n")
        # Keys in the file (not env), so that what a save changes really takes effect.
        (self.home / "config" / "config.toml").write_text(
            f'engine = "standalone"\nmodel_roots = [{json.dumps(str(work.root / "models"))}]\n', encoding="utf-8")
        self.port = free_port()
        env = work.env(LUNA_HOME=str(self.home), LUNA_PORT=str(self.port), LUNA_MONITOR_PORT=str(free_port()),
                       LUNA_LOCK_PORT=str(free_port()), LUNA_LOG_LEVEL="WARNING")
        self.proc = work.python(HOST_CHILD, "2", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                stderr=self.home / "stderr.txt")
        self.ready = Background(self._wait, "prepare-dashboard-host")

    def _wait(self) -> dict[str, Any]:
        for _ in range(3):
            line = read_line(self.proc, 180)
            if line is None:
                break
            info = json.loads(line)
            if "monitor_port" in info:
                if not info.get("urls"):
                    raise RuntimeError(f"the dashboard host has no monitor: {info}")
                return info
        raise RuntimeError("the dashboard host did not start")

    def close(self) -> None:
        send_line(self.proc, "")
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        kill(self.proc)


def widening(suite: Suite) -> dict[str, Any]:
    """A logged-in browser session tries every setting that widens what the daemon
    imports or reads; then, if a ComfyUI root got in, restarts the daemon as a page could."""
    from websockets.sync.client import connect

    host: DashboardHost = suite.prepared.get("dashboard") or DashboardHost(suite)
    # The code-execution pair first: once model_roots is widened, the model load that
    # would import the planted package is refused before it gets that far.
    attempts = {
        "comfyui_root = a folder with comfy/sd.py": ("comfyui_root", str(host.evil)),
        "engine = comfy": ("engine", "comfy"),
        "model_roots = /": ("model_roots", "/"),
        "model_roots = home folder": ("model_roots", str(Path.home())),
        "preload": ("preload", str(suite.models.vae)),
        "allowed_origins": ("allowed_origins", "http://evil.example"),
        "host = 0.0.0.0": ("host", "0.0.0.0"),
        "state_dir": ("state_dir", "/"),
    }
    out: dict[str, Any] = {"attempts": {}}
    try:
        info = host.ready.result(200)
        port = info["monitor_port"]
        with connect(f"ws://127.0.0.1:{port}/ws", origin=f"http://127.0.0.1:{port}", open_timeout=10) as ws:
            ws.recv(timeout=10)
            ws.send(json.dumps({"type": "login", "secret": info["urls"][0].split("login=", 1)[1]}))
            auth = _ws_wait(ws, lambda m: m.get("type") == "auth")
            out["logged_in"] = bool(auth and auth.get("ok"))
            for i, (label, (key, value)) in enumerate(attempts.items(), start=1):
                ws.send(json.dumps({"type": "save_settings", "id": i, "values": {key: value}}))
                reply = _ws_wait(ws, lambda m, i=i: m.get("type") == "reply" and m.get("id") == i)
                out["attempts"][label] = ("no answer" if reply is None else "ACCEPTED" if reply.get("ok")
                                          else (reply.get("error") or {}).get("code", "refused"))
                if i == 2 and "ACCEPTED" in out["attempts"].values():
                    # A saved root takes effect on the next daemon start: restart it as a
                    # page would; the next model load by any client then imports from it.
                    ws.send(json.dumps({"type": "restart", "id": 99}))
                    _ws_wait(ws, lambda m: m.get("type") == "reply" and m.get("id") == 99, timeout=60)
                    token = (host.home / "config" / "token").read_text().strip()
                    call(host.port, "vae_load", {"path": str(suite.models.vae)}, token, 60)
        out["code_executed"] = host.marker.exists()
        config = (host.home / "config" / "config.toml").read_text(encoding="utf-8")
        out["widened_values_in_config"] = [label for label, (_, v) in attempts.items() if json.dumps(v) in config]
    finally:
        host.close()
    out["accepted"] = sum(v == "ACCEPTED" for v in out["attempts"].values())
    return out


def scenario_dashboard(suite: Suite) -> dict[str, Any]:
    d = suite.main
    port = d.monitor_port
    tb = d.stderr_offset()
    h = f"127.0.0.1:{port}".encode()
    get = b"GET /api/status HTTP/1.1\r\n"
    raw = {
        "duplicate Host": get + b"Host: " + h + b"\r\nHost: evil.example\r\n\r\n",
        "duplicate Host (same value)": get + b"Host: " + h + b"\r\nHost: " + h + b"\r\n\r\n",
        "duplicate Origin": get + b"Host: " + h + b"\r\nOrigin: http://" + h + b"\r\nOrigin: http://evil.example\r\n\r\n",
        "no Host": get + b"\r\n",
        "empty Host": get + b"Host: \r\n\r\n",
        "binary Host": get + b"Host: \xff\xfe\x00\r\n\r\n",
        "8 KB path": b"GET /api/" + b"a" * 8192 + b" HTTP/1.1\r\nHost: " + h + b"\r\n\r\n",
        "bad query": b"GET /api/logs?since=abc&limit=-5&since=%zz HTTP/1.1\r\nHost: " + h + b"\r\n\r\n",
        "POST": b"POST /api/status HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: 5\r\n\r\nhello",
    }
    fails: list[str] = []
    answers = {name: http_raw(port, req) for name, req in raw.items()}
    # A status code, or "closed" when the server dropped a request it could not parse.
    http = {name: a.status or ("hung" if a.hung else "closed") for name, a in answers.items()}
    for name, a in answers.items():
        if a.hung:
            fails.append(f"HTTP '{name}': neither an answer nor a close within 5 s")
        elif a.status is not None and a.status >= 500:
            fails.append(f"HTTP '{name}' answered {a.status}")
    for name in ("duplicate Host", "duplicate Origin"):
        if isinstance(http[name], int) and http[name] < 400:
            fails.append(f"HTTP '{name}' was served ({http[name]}): an ambiguous Host/Origin must be refused")
    unauth = {path: http_get(port, path)[0] for path in ("/api/logs", "/api/logfile")}
    for path, status in unauth.items():
        if status == 200:
            fails.append(f"{path} is readable without a session")
    ws = {
        "200,000 nested [": _ws_outcome(port, "[" * 200_000),
        "40,000 nested objects": _ws_outcome(port, '{"a":' * 40_000 + "1" + "}" * 40_000),
        "nested inside a control message": _ws_outcome(port, '{"type":"save_settings","values":' + "[" * 50_000 + "]" * 50_000 + "}"),
    }
    ws_internal = 0
    for name, r in ws.items():
        if r.get("close_code") == 1011 or r.get("reply") == "internal" or r.get("hung") or r.get("error"):
            ws_internal += 1
            fails.append(f"WebSocket '{name}': {r}")
    healthz = http_get(port, "/healthz")[0]
    if healthz != 200:
        fails.append(f"/healthz answered {healthz} after the hostile requests")
    try:
        wide = widening(suite)
    except Exception as exc:  # noqa: BLE001 - reported as a failure
        wide = {"error": f"{type(exc).__name__}: {exc}", "accepted": None}
        fails.append(f"the scope-widening check could not run: {exc}")
    if wide.get("logged_in") is False:
        fails.append("the browser login failed, so the widening check proved nothing")
    if wide.get("accepted"):
        fails.append(f"{wide['accepted']} scope-widening settings were accepted from a browser session: "
                     + ", ".join(k for k, v in wide["attempts"].items() if v == "ACCEPTED"))
    if wide.get("code_executed"):
        fails.append("code chosen by the web page ran in the daemon (comfyui_root, restart, next model load)")
    out: dict[str, Any] = {"http": http, "http_5xx": sum(1 for a in answers.values() if (a.status or 0) >= 500),
                           "http_hung": sum(a.hung for a in answers.values()), "unauthenticated": unauth,
                           "websocket": ws, "ws_internal_errors": ws_internal, "healthz_after": healthz,
                           "widening": wide, "widenings_accepted": wide.get("accepted") or 0}
    out.update(d.tracebacks_since(tb))
    fails += traceback_failure(out)
    out["failures"] = fails
    return out
