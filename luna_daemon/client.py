"""DaemonClient: the Python client of the Luna protocol.

What a caller can rely on:

* Safe to share between threads. Each call borrows a persistent connection from a small
  pool (a new one is opened when all are busy), so threads never wait on each other's
  requests and connections are reused across calls.
* Errors are typed: :class:`DaemonUnavailable` (cannot connect / connection lost) and
  :class:`DaemonError` (the daemon answered with an error; ``.code`` is the protocol
  code such as ``"not_found"``). A client-side timeout is ``DaemonError("timeout")``.
* A pooled connection the daemon closed while it sat idle (idle timeout, eviction when
  the daemon is full, restart) is noticed before anything is sent and replaced, for
  every op. Idempotent ops (everything but ``shutdown``) are also retried once,
  transparently, on a fresh connection when the connection dies during the call.
* Tensors go in and come out as torch tensors; results alias the received buffer. To a
  daemon on this host, calls with big tensors use shared memory (``shm``; see
  docs/protocol.md): a big result then owns its region of the connection's segment,
  which is not reused while the result lives. Either way a result stays valid after
  later calls.
* Several instances (``[[instances]]`` in config.toml): the client is given the primary's
  address and routes each op by role to the instance that serves it, or every op to the
  one ``instance="<name>"`` (or :meth:`for_instance`) names; the rules are
  :mod:`luna_daemon.client_routing`'s. Connections are pooled per address.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from luna_daemon import protocol, shm, transport
from luna_daemon.client_routing import CallPath, Router, is_loopback, routed_ops
from luna_daemon.protocol import ErrorCode, Limits, LunaError
from luna_daemon.settings import Settings, read_token
from luna_daemon.shm import ClientSegment

if TYPE_CHECKING:  # torch is imported only by calls that carry tensors (the CLI never does)
    import torch

log = logging.getLogger(__name__)

NOT_IDEMPOTENT = frozenset({"shutdown"})
_MAX_WARNINGS = 16  # per answer; the daemon sends at most as many (docs/protocol.md)


def _log_warnings(op: str, result: Any) -> Any:
    """Log the daemon's ``warnings`` of one answer at WARNING here (in ComfyUI: its console)
    and return the result without them."""
    if isinstance(result, dict) and "warnings" in result:
        found = result.pop("warnings")
        for text in found[:_MAX_WARNINGS] if isinstance(found, list) else ():
            log.warning("Luna Daemon (%s): %s", op, str(text)[:1000])
    return result


_POOL_MAX = 8
_HELLO_TIMEOUT = 10.0  # seconds for the client's own hellos (identity, instance map): answered without queueing


class DaemonUnavailable(ConnectionError):
    """The daemon cannot be reached (not running, wrong port, connection lost)."""


class NotLunaDaemon(DaemonUnavailable):
    """Something accepts connections on the daemon port but does not answer ``hello`` as a
    Luna daemon (a foreign program, or a Luna process too wedged to answer). The message
    names the process holding the port where the OS lets us see it."""


class DaemonError(LunaError):
    """The daemon answered with an error. ``code`` is a protocol error code."""


class _Abandoned(Exception):
    """Carries what a caller's ``check`` raised past the client's own error handling."""

    def __init__(self, cause: BaseException):
        super().__init__(cause)
        self.cause = cause

    @staticmethod
    def guard(check: Callable[[], None]) -> Callable[[], None]:
        def guarded() -> None:
            try:
                check()
            except BaseException as exc:
                raise _Abandoned(exc) from exc
        return guarded


class _Connection:
    """One pooled connection and, once a call used shared memory on it, its segment
    (created, registered and destroyed with the connection: segments are per connection
    on both sides)."""

    def __init__(self, host: str, port: int, connect_timeout: float):
        try:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise DaemonUnavailable(
                f"Luna Daemon is not reachable at {host}:{port} ({exc.strerror or exc}). "
                "Start it with the tray app or 'luna-daemon serve'."
            ) from None
        # reuse_bodies: a result the caller dropped lends its buffer to the next one.
        self.channel = transport.Channel(self.sock, reuse_bodies=True)
        self.segment: ClientSegment | None = None
        self.wanted = 0  # segment size the daemon asked for (shm_wanted): used from the next call

    def close(self) -> None:
        self.channel.close()
        if self.segment is not None:
            self.segment.destroy()
            self.segment = None

    def segments(self) -> dict | None:
        return {self.segment.name: self.segment} if self.segment is not None else None


class DaemonClient:
    """Client for one daemon. ``token=None`` reads the per-install token file."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 19283,
        token: str | None = None,
        timeout: float = 120.0,
        *,
        connect_timeout: float = 5.0,
        settings: Settings | None = None,
        max_body_bytes: int = 16 * 1024**3,
        supervisor: bool = False,
        shm: bool | None = None,
        instance: str = "auto",
        identity: dict[str, Any] | None = None,
    ):
        self.host, self.port, self.timeout, self.connect_timeout = host, port, timeout, connect_timeout
        # Who this client is (``{"comfyui": ..., "name": ...}``; pid added): sent in a
        # ``hello`` once per NEW connection, never per call, so the daemon can count which
        # processes share its models (docs/monitor.md "Memory saved"). None: anonymous.
        self._identity = None if identity is None else {"pid": os.getpid(), **identity}
        self._settings = settings
        self._token = token
        self._limits = Limits(max_body_bytes=max_body_bytes)
        self._pool: list[_Connection] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        # A supervisor (the tray's health probes) opens each connection with an
        # authenticated ``hello`` role=supervisor: the daemon then keeps it out of its
        # client count, request stats, events and log (docs/protocol.md "Supervision").
        self._supervisor = supervisor
        # Shared memory for big tensors (docs/protocol.md "Shared memory"): only to a daemon
        # on this host (a loopback address); ``shm=False`` or setting ``shm = false`` turns it
        # off. Also off for good once the daemon refused a registration (shm off there,
        # an older daemon, /dev/shm full).
        if shm is None:
            shm = settings.shm if settings is not None else True
        self._shm_arg = shm
        self._shm = bool(shm) and is_loopback(host)
        self._shm_max = max_body_bytes
        # Routing (client_routing). ``_routed``: the ops call() routes (None: none, every op
        # goes to host:port -- a client bound to one address, or a daemon without instances).
        # Checked on every call, so a ping pays one attribute read and one set membership.
        if not isinstance(instance, str) or not instance:
            raise ValueError(f"instance must be 'auto' or an instance name, not {instance!r}")
        self.instance = instance
        self._routed: Any = routed_ops(instance)
        self._router = Router(_CALL_PATH)

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> "DaemonClient":
        kw.setdefault("timeout", settings.client_timeout)
        return cls(settings.host, settings.port, settings=settings, **kw)

    # ------------------------------------------------------------ plumbing
    @property
    def token(self) -> str | None:
        if self._token is None:
            # Tolerant: a client needs only host, port and the token file's place; an
            # unrelated bad key in config.toml must not break it (the host reports it).
            self._token = read_token(self._settings or Settings.load(tolerant=True))
        return self._token

    def _checkout(self, *, fresh: bool = False) -> tuple[_Connection, bool]:
        """A live pooled connection (most recently used first), else a new one (unless
        ``fresh``). Returns (connection, reused)."""
        while not fresh:
            with self._lock:
                if self._closed:
                    raise DaemonUnavailable("client is closed")
                if not self._pool:
                    break
                conn = self._pool.pop()
            # The daemon closes idle connections (idle_timeout, or eviction when it is full
            # of connections); one closed while pooled shows its FIN here, before anything
            # is sent, so even a non-idempotent op is never sent on it. (A close that races
            # with the send remains: the one retry in call() covers idempotent ops.)
            if not conn.channel.peer_gone():
                return conn, True
            conn.close()
        with self._lock:
            if self._closed:
                raise DaemonUnavailable("client is closed")
        conn = _Connection(self.host, self.port, self.connect_timeout)
        if self._supervisor:
            self._announce(conn, {"role": "supervisor"}, self.token, "supervisor", self.timeout)
        elif self._identity is not None:
            # No token: hello needs none, and an identity only counts once the connection
            # runs an authenticated op on a model.
            self._announce(conn, {"client": self._identity}, None, "client", min(self.timeout, _HELLO_TIMEOUT))
        return conn, False

    def _announce(self, conn: _Connection, args: dict, token: str | None, what: str, timeout: float) -> None:
        """The one ``hello`` that opens a new connection (supervisor role / client identity)."""
        buffers, _keep = protocol.request(0, "hello", args, token)
        try:
            conn.channel.send(buffers, timeout)
            frame = conn.channel.read_frame(self._limits, idle_timeout=timeout, frame_timeout=timeout)
            _rid, ok, payload = protocol.parse_response(frame)
        except (OSError, transport.PeerClosed, transport.IdleTimeout, transport.FrameTimeout, LunaError) as exc:
            conn.close()
            raise DaemonUnavailable(f"Luna Daemon at {self.host}:{self.port} did not answer the {what} hello: "
                                    f"{getattr(exc, 'message', None) or exc}") from None
        if not ok:
            conn.close()
            raise DaemonError(*payload)

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._pool) < _POOL_MAX:
                self._pool.append(conn)
                return
        conn.close()

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
             check: Callable[[], None] | None = None) -> Any:
        """Send one request to the instance that serves ``op`` and return its result
        (tensors as torch tensors).

        ``check``, if given, is called about every 0.1 s while the answer is awaited. If it
        raises (ComfyUI's ``throw_exception_if_processing_interrupted`` when the user
        cancels), the request is abandoned: its connection is closed, so the daemon drops
        the request if it is still queued, and the exception propagates."""
        routed = self._routed
        if routed is not None and op in routed:
            return self._router.route(self, op, args, timeout, check)
        return self._send(op, args, timeout, check)

    # ------------------------------------------------------------ routing (client_routing.Router)
    def instance_map(self) -> list[dict]:
        """The primary's instance map (``hello``'s ``instances``: name, service, host, port,
        devices, primary, state); [] for a daemon without instances. Fetched once, and again
        when routing finds it stale (client_routing)."""
        return self._router.instance_map(self)

    def for_instance(self, name: str) -> "DaemonClient":
        """A new client (close it when done) that sends every op to the instance ``name``.
        DaemonError ``bad_args`` naming the configured instances when there is none so called."""
        return self._router.for_instance(self, name)

    def _sibling(self, host: str, port: int, instance: str | None) -> "DaemonClient":
        """A new client like this one (token, timeouts, limits, role, shm, identity) for
        ``host:port``; ``instance`` None: bound to that address (it routes nothing)."""
        client = DaemonClient(host, port, token=self._token, timeout=self.timeout,
                              connect_timeout=self.connect_timeout, settings=self._settings,
                              max_body_bytes=self._limits.max_body_bytes, supervisor=self._supervisor,
                              shm=self._shm_arg, instance=instance or "auto", identity=self._identity)
        if instance is None:
            client._routed = None
        return client

    # ------------------------------------------------------------ sending
    def _send(self, op: str, args: dict[str, Any] | None, timeout: float | None,
              check: Callable[[], None] | None) -> Any:
        """call() on this client's own address (no routing)."""
        timeout = self.timeout if timeout is None else timeout
        req_id = next(self._ids)
        token = self.token if op not in ("ping", "hello") else None
        header, tensors = protocol.pack_request(req_id, op, args, token)
        shm_bytes = protocol.tensors_nbytes(tensors) if tensors and self._shm else 0
        buffers = None if shm_bytes else protocol.encode_frame(protocol.Kind.REQUEST, header, tensors)
        for attempt in (0, 1):
            conn, reused = self._checkout(fresh=attempt > 0)
            try:
                if shm_bytes or conn.segment is not None:
                    # Encoded per connection: the tensors are copied into *its* segment.
                    buffers = self._encode_shm(conn, header, tensors, shm_bytes, timeout)
                conn.channel.send(buffers, timeout)
                if check is not None:
                    conn.channel.wait_readable(_Abandoned.guard(check), time.monotonic() + timeout)
                frame = conn.channel.read_frame(self._limits, idle_timeout=timeout, frame_timeout=timeout,
                                                segments=None if conn.segment is None else conn.segments())
                if conn.segment is not None:
                    wanted = frame.header.get("shm_wanted")
                    if type(wanted) is int and wanted <= self._shm_max:
                        conn.wanted = wanted  # (bigger than the daemon allows: stays TCP)
            except _Abandoned as abandoned:
                conn.close()  # the daemon sees the client gone and drops the request if still queued
                log.info("%s abandoned by the caller (%s)", op, type(abandoned.cause).__name__)
                raise abandoned.cause from None
            except (transport.IdleTimeout, transport.FrameTimeout, socket.timeout):
                conn.close()  # the answer may still arrive: this stream is unusable now
                raise DaemonError(ErrorCode.TIMEOUT, f"no answer to {op!r} within {timeout:.0f}s") from None
            except (OSError, transport.PeerClosed) as exc:
                conn.close()
                # A pooled connection may have been closed by the daemon (idle timeout,
                # restart). Retrying on a fresh one is safe only for idempotent ops.
                if attempt == 0 and reused and op not in NOT_IDEMPOTENT:
                    continue
                raise DaemonUnavailable(f"connection to Luna Daemon at {self.host}:{self.port} lost during {op!r}: {exc}") from None
            except LunaError as exc:
                conn.close()
                raise DaemonError(exc.code, f"bad answer from daemon: {exc.message}") from None
            rid, ok, payload = protocol.parse_response(frame)
            if rid is not None and rid != req_id:
                conn.close()
                raise DaemonError(ErrorCode.BAD_FRAME, f"answer for request {rid!r}, expected {req_id}")
            if ok:
                self._checkin(conn)
                return _log_warnings(op, payload) if type(payload) is dict and "warnings" in payload else payload
            code, message = payload
            if code in (c.value for c in protocol.FATAL_CODES):
                conn.close()
            else:
                self._checkin(conn)
            raise DaemonError(code, message)
        raise AssertionError("unreachable")

    def _encode_shm(self, conn: _Connection, header: dict, tensors: dict, shm_bytes: int, timeout: float) -> list:
        """The request's buffers with its tensors in ``conn``'s segment when they are big
        enough (creating, growing and registering the segment as needed), and its answer's
        tensors asked for there too. Falls back to the body if shared memory fails."""
        big = shm_bytes >= shm.DEFAULT_MIN_BYTES and self._shm
        big = big and shm_bytes <= self._shm_max
        if big:
            # A decode's image is ~48x its latent: size the first segment for the answer.
            size = min(max(shm_bytes, conn.wanted, min(64 * shm_bytes, 256 * 1024**2), 16 * 1024**2), self._shm_max)
            if conn.segment is None or conn.segment.size < max(shm_bytes, conn.wanted) or conn.segment.in_use():
                # (in use: a result the caller still holds owns part of it; see ClientSegment.lend)
                self._register(conn, size, timeout)
        seg = conn.segment
        if seg is None or "token" not in header or (not big and seg.in_use()):
            # ping / hello carry no token, so no shared memory; a small call does not
            # replace a segment a result still owns: its answer comes in the body.
            return protocol.encode_frame(protocol.Kind.REQUEST, header, tensors)
        header = {**header, "shm_reply": seg.name}
        return protocol.encode_frame(protocol.Kind.REQUEST, header, tensors,
                                     protocol.ShmTarget(seg.name, seg.buf, shm.DEFAULT_MIN_BYTES))

    def _register(self, conn: _Connection, size: int, timeout: float) -> None:
        """Give ``conn`` a new segment of ``size`` bytes registered on it (the daemon
        releases the previous one). On a refusal shared memory is turned off for this
        client and the call goes on over TCP; a lost connection propagates (OSError)."""
        old, conn.segment = conn.segment, None
        if old is not None:
            old.destroy()
        try:
            seg = shm.ClientSegment(size)
        except (OSError, ValueError) as exc:  # /dev/shm full (ENOSPC), no shm on this system
            log.info("shared memory unavailable (%s); tensors go over TCP", exc)
            self._shm = False
            return
        header, _ = protocol.pack_request(0, "shm_register", {"name": seg.name, "size": seg.size}, self.token)
        try:
            conn.channel.send(protocol.encode_frame(protocol.Kind.REQUEST, header), timeout)
            frame = conn.channel.read_frame(self._limits, idle_timeout=timeout, frame_timeout=timeout)
        except BaseException:
            seg.destroy()
            raise
        _rid, ok, payload = protocol.parse_response(frame)
        if not ok:
            seg.destroy()
            log.info("the daemon refused shared memory (%s: %s); tensors go over TCP", *payload)
            self._shm = False
            return
        conn.segment, conn.wanted = seg, 0
        if isinstance(payload, dict) and type(payload.get("shm_max_segment")) is int:
            self._shm_max = min(self._shm_max, payload["shm_max_segment"])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for c in pool:
            c.close()
        self._router.close()

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ ops
    def ping(self) -> dict:
        return self.call("ping")

    def hello(self) -> dict:
        return self.call("hello")

    def verify(self, timeout: float = 3.0) -> dict:
        """``hello`` with a short deadline; returns its answer. Control commands call this
        first, so that a program on the port that is not a Luna daemon costs ``timeout``
        seconds instead of the long ``timeout`` meant for model work.

        Raises DaemonUnavailable when nothing listens, NotLunaDaemon when the peer accepts
        but does not answer, closes, or answers something that is not a Luna v1 ``hello``.
        A Luna daemon's own error answer (``busy``, ``stopping``) stays a DaemonError."""
        conn, _ = self._checkout()  # refused -> DaemonUnavailable: nothing listens
        self._checkin(conn)
        try:
            answer = self._send("hello", None, timeout, None)
        except DaemonUnavailable:
            raise self._not_luna("closed the connection without answering") from None
        except LunaError as exc:
            # timeout: no answer in time; fatal framing codes: the bytes that came back are
            # not a Luna frame (a daemon never answers a valid hello with those).
            if exc.code == ErrorCode.TIMEOUT.value:
                raise self._not_luna(f"did not answer within {timeout:g} s") from None
            if exc.code in {c.value for c in protocol.FATAL_CODES} or not isinstance(exc, DaemonError):
                raise self._not_luna(f"answered something that is not the Luna protocol ({exc.message})") from None
            raise
        if not isinstance(answer, dict) or answer.get("protocol") != protocol.VERSION:
            raise self._not_luna(f"answered hello without Luna protocol version {protocol.VERSION}")
        return answer

    def _not_luna(self, why: str) -> NotLunaDaemon:
        from luna_daemon.netutil import PortHolder, port_holder

        with self._lock:  # pooled connections talk to a foreign peer: never reuse them
            pool, self._pool = self._pool, []
        for c in pool:
            c.close()
        holder = port_holder(self.port) or PortHolder()
        if holder.is_luna:
            return NotLunaDaemon(
                f"the Luna Daemon process on {self.host}:{self.port} ({holder}) accepted the connection but {why}: "
                "it may be overloaded or hung; see 'luna-daemon logs', or restart it")
        return NotLunaDaemon(
            f"port {self.port} on {self.host} is held by {holder}, which is not a Luna daemon (it {why}): "
            "stop that program, or give Luna another port with 'port' (config.toml, LUNA_PORT or --port)")

    def status(self) -> dict:
        return self.call("status")

    def ps(self) -> list[dict]:
        return self.call("ps")["models"]

    def unload(self, model: str | None = None, *, all: bool = False) -> list[dict]:
        if all:
            return self.call("unload", {"all": True})["unloaded"]
        return self.call("unload", {"model": model})["unloaded"]

    def shutdown(self) -> dict:
        return self.call("shutdown")

    def vae_load(self, path: str, *, device: str | None = None, dtype: str | None = None, keep_alive: Any = None) -> dict:
        return self.call("vae_load", _drop_none(path=path, device=device, dtype=dtype, keep_alive=keep_alive))

    def vae_encode(self, model: str, pixels: torch.Tensor, tiled: bool | dict | None = None) -> torch.Tensor:
        return self.call("vae_encode", _drop_none(model=model, pixels=pixels, tiled=tiled))["latent"]

    def vae_decode(self, model: str, latent: torch.Tensor, tiled: bool | dict | None = None) -> torch.Tensor:
        return self.call("vae_decode", _drop_none(model=model, latent=latent, tiled=tiled))["image"]

    def clip_load(self, paths: str | Sequence[str], clip_type: str = "sd1", *, device: str | None = None,
                  dtype: str | None = None, keep_alive: Any = None) -> dict:
        paths = [paths] if isinstance(paths, str) else list(paths)
        return self.call("clip_load", _drop_none(paths=paths, clip_type=clip_type, device=device, dtype=dtype, keep_alive=keep_alive))

    def clip_tokenize(self, model: str, text: str, **options: Any) -> dict:
        return self.call("clip_tokenize", {"model": model, "text": text, "options": options})["tokens"]

    def clip_encode(self, model: str, *, tokens: dict | None = None, text: str | None = None, layer: int | None = None,
                    loras: Sequence[dict] | None = None) -> dict:
        """-> {"cond": tensor, "pooled_output": tensor|None, "extras": {...}}."""
        return self.call("clip_encode", _drop_none(model=model, tokens=tokens, text=text, layer=layer, loras=list(loras) if loras else None))

    def lora_has(self, sha256: str) -> bool:
        return bool(self.call("lora_has", {"sha256": sha256})["present"])

    def lora_put(self, data: bytes | bytearray | memoryview, sha256: str | None = None, name: str | None = None) -> dict:
        """Upload a LoRA file's bytes (use when the daemon cannot read the client's file)."""
        import torch

        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        return self.call("lora_put", _drop_none(data=buf, sha256=sha256, name=name))

    def lora_ensure(self, path: str) -> str:
        """Make the daemon hold the LoRA at ``path`` (a local file); returns its SHA-256.

        Asks ``lora_has`` first and uploads only when the daemon lacks it.
        """
        import hashlib
        from pathlib import Path

        data = Path(path).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if not self.lora_has(sha):
            self.lora_put(data, sha, Path(path).name)
        return sha

    def lora_load(self, path: str) -> dict:
        return self.call("lora_load", {"path": path})


def wait_for_daemon(host: str, port: int, timeout: float, *, proc: Any = None, token: str | None = "",
                    interval: float = 0.05, supervisor: bool = False) -> None:
    """Block until a daemon at ``host:port`` answers ``ping`` (a real protocol round trip).

    ``proc`` (a Popen) that exits first makes this fail at once. Raises DaemonUnavailable
    with the last error after ``timeout`` seconds. ``supervisor`` (needs the right
    ``token``): the pings are supervision, not client traffic (the daemon's own readiness check).
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise DaemonUnavailable(f"the daemon process exited with code {proc.returncode} before answering ping")
        try:
            with DaemonClient(host, port, token=token, timeout=5.0, connect_timeout=min(1.0, timeout),
                              supervisor=supervisor) as c:
                c.ping()
            return
        except (DaemonUnavailable, DaemonError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise DaemonUnavailable(f"no daemon answered ping on {host}:{port} within {timeout:.0f}s: {last}")
        time.sleep(interval)


def _drop_none(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


# What client_routing needs from this module (it cannot import it: this module imports it).
_CALL_PATH = CallPath(unavailable=DaemonUnavailable, error=DaemonError, not_idempotent=NOT_IDEMPOTENT,
                      hello_timeout=_HELLO_TIMEOUT)
