"""TCP server for the Luna protocol (I/O only; the ops live in ``service``).

One accept thread, one thread per connection. A connection carries any number of
requests, one at a time. Limits come from Settings: header/body size (checked before
allocation), ``frame_timeout`` (a started frame must complete), ``idle_timeout``
(between frames), ``max_connections`` (when full, a newcomer is admitted by evicting the
least valuable connection, see ``_evict_locked``; only if every connection has an
authenticated request in flight does it get ``busy``). Idle and slow connection threads
sleep in the kernel (``SO_RCVTIMEO``), so a flood of them costs memory, not CPU.

Shutdown is two-phase so that nothing hangs and nothing is cut off mid-answer:
``close_listener()`` stops accepting and makes every *new* request answer ``stopping``;
``wait_idle(deadline)`` waits for in-flight requests; ``close_connections()`` then closes
every socket and joins the threads. All three are idempotent and thread-safe.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import socket
import threading
import time
from typing import Any

from luna_daemon import protocol, transport
from luna_daemon.events import EventBus
from luna_daemon.logs import RateLimitedLog
from luna_daemon.netutil import bind_listener as bind_listener_
from luna_daemon.protocol import ErrorCode, Limits, LunaError
from luna_daemon.service import ClientGone, Service, is_supervisor_hello
from luna_daemon.settings import Settings
from luna_daemon.shm import DEFAULT_MIN_BYTES, Attached

log = logging.getLogger(__name__)
# Lines any local program can cause (bad frames, refused bodies, failed answers) pass
# through this, keyed by (category, peer host). One per process, like the log file it
# protects.
_wire_log = RateLimitedLog(log)


def _host(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


class _BodyRefused(LunaError):
    """A frame's body was refused from its header; carries the id to answer with."""

    def __init__(self, exc: LunaError, req_id: int | str | None):
        super().__init__(exc.code, exc.message)
        self.req_id = req_id


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the daemon port; PortInUse names the port and what to do."""
    return bind_listener_(host, port, what="daemon", setting="port",
                          hint="Stop that program ('luna-daemon stop' stops a daemon).")


class _Conn:
    """One client connection (state shared with the server for shutdown and admission).

    The admission fields are read and written under ``Server._lock``: the accept loop
    picks an eviction victim from them while connection threads update them."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.channel = transport.Channel(sock)
        self.peer = peer
        self.thread: threading.Thread | None = None
        # When it last did something useful: connected, or finished answering a request.
        # Bytes of a frame still arriving do not count, so a slow-loris peer dribbling a
        # never-ending frame ages like an idle one.
        self.last_active = time.monotonic()
        self.busy = False  # a request is in flight, or an authenticated body is still arriving
        # (op, start) of that request while it runs: what a stop that misses its deadline
        # names as cut off (Server.in_flight_requests).
        self.running: tuple[str, float] | None = None
        self.authenticated = False  # it once sent a request carrying the right token
        self.evicted = False  # closed to admit a newcomer: a frame that arrives now is not run
        # Shared-memory segments this connection registered (op shm_register), by name.
        # Only this connection's thread touches it; released when the connection ends.
        self.segments: dict[str, Attached] = {}
        # Supervision (the tray's health probes, the daemon's own readiness check): set by an
        # authenticated ``hello`` with ``role: "supervisor"`` (Service.handle). Such a
        # connection is no client: not counted, announced, logged or in the request stats.
        self.supervisor = False
        self.announced = False  # client_connected was emitted (so client_disconnected is too)
        # Who the client said it is (``hello`` with ``client``, models/sharing.py); set and
        # read only on this connection's thread (Service.announce / connection_closed).
        self.identity: Any = None

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
        # Threads in wait_idle: only then is _idle notified. Condition.notify_all is
        # Python code (ownership test, waiter list) that every request would pay otherwise.
        self._idle_waiters = 0
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
        """Open client connections (supervisors excluded; see ``_Conn.supervisor``)."""
        with self._lock:
            return sum(not c.supervisor for c in self._conns)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def in_flight_requests(self) -> list[str]:
        """The requests now in flight, e.g. ``"vae_decode from 127.0.0.1:5012 (running 7.1s)"``
        (what a stop that missed its deadline cuts off)."""
        now = time.monotonic()
        with self._lock:
            running = sorted((c.running[1], c.running[0], c.peer) for c in self._conns if c.running is not None)
        return [f"{op} from {peer} (running {now - t0:.1f}s)" for t0, op, peer in running]

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
            self._idle_waiters += 1
            try:
                while self._in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._idle.wait(remaining)
            finally:
                self._idle_waiters -= 1
        return True

    def close_connections(self, join_timeout: float = 5.0) -> bool:
        """Close every connection and join the connection threads, all within one
        ``join_timeout``. Returns False if a thread was still running then (stuck in a
        request; it is a daemon thread and is left behind)."""
        end = time.monotonic() + join_timeout
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for c in conns:
            _shutdown_socket(c.sock)
        me = threading.current_thread()
        for c in conns:
            if c.thread is not None and c.thread is not me:
                c.thread.join(max(0.0, end - time.monotonic()))
        return not any(c.thread is not None and c.thread is not me and c.thread.is_alive() for c in conns)

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
            limit = self.settings.max_connections
            with self._lock:
                victim = self._evict_locked() if len(self._conns) >= limit else None
                full = len(self._conns) >= limit
                if not full:
                    self._conns.add(conn)
            if victim is not None:
                # No answer on the victim: a pooled DaemonClient connection sees the close
                # before its next send (peer_gone) and opens a fresh one; a frame parked
                # in its buffer would be mistaken for the answer to that next request.
                _wire_log.info(("evict", _host(victim.peer)), "max_connections=%d reached: closed %s (%s, idle %.1fs) to admit %s",
                               limit, victim.peer, "authenticated" if victim.authenticated else "never authenticated",
                               time.monotonic() - victim.last_active, conn.peer)
                _shutdown_socket(victim.sock)  # wakes its thread out of recv/send; it then exits
            if full:
                _wire_log.warning(("busy", _host(conn.peer)), "refusing %s: max_connections=%d reached, every connection has a request in flight", conn.peer, limit)
                self._send_error_and_close(conn, None, LunaError(
                    ErrorCode.BUSY, f"too many connections (max_connections={limit}), each with a request in flight; "
                    "retry shortly, or raise max_connections"))
                continue
            conn.thread = threading.Thread(target=self._serve_conn, args=(conn,), name=f"luna-conn-{conn.peer}", daemon=True)
            conn.thread.start()

    def _evict_locked(self) -> _Conn | None:
        """Pick the least valuable connection, mark it evicted and drop it from the count
        (caller holds ``_lock`` and shuts its socket down). None if all are protected.

        Order: never-authenticated idle ones, then never-authenticated ones with a request
        in flight, then authenticated idle ones; longest idle (``last_active``) first in
        each group. An authenticated request in flight is never cut off. Unauthenticated
        requests are only ping, hello or an error answer: one stays in flight only while
        its peer does not read the answer, so evicting it loses nothing, and a flood that
        pipelines pings without reading cannot pin its slots for ``frame_timeout``.

        There is deliberately no per-process cap: mapping a loopback peer port to a pid
        means scanning every process's sockets (psutil.net_connections), far too costly
        on each accept of a flood, and a flooder can fork anyway. Eviction alone already
        guarantees that a newcomer gets in. O(max_connections), under the lock; only
        when the server is full."""
        best: _Conn | None = None
        best_rank: tuple[bool, bool, float] | None = None
        for c in self._conns:
            if c.busy and c.authenticated:
                continue
            rank = (c.authenticated, c.busy, c.last_active)
            if best_rank is None or rank < best_rank:
                best, best_rank = c, rank
        if best is not None:
            best.evicted = True
            self._conns.discard(best)
        return best

    # ------------------------------------------------------------ per connection
    def _serve_conn(self, conn: _Conn) -> None:
        # client_connected waits for the first request: only then is it known whether the
        # peer is a supervisor, whose connections must not show up as clients.
        admit = functools.partial(self._admit_body, conn)  # built once, not per frame
        segments = functools.partial(self._segments_for, conn)
        try:
            while True:
                try:
                    frame = conn.channel.read_frame(
                        self.limits, idle_timeout=self.settings.idle_timeout, frame_timeout=self.settings.frame_timeout,
                        admit=admit, segments=segments,
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
                    _wire_log.warning((exc.code, _host(conn.peer)), "%s from %s: %s", exc.code, conn.peer, exc.message)
                    self._send_error_and_close(conn, getattr(exc, "req_id", None), exc)
                    return
                except OSError:
                    return
                if not self._handle_frame(conn, frame):
                    return
        except Exception:  # noqa: BLE001 -- the thread's last line of defence
            # A bug, not a client error (those are LunaErrors above): logged, rate-limited
            # since a client may trigger it again and again, answered, and the connection
            # closed -- never a raw traceback from threading's excepthook.
            _wire_log.exception(("internal", _host(conn.peer)), "connection %s failed unexpectedly; closed it", conn.peer)
            self._send_error_and_close(conn, None, LunaError(
                ErrorCode.INTERNAL, "the daemon failed on this connection (a bug, logged); reconnect and retry"))
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close_socket(conn.sock)
            # Whatever ended the connection (close, eviction, a SIGKILLed client): its
            # segments are unmapped and unlinked; a dead client cannot unlink them itself.
            for seg in conn.segments.values():
                self.service.shm.release(seg)
            conn.segments.clear()
            self.service.connection_closed(conn)
            if conn.announced:
                self.events.emit("client_disconnected", client=conn.peer, clients=self.connection_count)

    def _handle_frame(self, conn: _Conn, frame: protocol.Frame) -> bool:
        """Answer one frame. Returns False when the connection must close."""
        try:
            req = protocol.parse_request(frame)
        except LunaError as exc:
            _wire_log.warning((exc.code, _host(conn.peer)), "bad request from %s: %s", conn.peer, exc.message)
            self._send_error_and_close(conn, protocol.echo_id(frame.header.get("id")), exc)
            return False
        authenticated = conn.authenticated or (req.token is not None and self.service.token_ok(req.token))
        reply_to = frame.header.get("shm_reply")
        if reply_to is not None:
            try:
                reply_to = self._reply_target(conn, reply_to, req.token)
            except LunaError as exc:
                _wire_log.warning((exc.code, _host(conn.peer)), "bad request from %s: %s", conn.peer, exc.message)
                self._send_error_and_close(conn, req.id, exc)
                return False
        with self._lock:
            if conn.evicted:  # evicted while this frame arrived: drop it unrun (see _evict_locked)
                return False
            conn.authenticated = authenticated
            if self.stopping:
                refused = True
            else:
                refused = False
                conn.busy = True
                self._in_flight += 1
                conn.running = (req.op[:64], time.monotonic())  # a client-chosen name: cut
        if not conn.announced and not conn.supervisor and not is_supervisor_hello(req):
            conn.announced = True
            self.events.emit("client_connected", client=conn.peer, clients=self.connection_count)
        if refused:
            return self._send(conn, protocol.error_response(req.id, ErrorCode.STOPPING, "the daemon is stopping"))
        try:
            try:
                result = self.service.handle(req, conn)
                buffers = protocol.ok_response(req.id, result, reply_to)
            except ClientGone:
                log.info("client %s went away; its queued work was cancelled", conn.peer)
                return False
            except LunaError as exc:
                buffers = protocol.error_response(req.id, exc.code, exc.message)
            del frame, req  # release the request body before sending a big answer
            return self._send(conn, buffers)
        finally:
            now = time.monotonic()
            with self._lock:
                conn.running = None
                self._in_flight -= 1
                if not self._in_flight and self._idle_waiters:
                    self._idle.notify_all()
                conn.busy, conn.last_active = False, now  # idle from now on (eviction order)

    def _send(self, conn: _Conn, buffers: list) -> bool:
        try:
            conn.channel.send(buffers, self.settings.frame_timeout)
            return not self._closed
        except OSError as exc:
            _wire_log.info(("send", _host(conn.peer)), "could not answer %s: %s", conn.peer, exc)
            return False

    def _admit_body(self, conn: _Conn, prefix: protocol.Prefix, header: dict) -> None:
        """transport's ``admit``: a body is received only for an authenticated request."""
        try:
            self.service.admit_body(header.get("op"), header.get("token"))
        except LunaError as exc:
            raise _BodyRefused(exc, protocol.echo_id(header.get("id"))) from None
        with self._lock:
            # An authenticated upload is under way: a connection flood must not evict it
            # mid-body (it would count as a never-authenticated idle connection until the
            # frame completes). _handle_frame resets ``busy`` once it is answered.
            conn.authenticated = conn.busy = True

    def _segments_for(self, conn: _Conn, header: dict) -> dict:
        """transport's ``segments``: asked only when a frame names a segment. A
        descriptor is honoured only for a request carrying the right token, and only
        against the segments registered on this very connection."""
        if not self.service.token_ok(header.get("token")):
            raise LunaError(ErrorCode.UNAUTHORIZED, "tensors in shared memory need the daemon's token (missing or wrong)")
        return {name: seg.buf for name, seg in conn.segments.items()}

    def _reply_target(self, conn: _Conn, name: Any, token: Any) -> protocol.ShmTarget:
        """The segment a request asked its answer's tensors to be written into."""
        if not self.service.token_ok(token):
            raise LunaError(ErrorCode.UNAUTHORIZED, "answers in shared memory need the daemon's token (missing or wrong)")
        seg = conn.segments.get(name) if type(name) is str else None
        if seg is None or seg.buf is None:
            raise LunaError(ErrorCode.BAD_FRAME, f"shm_reply {protocol.shown(name)} is not a segment registered on this connection")
        return protocol.ShmTarget(name, seg.buf, DEFAULT_MIN_BYTES)

    def _send_error_and_close(self, conn: _Conn, req_id: Any, exc: LunaError) -> None:
        """Answer ``exc`` (an id that cannot be echoed becomes null) and close."""
        try:
            conn.channel.send(protocol.error_response(protocol.echo_id(req_id), exc.code, exc.message), 2.0)
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
