"""The monitor web server: dashboard, live events, health and metrics on ``monitor_port``.

One ``websockets`` asyncio server on a dedicated thread with its own event loop. This
module is the composition: :class:`~luna_daemon.web.http_routes.HttpRoutes` answers plain
HTTP (``GET`` only) from ``process_request``; ``/ws`` upgrades to a WebSocket served by
:class:`~luna_daemon.web.ws_hub.WsHub`.

What a caller (the host, the tray) can rely on:

* ``start()`` binds ``settings.host:settings.monitor_port`` synchronously and raises
  :class:`MonitorError` naming the port when it is taken; it returns once the server is
  accepting. ``port`` is then the real port (``monitor_port = 0`` picks a free one).
* ``stop()`` closes every connection, stops the thread, frees the port. Idempotent.
* ``url_for(page)`` returns ``http://127.0.0.1:<port>/#page=<page>&login=<secret>`` with
  a new one-time login secret (valid ``login_ttl`` seconds) that lets the page change
  things (start/stop/unload/settings) without ever seeing the per-install token.
* The daemon is never slowed by a browser (see :mod:`luna_daemon.web.ws_hub`), and no
  request or message a client sends raises out of the server or stops it.

Routes, the message protocol and the security model are documented in docs/monitor.md.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from typing import Any, Callable

from websockets.asyncio.server import serve

from luna_daemon.netutil import PortInUse, bind_listener
from luna_daemon.web.auth import LOGIN_TTL, Gate
from luna_daemon.web.common import PAGES, refusal_log
from luna_daemon.web.http_routes import HttpRoutes
from luna_daemon.web.instances import ChildPoller
from luna_daemon.web.metrics import Metrics
from luna_daemon.web.history import History
from luna_daemon.web.ws_hub import MAX_WS_CLIENTS, QUEUE_LIMIT, WsHub

log = logging.getLogger(__name__)

# websockets logs every plain HTTP answer at INFO ("HTTP response sent (200 OK)"). Those
# lines would flow into the log tail and back out to every dashboard as log events, so
# the library gets its own logger that only passes warnings and errors.
_wire_log = logging.getLogger("luna_daemon.web.wire")
_wire_log.setLevel(logging.WARNING)

# Bytes of one incoming WebSocket message; larger closes the connection with 1009. The
# biggest real message is a settings save of a few short fields.
MAX_MESSAGE = 64 * 1024

__all__ = ["MAX_MESSAGE", "PAGES", "Monitor", "MonitorError"]


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


class Monitor:
    """The web monitor of one Host. See the module docstring for the guarantees."""

    def __init__(self, host: Any, *, login_ttl: float = LOGIN_TTL, queue_limit: int = QUEUE_LIMIT):
        self.host = host
        self.settings = host.settings
        self.login_ttl = login_ttl
        self.queue_limit = queue_limit
        self.gate: Gate | None = None
        self._hub: WsHub | None = None
        self._http: HttpRoutes | None = None
        # Child instances' numbers (status / ps answers), fetched off the event loop: a page
        # or a scrape never waits on a child process.
        self.children = ChildPoller(host)
        self.metrics = Metrics(host, lambda: self._hub.client_count if self._hub is not None else 0, self.children)
        # The charts' bounded history (history.py), sampled while the monitor runs.
        self.history = History(host, self.children)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._unsubscribe_history: Callable[[], None] | None = None
        self._port: int | None = None
        self._refusals = refusal_log()

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
        self._hub = hub = WsHub(self.host, self.gate, self._refusals, queue_limit=self.queue_limit,
                                children=self.children, history=self.history)
        self._http = HttpRoutes(self.host, self.gate, self._port, self.metrics, lambda: hub.client_count,
                                MAX_WS_CLIENTS, self._refusals, children=self.children)
        self._loop = asyncio.new_event_loop()
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="luna-monitor", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._startup_error is not None or not self._ready.is_set():
            err = self._startup_error
            self.stop()
            raise MonitorError(errno.EIO, f"monitor failed to start on port {self._port}: {err}")
        self._unsubscribe = self.host.events.subscribe(hub.on_event)
        self.children.start()
        self._unsubscribe_history = self.history.subscribe(hub.on_sample)
        self.history.start()
        log.info("dashboard at http://%s:%d/", self._display_host(), self._port)

    def stop(self, timeout: float = 10.0) -> None:
        """Close connections, stop the thread, free the port. Idempotent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.children.stop()
        self.history.stop()
        if self._unsubscribe_history is not None:
            self._unsubscribe_history()
            self._unsubscribe_history = None
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
        if self._hub is not None:
            self._hub.clear()

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
        assert self._hub is not None and self._http is not None
        self._stop_event = asyncio.Event()
        server = await serve(
            self._hub.handler,
            sock=self._sock,
            process_request=self._http.process_request,
            compression=None,          # no permessage-deflate: costs CPU, buys nothing here
            max_size=MAX_MESSAGE,
            max_queue=16,              # incoming messages buffered: 16 x 64 KiB per dashboard at most
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
