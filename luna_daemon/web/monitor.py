"""The monitor web server: dashboard, live events, health and metrics on ``monitor_port``.

One ``websockets`` asyncio server on a dedicated thread with its own event loop. Plain
HTTP (``GET`` only) is answered from ``process_request``; ``/ws`` upgrades to a WebSocket.

What a caller (the host, the tray) can rely on:

* ``start()`` binds ``settings.host:settings.monitor_port`` synchronously and raises
  :class:`MonitorError` naming the port when it is taken; it returns once the server is
  accepting. ``port`` is then the real port (``monitor_port = 0`` picks a free one).
* ``stop()`` closes every connection, stops the thread, frees the port. Idempotent.
* ``url_for(page)`` returns ``http://127.0.0.1:<port>/#page=<page>&login=<secret>`` with
  a new one-time login secret (valid ``login_ttl`` seconds) that lets the page change
  things (start/stop/unload/settings) without ever seeing the per-install token.
* The daemon is never slowed by a browser: events reach each WebSocket client through a
  bounded queue filled without blocking; a client that falls behind has its queue
  dropped and gets a fresh snapshot instead.

Routes, the message protocol and the security model are documented in docs/monitor.md.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import mimetypes
import socket
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from luna_daemon.netutil import PortInUse, bind_listener
from luna_daemon.web import settings_io, views
from luna_daemon.web.auth import LOGIN_TTL, Gate, token_matches
from luna_daemon.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from luna_daemon.web.metrics import Metrics

log = logging.getLogger(__name__)

# websockets logs every plain HTTP answer at INFO ("HTTP response sent (200 OK)"). Those
# lines would flow into the log tail and back out to every dashboard as log events, so
# the library gets its own logger that only passes warnings and errors.
_wire_log = logging.getLogger("luna_daemon.web.wire")
_wire_log.setLevel(logging.WARNING)

STATIC_DIR = Path(__file__).with_name("static")
PAGES = ("status", "models", "logs", "settings")

MAX_MESSAGE = 256 * 1024     # bytes of one incoming WebSocket message (settings form at most)
QUEUE_LIMIT = 2000           # outgoing messages buffered per client before it is resynced
MAX_WS_CLIENTS = 32
MAX_PENDING_CONTROL = 4      # concurrent start/stop/unload/save per connection
SNAPSHOT_LOG_LINES = 1000
TICK = 2.0                   # seconds between status pushes (uptime, memory, last use)
REFRESH_MIN_INTERVAL = 0.25  # at most this often an event-triggered status push
# Events after which the status/models views have changed.
_REFRESH_ON = frozenset({"state", "model_loaded", "model_unloaded", "client_connected", "client_disconnected"})
CONTROL = frozenset({"start", "stop", "restart", "unload", "save_settings"})

# Fixed types for our own assets: mimetypes reads the Windows registry, which often maps
# .js to text/plain -- and with nosniff the browser would then refuse to run the script.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml; charset=utf-8",
    ".png": "image/png",
    ".json": "application/json",
}

_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _to_json(obj: Any) -> str:
    """Every JSON the dashboard sends (values JSON cannot hold, e.g. paths, as text)."""
    return json.dumps(obj, default=str)


class _Throttle:
    """Log a kind of refusal at most once per ``interval`` seconds (with a count of the
    suppressed ones), so a hostile page retrying in a loop cannot flood the log file."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            n = self._suppressed.pop(kind, 0)
        log.warning(msg + (f" ({n} more like this suppressed)" if n else ""), *args)


class MonitorError(OSError):
    """The monitor could not start; the message names the port and what to do."""


def _bind(host: str, port: int) -> socket.socket:
    try:
        sock = bind_listener(host, port, what="monitor", setting="monitor_port", backlog=64)
    except PortInUse as exc:
        raise MonitorError(exc.errno, str(exc)) from None
    except OSError as exc:
        raise MonitorError(exc.errno, f"cannot listen on {host}:{port} for the monitor: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class _Client:
    """One WebSocket connection: its bounded outgoing queue and login state.

    ``queue``, ``snapshot_reason`` and ``wake_pending`` are guarded by the Monitor's lock;
    the rest belong to the event loop thread.
    """

    def __init__(self, ws: ServerConnection, loop: asyncio.AbstractEventLoop):
        self.ws = ws
        self.loop = loop
        self.queue: collections.deque[tuple[str, str]] = collections.deque()
        self.snapshot_reason: str | None = "connect"
        self.wake = asyncio.Event()
        self.wake_pending = False
        self.dropped = 0
        self.authed = False
        self.pending_control = 0

    def poke(self) -> None:
        """Wake the sender; called with the Monitor lock held; never blocks."""
        if self.wake_pending:
            return
        self.wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:
            pass  # loop already closed: the monitor is stopping


class Monitor:
    """The web monitor of one Host. See the module docstring for the guarantees."""

    def __init__(self, host: Any, *, login_ttl: float = LOGIN_TTL, queue_limit: int = QUEUE_LIMIT):
        self.host = host
        self.settings = host.settings
        self.login_ttl = login_ttl
        self.queue_limit = queue_limit
        self.gate: Gate | None = None
        self.metrics = Metrics(host, lambda: len(self._clients))
        self._lock = threading.RLock()
        self._clients: list[_Client] = []
        self._seq = 0  # the event stream's sequence number (per monitor, gap-free per client)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._port: int | None = None
        self._static = self._index_static()
        self._refusals = _Throttle()

    # ------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int | None:
        """The bound port (None before start / after stop)."""
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind and serve; raises MonitorError (port named) if the port is taken."""
        if self._thread is not None:
            return
        self._sock = _bind(self.settings.host, self.settings.monitor_port)
        self._port = self._sock.getsockname()[1]
        self.gate = Gate(self.settings.host, self._port, self.settings.allowed_origins, login_ttl=self.login_ttl)
        self._loop = asyncio.new_event_loop()
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="luna-monitor", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._startup_error is not None or not self._ready.is_set():
            err = self._startup_error
            self.stop()
            raise MonitorError(errno.EIO, f"monitor failed to start on port {self._port}: {err}")
        self._unsubscribe = self.host.events.subscribe(self._on_event)
        log.info("dashboard at http://%s:%d/", self._display_host(), self._port)

    def stop(self, timeout: float = 10.0) -> None:
        """Close connections, stop the thread, free the port. Idempotent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(self._request_stop)
            except RuntimeError:
                pass  # loop already finished
            thread.join(timeout)
            if thread.is_alive():
                log.warning("monitor thread did not stop within %.0fs", timeout)
        if self._sock is not None:
            self._sock.close()  # normally closed by the server already; this is for failed starts
            self._sock = None
        if loop is not None and not (thread is not None and thread.is_alive()):
            loop.close()
        if self.gate is not None:
            self.gate.revoke_all()
        self._thread = self._loop = None
        self._port = None
        with self._lock:
            self._clients.clear()

    def _request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start() / the log
            if not self._ready.is_set():
                self._startup_error = exc
                self._ready.set()
            else:
                log.exception("monitor server stopped unexpectedly")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:
                pass

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        server = await serve(
            self._ws_handler,
            sock=self._sock,
            process_request=self._process_request,
            compression=None,          # no permessage-deflate: costs CPU, buys nothing here
            max_size=MAX_MESSAGE,
            max_queue=16,
            write_limit=256 * 1024,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=2,
            open_timeout=10,
            server_header="luna-daemon",
            logger=_wire_log,
        )
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            await server.wait_closed()
            # Actions still waiting on a worker thread (a long daemon stop): nobody is
            # left to answer, so cancel them rather than leave pending tasks behind.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

    # ------------------------------------------------------------ URLs
    def _display_host(self) -> str:
        h = self.settings.host
        return "127.0.0.1" if h in ("", "0.0.0.0", "::", "[::]") else h

    def url_for(self, page: str = "status") -> str:
        """Dashboard URL of ``page`` with a fresh one-time login secret in the fragment."""
        if page not in PAGES:
            raise ValueError(f"unknown dashboard page {page!r}; pages: {', '.join(PAGES)}")
        if self.gate is None or self._port is None:
            raise MonitorError(errno.ENOTCONN, "the monitor is not running")
        secret = self.gate.mint_login()
        return f"http://{self._display_host()}:{self._port}/#page={page}&login={secret}"

    # ------------------------------------------------------------ event fan-out
    def _on_event(self, event: Any) -> None:
        """EventBus subscriber: runs on the emitting (daemon) thread; never blocks."""
        if not self._clients:
            return
        with self._lock:
            self._seq += 1
            text = _to_json({"type": "event", "seq": self._seq, "name": event.type, "time": event.time,
                             "bus_seq": event.seq, "data": event.data})
            for c in self._clients:
                if c.snapshot_reason is not None:
                    continue  # a snapshot is due; it will cover this event
                if len(c.queue) >= self.queue_limit:
                    # Too slow: drop what is buffered and resync with a snapshot rather
                    # than ever making the daemon wait for a browser.
                    c.dropped += len(c.queue) + 1
                    c.queue.clear()
                    c.snapshot_reason = "overflow"
                else:
                    c.queue.append((event.type, text))
                c.poke()

    # ------------------------------------------------------------ HTTP
    def _respond(self, status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
                 extra: dict[str, str] | None = None) -> Response:
        if isinstance(body, str):
            body = body.encode("utf-8")
        st = HTTPStatus(status)
        headers = Headers()
        headers["Content-Type"] = content_type
        headers["Content-Length"] = str(len(body))
        headers["Connection"] = "close"
        for k, v in _SECURITY_HEADERS.items():
            headers[k] = v
        for k, v in (extra or {}).items():
            headers[k] = v
        return Response(st.value, st.phrase, headers, body)

    def _json(self, obj: Any, status: int = 200) -> Response:
        return self._respond(status, _to_json(obj), "application/json")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        gate = self.gate
        assert gate is not None
        url = urlsplit(request.path)
        path = url.path
        host_header = request.headers.get("Host")
        if not gate.host_allowed(host_header):
            # DNS rebinding: a foreign name that resolves to 127.0.0.1 gets nothing.
            self._refusals.warning("host", "refused request for %s with Host %r (allowed: %s)", path, host_header,
                                   ", ".join(sorted(gate.hosts)))
            return self._respond(403, "Forbidden: unexpected Host header. Open the dashboard at "
                                      f"http://127.0.0.1:{self._port}/ (from the tray menu).\n")
        origin = request.headers.get("Origin")
        if not gate.origin_allowed(origin):
            self._refusals.warning("origin", "refused %s from foreign origin %r", path, origin)
            return self._respond(403, f"Forbidden: origin {origin} may not use this dashboard "
                                      "(add it to allowed_origins in the config file to allow it).\n")
        if path == "/ws":
            if len(self._clients) >= MAX_WS_CLIENTS:
                return self._respond(503, f"too many dashboard connections (limit {MAX_WS_CLIENTS})\n")
            return None  # continue with the WebSocket handshake
        site = request.headers.get("Sec-Fetch-Site")
        if path.startswith("/api/") and site in ("cross-site", "same-site"):
            # A page of another site (or another port on this host) embedding our data.
            return self._respond(403, "Forbidden: cross-site request\n")
        try:
            return self._route(path, parse_qs(url.query))
        except Exception:
            log.exception("monitor failed to answer %s", path)
            return self._respond(500, "internal error (see the log)\n")

    def _route(self, path: str, query: dict[str, list[str]]) -> Response:
        if path in ("/", "/index.html"):
            return self._static_file("index.html")
        if path.startswith("/static/"):
            return self._static_file(path[len("/static/"):])
        if path == "/favicon.ico":
            return self._static_file("favicon.svg")
        if path == "/healthz":
            snap = self.host.daemon.snapshot()
            if snap["state"] == "running":
                return self._respond(200, "ok\n")
            detail = f": {snap['detail']}" if snap.get("detail") else ""
            return self._respond(503, f"{snap['state']}{detail}\n")
        if path == "/metrics":
            return self._respond(200, self.metrics.render(), METRICS_CONTENT_TYPE)
        if path == "/api/status":
            return self._json(self._status())
        if path == "/api/models":
            return self._json({"state": self.host.daemon.snapshot()["state"], "models": views.models(self.host)})
        if path == "/api/logs":
            since = _int_param(query, "since", 0)
            limit = max(1, min(_int_param(query, "limit", 1000), 5000))
            lines = self.host.log_tail.since(since, limit)
            return self._json({"lines": lines, "last": lines[-1]["seq"] if lines else since})
        if path == "/api/logfile":
            return self._log_file()
        return self._respond(404, "not found\n")

    def _index_static(self) -> dict[str, Path]:
        # An allow-list built once from the package's files: request paths are looked up,
        # never joined onto the file system, so '..' and friends cannot escape.
        out: dict[str, Path] = {}
        if STATIC_DIR.is_dir():
            for p in STATIC_DIR.rglob("*"):
                if p.is_file():
                    out[p.relative_to(STATIC_DIR).as_posix()] = p
        return out

    def _static_file(self, name: str) -> Response:
        p = self._static.get(name)
        if p is None:
            return self._respond(404, "not found\n")
        ctype = _CONTENT_TYPES.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        extra = {}
        if name == "index.html":
            # CSP host-sources cannot express IPv6 literals; [::1] is covered by 'self'.
            hosts = " ".join(f"ws://{h}" for h in sorted(self.gate.hosts) if "[" not in h) if self.gate else ""
            extra["Content-Security-Policy"] = (
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                f"connect-src 'self' {hosts}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            )
        return self._respond(200, p.read_bytes(), ctype, extra)

    def _log_file(self) -> Response:
        path = Path(self.settings.log_file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            return self._respond(500, f"cannot read {path}: {exc}\n")
        return self._respond(200, data, "text/plain; charset=utf-8",
                             {"Content-Disposition": f'attachment; filename="{path.name}"'})

    def _status(self) -> dict[str, Any]:
        return views.status(self.host, monitor_clients=len(self._clients))

    def _snapshot(self, seq: int, reason: str, client: _Client, dropped: int = 0) -> dict[str, Any]:
        return {
            "type": "snapshot", "seq": seq, "reason": reason, "dropped": dropped,
            "authenticated": client.authed,
            "status": self._status(),
            "models": views.models(self.host),
            "logs": self.host.log_tail.since(0, SNAPSHOT_LOG_LINES),
            "settings": settings_io.describe(self.settings, views.devices()),
            "pages": list(PAGES),
        }

    # ------------------------------------------------------------ WebSocket
    async def _ws_handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        client = _Client(ws, loop)
        with self._lock:
            self._clients.append(client)
            client.poke()
        log.debug("dashboard connected from %s", ws.remote_address)
        sender = asyncio.create_task(self._sender(client))
        try:
            async for raw in ws:
                await self._on_message(client, raw)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, ConnectionClosed):
                pass
            log.debug("dashboard disconnected from %s", ws.remote_address)

    async def _sender(self, c: _Client) -> None:
        loop = asyncio.get_running_loop()
        last_status = 0.0
        try:
            while True:
                wait = max(0.0, last_status + TICK - loop.time())
                try:
                    await asyncio.wait_for(c.wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                c.wake.clear()
                with self._lock:
                    c.wake_pending = False
                    reason, c.snapshot_reason = c.snapshot_reason, None
                    dropped = 0
                    if reason is not None:
                        c.queue.clear()
                        dropped, c.dropped = c.dropped, 0
                    seq = self._seq
                    items = list(c.queue)
                    c.queue.clear()
                if reason is not None:
                    # Built after the lock: it may already show effects of events with a
                    # higher seq; those still arrive and are idempotent on the page.
                    await c.ws.send(_to_json(self._snapshot(seq, reason, c, dropped)))
                    last_status = loop.time()
                refresh = False
                for name, text in items:
                    await c.ws.send(text)
                    refresh = refresh or name in _REFRESH_ON
                now = loop.time()
                if (refresh and now - last_status >= REFRESH_MIN_INTERVAL) or now - last_status >= TICK:
                    await c.ws.send(_to_json({"type": "status", "status": self._status(), "models": views.models(self.host)}))
                    last_status = now
                elif refresh:
                    # Too soon after the last push: make sure the next wait ends in time.
                    last_status = now - TICK + REFRESH_MIN_INTERVAL
        except ConnectionClosed:
            pass
        except Exception:
            # A view that failed to build (e.g. mid daemon teardown): close this
            # connection; the page reconnects and starts over from a fresh snapshot.
            log.exception("dashboard sender failed; closing the connection")
            await c.ws.close(1011, "internal error")

    async def _send(self, c: _Client, obj: dict[str, Any]) -> None:
        try:
            await c.ws.send(_to_json(obj))
        except ConnectionClosed:
            pass

    async def _on_message(self, c: _Client, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            await self._send(c, {"type": "error", "error": {"code": "bad_message", "message": "send JSON text messages"}})
            return
        try:
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            await self._send(c, {"type": "error", "error": {"code": "bad_message", "message": f"invalid JSON message: {exc}"}})
            return
        kind, mid = msg.get("type"), msg.get("id")
        if kind == "login":
            await self._login(c, msg)
        elif kind == "snapshot":
            # The page saw a gap in seq (or wants a full refresh).
            with self._lock:
                c.snapshot_reason = "requested"
                c.poke()
        elif kind == "ping":
            await self._send(c, {"type": "pong", "id": mid, "time": time.time()})
        elif kind in CONTROL:
            if not (c.authed or token_matches(msg.get("token"), self.host.daemon.token)):
                self._refusals.warning("auth", "refused dashboard %s: not logged in", kind)
                await self._send(c, _reply(mid, error=("unauthorized",
                    "not logged in: open the dashboard from the tray menu (Open Dashboard) to get a login link")))
                return
            if c.pending_control >= MAX_PENDING_CONTROL:
                await self._send(c, _reply(mid, error=("busy", "too many actions in progress; wait for them to finish")))
                return
            c.pending_control += 1
            asyncio.get_running_loop().create_task(self._control(c, kind, mid, msg))
        else:
            await self._send(c, _reply(mid, error=("unknown_type", f"unknown message type {kind!r}")))

    async def _login(self, c: _Client, msg: dict[str, Any]) -> None:
        gate = self.gate
        assert gate is not None
        session: str | None = None
        how = ""
        if "secret" in msg:
            session, how = gate.redeem_login(msg["secret"]), "login link"
        elif "session" in msg:
            session, how = (msg["session"] if gate.check_session(msg["session"]) else None), "session"
        elif "token" in msg:
            session, how = (gate.session_for_token() if token_matches(msg["token"], self.host.daemon.token) else None), "token"
        if session is None:
            reason = {
                "login link": "this login link has expired or was already used; open the dashboard again from the tray menu",
                "session": "the dashboard session has ended (Luna Daemon was restarted); open it again from the tray menu",
                "token": "wrong token",
            }.get(how, "send secret, session or token")
            await self._send(c, {"type": "auth", "ok": False, "id": msg.get("id"), "error": reason})
            return
        c.authed = True
        log.debug("dashboard logged in by %s", how)
        await self._send(c, {"type": "auth", "ok": True, "id": msg.get("id"), "session": session})

    async def _control(self, c: _Client, kind: str, mid: Any, msg: dict[str, Any]) -> None:
        try:
            result = await _in_thread(lambda: self._do_control(kind, msg))
            reply = _reply(mid, result=result)
            if kind == "save_settings" and isinstance(result, dict) and not result.get("ok"):
                reply = _reply(mid, error=("invalid", "some settings are invalid"), extra={"result": result})
        except _ControlError as exc:
            reply = _reply(mid, error=(exc.code, str(exc)))
        except Exception as exc:
            log.exception("dashboard action %s failed", kind)
            reply = _reply(mid, error=("internal", f"{type(exc).__name__}: {exc}"))
        finally:
            c.pending_control -= 1
        await self._send(c, reply)
        if kind == "save_settings":
            with self._lock:
                for other in self._clients:
                    other.snapshot_reason = other.snapshot_reason or "settings"
                    other.poke()

    def _do_control(self, kind: str, msg: dict[str, Any]) -> Any:
        """Runs on a worker thread (daemon start/stop/unload may take seconds)."""
        from luna_daemon.daemon import DaemonStartError
        from luna_daemon.protocol import LunaError

        d = self.host.daemon
        log.info("dashboard: %s%s", kind, f" {msg.get('model')}" if msg.get("model") else "")
        try:
            if kind == "start":
                d.start()
                return {"state": d.state}
            if kind == "stop":
                return {"clean": d.stop(), "state": d.state}
            if kind == "restart":
                clean = d.stop()
                d.start()
                return {"clean": clean, "state": d.state}
            if kind == "unload":
                reg = d.registry
                if reg is None:
                    raise _ControlError("not_running", "the daemon is not running; nothing is loaded")
                if msg.get("all") is True:
                    return {"unloaded": reg.unload_all()}
                model = msg.get("model")
                if not isinstance(model, str) or not model:
                    raise _ControlError("bad_args", "unload needs a model id (or all: true)")
                return {"unloaded": [reg.unload(model)]}
            if kind == "save_settings":
                return settings_io.save(self.settings, msg.get("values"), views.devices())
        except DaemonStartError as exc:
            raise _ControlError("start_failed", f"daemon failed to start: {exc}") from None
        except LunaError as exc:
            raise _ControlError(exc.code, exc.message) from None
        raise _ControlError("unknown_type", kind)


class _ControlError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _reply(mid: Any, *, result: Any = None, error: tuple[str, str] | None = None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "reply", "id": mid, "ok": error is None}
    if error is None:
        out["result"] = result
    else:
        out["error"] = {"code": error[0], "message": error[1]}
    out.update(extra or {})
    return out


def _int_param(query: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return int(query.get(name, [default])[0])
    except (TypeError, ValueError):
        return default


async def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a daemon thread (not the loop's default executor, whose non-daemon
    threads would hold up interpreter exit while a daemon start or stop is in progress)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not fut.done():
            setter(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting coroutine
            try:
                loop.call_soon_threadsafe(deliver, fut.set_exception, exc)
            except RuntimeError:
                pass
        else:
            try:
                loop.call_soon_threadsafe(deliver, fut.set_result, result)
            except RuntimeError:
                pass

    threading.Thread(target=run, name="luna-monitor-action", daemon=True).start()
    return await fut
