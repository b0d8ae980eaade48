"""TCP server for the Luna protocol (I/O only; the ops live in ``service``).

One accept thread, one thread per connection. A connection carries any number of
requests, one at a time. Limits come from Settings: header/body size (checked before
allocation), ``frame_timeout`` (a started frame must complete), ``idle_timeout``
(between frames), ``max_connections`` (extra connections get ``busy`` and are closed).

Shutdown is two-phase so that nothing hangs and nothing is cut off mid-answer:
``close_listener()`` stops accepting and makes every *new* request answer ``stopping``;
``wait_idle(deadline)`` waits for in-flight requests; ``close_connections()`` then closes
every socket and joins the threads. All three are idempotent and thread-safe.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import socket
import threading
import time
from typing import Any

from luna_daemon import protocol, transport
from luna_daemon.events import EventBus
from luna_daemon.netutil import bind_listener as bind_listener_
from luna_daemon.protocol import ErrorCode, Limits, LunaError
from luna_daemon.service import ClientGone, Service
from luna_daemon.settings import Settings

log = logging.getLogger(__name__)


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the daemon port; PortInUse names the port and what to do."""
    return bind_listener_(host, port, what="daemon", setting="port",
                          hint="Stop that program ('luna-daemon stop' stops a daemon).")


class _Conn:
    """One client connection (state shared with the server for shutdown)."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.channel = transport.Channel(sock)
        self.peer = peer
        self.thread: threading.Thread | None = None

    def wait(self, fut: cf.Future) -> Any:
        """Wait for queued work while watching the client: if it disconnects, cancel."""
        while True:
            try:
                return fut.result(timeout=0.1)
            except cf.TimeoutError:
                pass
            if self.channel.peer_gone():
                fut.cancel()  # only succeeds if still queued; running work finishes
                raise ClientGone()

    @property
    def client(self) -> str:
        return self.peer


class Server:
    """The model server. ``start()`` binds and begins accepting in a thread."""

    def __init__(self, settings: Settings, service: Service, events: EventBus):
        self.settings = settings
        self.service = service
        self.events = events
        self.limits = Limits(settings.max_header_bytes, settings.max_body_bytes)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self.stopping = False
        self._closed = False
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> tuple[str, int]:
        self._listener = bind_listener(self.settings.host, self.settings.port)
        self.address = self._listener.getsockname()[:2]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="luna-accept", daemon=True)
        self._accept_thread.start()
        log.info("listening on %s:%d", *self.address)
        return self.address

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def close_listener(self) -> None:
        """Stop accepting; new requests on open connections now answer ``stopping``."""
        with self._lock:
            self.stopping = True
            listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes a thread blocked in accept() at once on Linux; elsewhere
            # the accept loop's short timeout notices ``stopping``.
            _shutdown_socket(listener)
            listener.close()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(5)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight. Returns False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close_connections(self, join_timeout: float = 5.0) -> None:
        """Close every connection and join the connection threads."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for c in conns:
            _shutdown_socket(c.sock)
        me = threading.current_thread()
        for c in conns:
            if c.thread is not None and c.thread is not me:
                c.thread.join(join_timeout)

    # ------------------------------------------------------------ accept
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        # A timeout lets the loop notice close_listener() on platforms where closing a
        # socket does not wake a blocked accept().
        listener.settimeout(0.25)
        while not self.stopping:
            try:
                sock, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stopping:
                    return
                log.exception("accept failed")
                time.sleep(0.1)
                continue
            conn = _Conn(sock, f"{addr[0]}:{addr[1]}")
            with self._lock:
                full = len(self._conns) >= self.settings.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                log.warning("refusing %s: max_connections=%d reached", conn.peer, self.settings.max_connections)
                self._send_error_and_close(conn, None, LunaError(ErrorCode.BUSY, f"too many connections (max_connections={self.settings.max_connections})"))
                continue
            conn.thread = threading.Thread(target=self._serve_conn, args=(conn,), name=f"luna-conn-{conn.peer}", daemon=True)
            conn.thread.start()

    # ------------------------------------------------------------ per connection
    def _serve_conn(self, conn: _Conn) -> None:
        self.events.emit("client_connected", client=conn.peer, clients=self.connection_count)
        try:
            while True:
                try:
                    frame = conn.channel.read_frame(
                        self.limits, idle_timeout=self.settings.idle_timeout, frame_timeout=self.settings.frame_timeout
                    )
                except transport.PeerClosed:
                    return
                except transport.IdleTimeout:
                    log.debug("closing idle connection %s", conn.peer)
                    return
                except transport.FrameTimeout as exc:
                    self._send_error_and_close(conn, None, LunaError(ErrorCode.TIMEOUT, f"frame not received within frame_timeout={self.settings.frame_timeout}s ({exc})"))
                    return
                except LunaError as exc:
                    log.warning("bad frame from %s: %s", conn.peer, exc.message)
                    self._send_error_and_close(conn, None, exc)
                    return
                except OSError:
                    return
                if not self._handle_frame(conn, frame):
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close_socket(conn.sock)
            self.events.emit("client_disconnected", client=conn.peer, clients=self.connection_count)

    def _handle_frame(self, conn: _Conn, frame: protocol.Frame) -> bool:
        """Answer one frame. Returns False when the connection must close."""
        req_id = frame.header.get("id")
        try:
            req = protocol.parse_request(frame)
        except LunaError as exc:
            self._send_error_and_close(conn, req_id, exc)
            return False
        with self._lock:
            if self.stopping:
                refused = True
            else:
                refused = False
                self._in_flight += 1
        if refused:
            return self._send(conn, protocol.error_response(req.id, ErrorCode.STOPPING, "the daemon is stopping"))
        try:
            try:
                result = self.service.handle(req, conn)
                buffers = protocol.ok_response(req.id, result)
            except ClientGone:
                log.info("client %s went away; its queued work was cancelled", conn.peer)
                return False
            except LunaError as exc:
                buffers = protocol.error_response(req.id, exc.code, exc.message)
            del frame, req  # release the request body before sending a big answer
            return self._send(conn, buffers)
        finally:
            with self._idle:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    def _send(self, conn: _Conn, buffers: list) -> bool:
        try:
            conn.channel.send(buffers, self.settings.frame_timeout)
            return not self._closed
        except OSError as exc:
            log.info("could not answer %s: %s", conn.peer, exc)
            return False

    def _send_error_and_close(self, conn: _Conn, req_id: Any, exc: LunaError) -> None:
        try:
            conn.channel.send(protocol.error_response(req_id, exc.code, exc.message), 2.0)
        except OSError:
            pass
        _shutdown_socket(conn.sock)
        _close_socket(conn.sock)


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
