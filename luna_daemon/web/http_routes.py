"""The monitor's plain HTTP side: request checks, routes, static files.

:meth:`HttpRoutes.process_request` is the ``websockets`` ``process_request`` hook: it
answers every plain ``GET`` and returns None only for a ``/ws`` upgrade that passed the
checks. What a caller can rely on:

* It never raises. A duplicate or malformed ``Host``, ``Origin``, ``Sec-Fetch-Site``,
  ``Authorization`` or ``X-Luna-Session`` header is a ``400`` with a one-line body; a
  foreign Host or Origin a ``403``; an endpoint that needs a session, asked without one,
  a ``401``; anything unexpected inside a route a ``500`` with a short body and one
  (throttled) log line without a traceback.
* Which endpoint needs a session is the table in :data:`ROUTES` (docs/monitor.md).
"""

from __future__ import annotations

import logging
import mimetypes
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from luna_daemon import fsutil
from luna_daemon.logs import RateLimitedLog
from luna_daemon.protocol import ErrorCode, LunaError
from luna_daemon.web import views
from luna_daemon.web.auth import SESSION_HEADER, Gate, well_formed_host, well_formed_origin
from luna_daemon.web.common import one_line, to_json
from luna_daemon.web.instances import ChildPoller, find, instance_items, log_file_of, overall_state
from luna_daemon.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from luna_daemon.web.metrics import Metrics

log = logging.getLogger("luna_daemon.web.monitor")

STATIC_DIR = Path(__file__).with_name("static")
MAX_LOG_DOWNLOAD = 16 * 1024 * 1024  # bytes; the rotating log file stays under 5 MiB

# Path -> (needs a session, handler name). Open: what a health checker, Prometheus and
# the read-only page need (state, numbers, the list of loaded models). Session: the log,
# which may hold file paths and prompt text.
ROUTES: dict[str, tuple[bool, str]] = {
    "/healthz": (False, "_healthz"),
    "/metrics": (False, "_metrics"),
    "/api/status": (False, "_api_status"),
    "/api/models": (False, "_api_models"),
    "/api/logs": (True, "_api_logs"),
    "/api/logfile": (True, "_api_logfile"),
}

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


class _BadRequest(Exception):
    """The request is malformed (400); the message says which header."""


def _single(headers: Headers, name: str) -> str | None:
    """The one value of header ``name`` (None if absent); two of them are a bad request,
    since the checks below could otherwise judge one copy and a proxy act on the other."""
    values = headers.get_all(name)
    if len(values) > 1:
        raise _BadRequest(f"more than one {name} header")
    return values[0] if values else None


def respond(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
            extra: dict[str, str] | None = None) -> Response:
    """A complete response with the security headers and ``Connection: close``."""
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


def _json(obj: Any, status: int = 200) -> Response:
    return respond(status, to_json(obj), "application/json")


def _int_param(query: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return int(query.get(name, [default])[0])
    except (TypeError, ValueError):
        return default


class HttpRoutes:
    """Plain HTTP answers of one running monitor (its gate knows the real port)."""

    def __init__(self, host: Any, gate: Gate, port: int, metrics: Metrics, clients: Callable[[], int],
                 max_ws_clients: int, refusals: RateLimitedLog, *, children: ChildPoller | None = None):
        self.host = host
        self.children = children
        self.settings = host.settings
        self.gate = gate
        self.port = port
        self.metrics = metrics
        self.clients = clients
        self.max_ws_clients = max_ws_clients
        self.refusals = refusals
        self._static = self._index_static()

    # ------------------------------------------------------------ entry point
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The ``websockets`` hook; see the module docstring. Never raises."""
        try:
            return self._process(request)
        except _BadRequest as exc:
            self.refusals.warning("bad_request", "refused a malformed request for %.200r: %s", request.path, exc)
            return respond(400, f"Bad Request: {exc}\n")
        except Exception as exc:  # noqa: BLE001 - a bug, or a view failing mid daemon teardown
            # One line, no traceback: a hostile client repeating the request must not be
            # able to fill the log; the message still names the route and the error.
            self.refusals.error("route", "monitor failed to answer %.200s: %s", request.path, one_line(exc))
            return respond(500, "internal error (see the log)\n")

    def _process(self, request: Request) -> Response | None:
        headers = request.headers
        # No urlsplit: a path like "//[" would be read as a broken IPv6 netloc (ValueError).
        path, _, query = request.path.partition("?")
        hosts = headers.get_all("Host")
        if len(hosts) != 1:
            raise _BadRequest("missing Host header" if not hosts else "more than one Host header")
        host_header = hosts[0]
        if not well_formed_host(host_header):
            raise _BadRequest("malformed Host header")
        origin = _single(headers, "Origin")
        if origin is not None and not well_formed_origin(origin):
            raise _BadRequest("malformed Origin header")
        site = _single(headers, "Sec-Fetch-Site")
        if not self.gate.host_allowed(host_header):
            # DNS rebinding: a foreign name that resolves to 127.0.0.1 gets nothing.
            self.refusals.warning("host", "refused request for %.200s with Host %r (allowed: %s)", path, host_header,
                                  ", ".join(sorted(self.gate.hosts)))
            return respond(403, "Forbidden: unexpected Host header. Open the dashboard at "
                                f"http://127.0.0.1:{self.port}/ (from the tray menu).\n")
        if not self.gate.origin_allowed(origin):
            self.refusals.warning("origin", "refused %.200s from foreign origin %r", path, origin)
            return respond(403, f"Forbidden: origin {origin} may not use this dashboard "
                                "(add it to allowed_origins in the config file to allow it).\n")
        if path == "/ws":
            if self.clients() >= self.max_ws_clients:
                return respond(503, f"too many dashboard connections (limit {self.max_ws_clients})\n")
            return None  # continue with the WebSocket handshake
        if path.startswith("/api/") and site in ("cross-site", "same-site"):
            # A page of another site (or another port on this host) embedding our data.
            return respond(403, "Forbidden: cross-site request\n")
        if path in ("/", "/index.html"):
            return self._static_file("index.html")
        if path.startswith("/static/"):
            return self._static_file(path[len("/static/"):])
        if path == "/favicon.ico":
            return self._static_file("favicon.svg")
        route = ROUTES.get(path)
        if route is None:
            return respond(404, "not found\n")
        needs_session, handler = route
        if needs_session and not self.gate.http_authorized(
                _single(headers, SESSION_HEADER), _single(headers, "Authorization"), self.host.daemon.token):
            self.refusals.warning("auth", "refused %s: no dashboard session", path)
            return respond(401, f"{path} needs a dashboard session: send the {SESSION_HEADER} header (the "
                                "dashboard page does) or Authorization: Bearer <token> with the token file's "
                                "content\n", extra={"WWW-Authenticate": 'Bearer realm="luna-daemon"'})
        return getattr(self, handler)(parse_qs(query))

    # ------------------------------------------------------------ routes
    def _healthz(self, query: dict[str, list[str]]) -> Response:
        items = instance_items(self.host)
        if len(items) == 1:
            snap = items[0][1].snapshot()
            if snap["state"] == "running":
                return respond(200, "ok\n")
            detail = f": {snap['detail']}" if snap.get("detail") else ""
            return respond(503, f"{snap['state']}{detail}\n")
        overall = overall_state(self.host)
        if overall == "running":
            return respond(200, "ok\n")
        # Name each instance that is not running, with its reason (e.g. the exit code).
        parts = []
        for name, inst in items:
            snap = inst.snapshot()
            if snap["state"] != "running":
                parts.append(f"{name} {snap['state']}" + (f" ({snap['detail']})" if snap.get("detail") else ""))
        return respond(503, f"{overall}: {'; '.join(parts)}\n")

    def _metrics(self, query: dict[str, list[str]]) -> Response:
        return respond(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    def _api_status(self, query: dict[str, list[str]]) -> Response:
        return _json(views.status(self.host, monitor_clients=self.clients(), children=self.children))

    def _api_models(self, query: dict[str, list[str]]) -> Response:
        return _json({"state": self.host.daemon.snapshot()["state"], "models": views.models(self.host, self.children)})

    def _instance_param(self, query: dict[str, list[str]]) -> tuple[str, Any] | Response | None:
        """The instance named by ``?instance=`` (None when absent), or a 400 naming the
        configured ones."""
        if "instance" not in query:
            return None
        try:
            return find(self.host, query["instance"][0])
        except ValueError as exc:
            return respond(400, f"{exc}\n")

    def _api_logs(self, query: dict[str, list[str]]) -> Response:
        since = _int_param(query, "since", 0)
        limit = max(1, min(_int_param(query, "limit", 1000), 5000))
        chosen = self._instance_param(query)
        if isinstance(chosen, Response):
            return chosen
        lines = self.host.log_tail.lines(since, limit, instance=None if chosen is None else chosen[0])
        return _json({"lines": lines, "last": lines[-1]["seq"] if lines else since})

    def _api_logfile(self, query: dict[str, list[str]]) -> Response:
        chosen = self._instance_param(query)
        if isinstance(chosen, Response):
            return chosen
        path = Path(self.settings.log_file if chosen is None else log_file_of(self.host, *chosen))
        try:
            # A checked, non-blocking open: a FIFO at that path is refused instead of
            # hanging the event loop; a huge (e.g. sparse) file costs only its tail.
            with fsutil.open_regular(path, "log file") as f:
                data = f.read_at(max(0, f.size - MAX_LOG_DOWNLOAD), MAX_LOG_DOWNLOAD)
        except LunaError as exc:
            if exc.code != ErrorCode.NOT_FOUND.value:
                return respond(500, f"cannot read the log file: {exc.message}\n")
            data = b""
        except OSError as exc:
            return respond(500, f"cannot read the log file {path}: {exc.strerror or exc}\n")
        return respond(200, data, "text/plain; charset=utf-8",
                       {"Content-Disposition": f'attachment; filename="{path.name}"'})

    # ------------------------------------------------------------ static files
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
            return respond(404, "not found\n")
        ctype = _CONTENT_TYPES.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        extra = {}
        if name == "index.html":
            # CSP host-sources cannot express IPv6 literals; [::1] is covered by 'self'.
            hosts = " ".join(f"ws://{h}" for h in sorted(self.gate.hosts) if "[" not in h)
            extra["Content-Security-Policy"] = (
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                f"connect-src 'self' {hosts}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            )
        return respond(200, p.read_bytes(), ctype, extra)
