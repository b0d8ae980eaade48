"""The ops: validate arguments, call the registry / engine, shape the result.

No sockets here. ``Service.handle(request, ctx)`` is called by the server's connection
thread; ``ctx.wait(future)`` lets the server watch the client while the work is queued
(a client that disconnects cancels its queued work).

Every failure leaves as a :class:`LunaError` with a code from ``protocol.ErrorCode``;
anything unexpected becomes ``internal`` (logged with a traceback) and the daemon keeps
serving.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures as cf
import contextvars
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from luna_daemon import __version__, fsutil, instances, logs, protocol
from luna_daemon.events import EventBus
from luna_daemon.models.engines.base import DEFAULT_DECODE_TILE, DEFAULT_ENCODE_TILE, TiledArgs, is_oom
from luna_daemon.models.lora import SHA256_RE
from luna_daemon.models.devices import available_devices, device_memory
from luna_daemon.models.registry import Registry
from luna_daemon.models.sharing import parse_identity
from luna_daemon.models.uploads import store_upload
from luna_daemon.protocol import ErrorCode, LunaError, Request
from luna_daemon.settings import Settings
from luna_daemon.shm import DEFAULT_MIN_BYTES, MIN_SEGMENT, SegmentTable

log = logging.getLogger(__name__)

# Requests for an op that does not exist are counted under this one label: their names are
# never stored (a client could otherwise grow the stats, status and /metrics without bound).
UNKNOWN_OP_LABEL = "(unknown)"

# Seconds; Prometheus-style cumulative buckets for request latency.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ClientGone(Exception):
    """Raised by ``Context.wait`` when the client disconnected while its work waited.

    Not an error of the op: the server drops the connection without answering."""


class Context(Protocol):
    """What the server provides to an op while it runs."""

    client: str
    supervisor: bool  # set by Service for a supervising connection (see is_supervisor_hello)

    def wait(self, fut: cf.Future) -> Any: ...


def is_supervisor_hello(req: Request) -> bool:
    """Whether ``req`` asks to mark its connection as supervision (``hello`` with a role);
    the server then waits for the answer before it announces the connection as a client."""
    return req.op == "hello" and type(req.args) is dict and "role" in req.args


@dataclass
class Stats:
    """Request counters and latency histograms (read by status and /metrics).

    ``record`` is on every request's path, so it is O(1): latency counts are stored per
    bucket (not cumulative; see ``cumulative_buckets``) and the requests-per-minute
    window keeps one counter per second. Keys are bounded: an op name that is not a
    registered op is recorded as ``UNKNOWN_OP_LABEL``, and outcomes are ``ok``,
    ``cancelled`` or an error code.
    """

    started: float = field(default_factory=time.time)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    latency_buckets: dict[str, list[int]] = field(default_factory=dict)  # len(LATENCY_BUCKETS) + 1 (+Inf)
    latency_sum: dict[str, float] = field(default_factory=dict)
    latency_count: dict[str, int] = field(default_factory=dict)
    _per_second: collections.deque = field(default_factory=collections.deque, repr=False)  # [second, count]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, op: str, outcome: str, seconds: float) -> None:
        if op not in _OPS:
            op = UNKNOWN_OP_LABEL
        sec = int(time.time())
        idx = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        key = (op, outcome)
        requests, sums, counts, ps = self.requests, self.latency_sum, self.latency_count, self._per_second
        with self.lock:
            requests[key] = requests.get(key, 0) + 1
            b = self.latency_buckets.get(op)
            if b is None:
                b = self.latency_buckets[op] = [0] * (len(LATENCY_BUCKETS) + 1)
            b[idx] += 1
            sums[op] = sums.get(op, 0.0) + seconds
            counts[op] = counts.get(op, 0) + 1
            last = ps[-1] if ps else None
            if last is not None and last[0] == sec:
                last[1] += 1
            else:
                ps.append([sec, 1])
                while ps and ps[0][0] < sec - 60:
                    ps.popleft()

    def cumulative_buckets(self, op: str) -> list[tuple[float, int]]:
        """Prometheus-style (upper bound, cumulative count) pairs, ending with +Inf."""
        with self.lock:
            counts = list(self.latency_buckets.get(op, []))
        out, total = [], 0
        for edge, n in zip((*LATENCY_BUCKETS, float("inf")), counts):
            total += n
            out.append((edge, total))
        return out

    def latency(self) -> dict[str, dict[str, Any]]:
        """Per op: cumulative ``buckets`` ``[[upper bound, count], ...]`` (the last bound
        None = +Inf) and ``sum`` (seconds): the histogram a host's /metrics shows for an
        instance it reads through the ``status`` op (a child process)."""
        with self.lock:
            raw = {op: (list(b), self.latency_sum.get(op, 0.0)) for op, b in self.latency_buckets.items()}
        out: dict[str, dict[str, Any]] = {}
        for op, (counts, total) in raw.items():
            acc, buckets = 0, []
            for edge, n in zip((*LATENCY_BUCKETS, None), counts):
                acc += n
                buckets.append([edge, acc])
            out[op] = {"buckets": buckets, "sum": total}
        return out

    def snapshot(self) -> dict[str, Any]:
        now = int(time.time())
        with self.lock:
            total = sum(self.requests.values())
            errors = sum(n for (op, oc), n in self.requests.items() if oc != "ok")
            per_minute = sum(n for sec, n in self._per_second if sec > now - 60)
            by_op: dict[str, dict[str, int]] = {}
            for (op, oc), n in self.requests.items():
                by_op.setdefault(op, {})[oc] = n
        return {"total": total, "errors": errors, "per_minute": per_minute, "by_op": by_op}


OpFn = Callable[["Service", dict, Context], Any]
_OPS: dict[str, tuple[OpFn, bool, frozenset[str]]] = {}  # name -> (fn, needs_token, service kinds)


def op(name: str, *, auth: bool = True, service: str = "full vae clip") -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        _OPS[name] = (fn, auth, frozenset(service.split()))
        return fn

    return deco


# ----------------------------------------------------------------------------- arg helpers
def _arg(args: dict, name: str, kind: type | tuple, default: Any = ..., *, allow_none: bool = False) -> Any:
    if name not in args or (args[name] is None and default is not ...):
        if default is ...:
            raise LunaError(ErrorCode.BAD_ARGS, f"missing argument {name!r}")
        return default
    value = args[name]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise LunaError(ErrorCode.BAD_ARGS, f"argument {name!r} must be a number")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise LunaError(ErrorCode.BAD_ARGS, f"argument {name!r} must be {names}, got {type(value).__name__}")
    return value


def _tensor(args: dict, name: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    t = _arg(args, name, torch.Tensor)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise LunaError(ErrorCode.BAD_ARGS, f"{name} must be {want}, got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise LunaError(ErrorCode.BAD_ARGS, f"{name} must be a float tensor, got {t.dtype}")
    if t.numel() == 0:
        raise LunaError(ErrorCode.BAD_ARGS, f"{name} is empty (shape {list(t.shape)})")
    return t


def _tiled(args: dict, default: TiledArgs) -> TiledArgs | None:
    t = args.get("tiled")
    if t is None or t is False:
        return None
    if t is True:
        return default
    if not isinstance(t, dict):
        raise LunaError(ErrorCode.BAD_ARGS, "tiled must be true/false or {tile_x, tile_y, overlap}")
    vals = {}
    for k in ("tile_x", "tile_y", "overlap"):
        v = t.get(k, getattr(default, k))
        if type(v) is not int or v < 0 or (k != "overlap" and v < 1):
            raise LunaError(ErrorCode.BAD_ARGS, f"tiled.{k} must be a positive integer")
        vals[k] = v
    # Video VAEs: temporal tile sizes, absent/None = the VAE's own (image VAEs ignore them).
    for k, least in (("tile_t", 1), ("overlap_t", 0)):
        v = t.get(k)
        if v is not None and (type(v) is not int or v < least):
            raise LunaError(ErrorCode.BAD_ARGS, f"tiled.{k} must be null or an integer >= {least}")
        vals[k] = v
    # ``exact: true`` (the ComfyUI proxies): pass the sizes on as given, like ComfyUI's own
    # decode_tiled / encode_tiled, instead of shrinking an overlap of half a tile or more.
    if vals["overlap"] * 2 >= min(vals["tile_x"], vals["tile_y"]) and t.get("exact") is not True:
        vals["overlap"] = min(vals["tile_x"], vals["tile_y"]) // 4
    return TiledArgs(**vals)


# ----------------------------------------------------------------------------- the service
class Service:
    """Dispatches ops. Thread-safe: called concurrently from connection threads."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        events: EventBus,
        token: str,
        status_provider: Callable[[], dict] | None = None,
        on_shutdown: Callable[[], None] | None = None,
        lora_cache: Any = None,
        *,
        instance_name: str | None = None,
        instances_provider: Callable[[], list[dict] | None] | None = None,
    ):
        self.settings = settings
        # Multi-daemon (docs/protocol.md "Instances"): this instance's name and the map
        # ``hello`` returns. ``instances_provider`` (the host's live map, with states) may
        # answer None: then the static map from the settings is used.
        self.instance_name = instance_name or getattr(settings, "instance_name", "") or "main"
        self.instances_provider = instances_provider
        self._static_map: list[dict] | None = None
        self.registry = registry
        self.events = events
        self.token = token
        self.stats = Stats()
        # The daemon's snapshot (state, uptime, clients, models, engine...); without a
        # daemon (tests), what the registry alone can tell.
        self.status_provider = status_provider or (lambda: {"models": len(registry.entries()), "engine": registry.engine.name})
        self.on_shutdown = on_shutdown or (lambda: None)
        self.lora_cache = lora_cache
        self.shm = SegmentTable(settings.max_body_bytes)  # clients' segments, attached per connection
        logs.install_capture()  # warnings logged while serving a request go back in its answer

    def ops_for_service(self) -> list[str]:
        return sorted(n for n, (_, _, kinds) in _OPS.items() if self.settings.service in kinds)

    def instance_map(self) -> list[dict]:
        """The instance map ``hello`` answers: the provider's, else every configured
        instance's ``public()`` (computed once: ``[[instances]]`` apply only at a restart)."""
        if self.instances_provider is not None:
            try:
                found = self.instances_provider()
            except Exception:  # a host bug must not make hello fail (internal)
                log.exception("instance map provider failed; hello answers the configured map")
                found = None
            if found is not None:
                return found
        if self._static_map is None:
            self._static_map = [spec.public() for spec in instances.instance_specs(self.settings)]
        return self._static_map

    def wrong_instance(self, op_name: str, kinds: frozenset[str]) -> LunaError:
        """The ``wrong_instance`` error for an op this instance's service does not serve,
        naming an instance that serves it (from the map) or saying none is configured."""
        role = instances.ROLE_OF_OP.get(op_name) or next(iter(sorted(kinds - {"full"})), "full")
        service = self.settings.service
        here = f"op {op_name!r} is not served by instance {self.instance_name!r} (service {service})"
        try:
            entries = [e for e in self.instance_map() if e.get("name") != self.instance_name]
            other = instances.pick(entries, role)
        except Exception:  # a broken map must not turn the answer into internal
            log.exception("instance map unavailable for a wrong_instance answer")
            other = None
        if other is None:
            return LunaError(ErrorCode.WRONG_INSTANCE, f"{here}, and no configured instance serves it: add an "
                             f"[[instances]] table with service = \"{role}\" (or \"full\") to config.toml")
        return LunaError(ErrorCode.WRONG_INSTANCE, f"{here}; instance {other.get('name')!r} at "
                         f"{other.get('host')}:{other.get('port')} serves it")

    def token_ok(self, token: Any) -> bool:
        # Constant-time; surrogatepass: a str from outside JSON may hold lone surrogates.
        return (type(token) is str and bool(token)
                and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.token.encode()))

    def admit_body(self, op: Any, token: Any) -> None:
        """Raise LunaError unless a request for ``op`` carrying ``token`` may have a body.

        Only authenticated requests may: the token must be right (else ``unauthorized``)
        and ``op`` an op that requires it (else ``bad_frame``: ping, hello and unknown ops
        take no body). The server asks this from the header alone, before it receives any
        body byte, so a client without the token cannot make the daemon buffer a body."""
        if not self.token_ok(token):
            raise LunaError(ErrorCode.UNAUTHORIZED, "a request with a body needs the daemon's token "
                            "(missing or wrong; the client reads it from the daemon's config dir)")
        entry = _OPS.get(op) if type(op) is str else None
        if entry is None or not entry[1]:
            raise LunaError(ErrorCode.BAD_FRAME, f"op {protocol.shown(op)} takes no request body")

    def handle(self, req: Request, ctx: Context) -> Any:
        """Run one request. Returns the result or raises LunaError."""
        t0 = time.perf_counter()
        outcome = "ok"
        entry = _OPS.get(req.op)
        label = req.op if entry is not None else UNKNOWN_OP_LABEL  # never a client's name in stats / events
        try:
            if entry is None:
                raise LunaError(ErrorCode.UNKNOWN_OP, f"unknown op {protocol.shown(req.op)}; known: {', '.join(self.ops_for_service())}")
            fn, needs_auth, kinds = entry
            if needs_auth and not self.token_ok(req.token):
                raise LunaError(ErrorCode.UNAUTHORIZED, "missing or wrong token (the client reads it from the daemon's config dir)")
            if self.settings.service not in kinds:
                raise self.wrong_instance(req.op, kinds)
            if not needs_auth:  # ping / hello: no model work, nothing to collect (~1.7 µs a call)
                if req.op == "hello" and is_supervisor_hello(req):  # (hello is an op without auth)
                    self._claim_supervisor(req, ctx)
                return fn(self, req.args, ctx)
            with logs.collect_warnings() as warnings:
                result = fn(self, req.args, ctx)
            if warnings and isinstance(result, dict):
                # ComfyUI's own warnings (a missing embedding...) reach the caller, whose
                # client logs them in the calling process (docs/protocol.md "warnings").
                result = {**result, "warnings": warnings}
            return result
        except LunaError as exc:
            outcome = exc.code
            raise
        except ClientGone:
            outcome = "cancelled"
            raise
        except Exception as exc:
            outcome = ErrorCode.INTERNAL.value
            log.exception("op %s failed unexpectedly", req.op)
            raise LunaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}") from None
        finally:
            dt = time.perf_counter() - t0
            # Supervision (health probes, see _claim_supervisor) is not client traffic:
            # no stats, no events.
            if not getattr(ctx, "supervisor", False):
                self.stats.record(label, outcome, dt)
                if outcome == "cancelled":
                    log.info("%s from %s cancelled: the client disconnected", req.op, ctx.client)
                elif outcome != "ok":
                    self.events.emit("request_failed", op=label, code=outcome, client=ctx.client, ms=dt * 1000)
                elif req.op not in ("ping", "hello", "status", "ps"):
                    self.events.emit("request", op=req.op, client=ctx.client, ms=dt * 1000)

    def announce(self, ctx: Context, value: Any) -> None:
        """``hello``'s ``client`` identity (models/sharing.py) is kept on the connection; the
        models it loads or runs on then count it as a user. A second hello replaces it."""
        identity, name = parse_identity(value)
        if not hasattr(ctx, "identity"):
            raise LunaError(ErrorCode.BAD_ARGS, "this connection cannot carry a client identity")
        old = ctx.identity
        self.registry.sharing.connected(identity, name)
        if old is not None:
            self.registry.sharing.disconnected(old)
        ctx.identity = identity

    def connection_closed(self, ctx: Context) -> None:
        """The server's call when a connection ends: its identity no longer has it open."""
        identity = getattr(ctx, "identity", None)
        if identity is not None:
            ctx.identity = None
            self.registry.sharing.disconnected(identity)

    def _claim_supervisor(self, req: Request, ctx: Context) -> None:
        """``hello`` with ``role: "supervisor"`` marks the connection as supervision. Only
        with the token: otherwise any local program could hide its traffic from the stats."""
        role = req.args.get("role")
        if role != "supervisor":
            raise LunaError(ErrorCode.BAD_ARGS, f"role must be 'supervisor' (or left out), not {protocol.shown(role)}")
        if not self.token_ok(req.token):
            raise LunaError(ErrorCode.UNAUTHORIZED, "role 'supervisor' needs the daemon's token (missing or wrong)")
        ctx.supervisor = True

    # -------------------------------------------------------------- running work
    def run(self, ctx: Context, model_id: Any, fn: Callable[[Any], Any]) -> Any:
        # The model's executor thread runs ``fn`` in a copy of this request's context, so
        # what it logs is collected for this request too (logs.collect_warnings).
        context = contextvars.copy_context()
        fut = self.registry.submit(model_id, lambda m: context.run(fn, m))
        self.registry.sharing.used(model_id, getattr(ctx, "identity", None))  # after submit: a loaded model
        try:
            return ctx.wait(fut)
        except cf.CancelledError:
            raise LunaError(ErrorCode.STOPPING, "request cancelled") from None
        except (LunaError, ClientGone):
            raise
        except Exception as exc:
            if is_oom(exc):
                raise LunaError(ErrorCode.OOM, f"out of memory: {exc}") from None
            log.warning("model call failed: %s: %s", type(exc).__name__, exc)
            raise LunaError(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}") from None

    def _vae(self, args: dict) -> str:
        model_id = _arg(args, "model", str)
        if self.registry.get(model_id).kind != "vae":
            raise LunaError(ErrorCode.BAD_ARGS, f"{model_id} is not a VAE")
        return model_id

    def _clip(self, args: dict) -> str:
        model_id = _arg(args, "model", str)
        if self.registry.get(model_id).kind != "clip":
            raise LunaError(ErrorCode.BAD_ARGS, f"{model_id} is not a CLIP")
        return model_id

    def run_vae(self, ctx: Context, model_id: str, call: Callable[[Any, TiledArgs | None], Any], tiled: TiledArgs | None, default: TiledArgs) -> Any:
        """Run a VAE call; on out-of-memory retry once tiled (warning event), then ``oom``."""
        try:
            return self.run(ctx, model_id, lambda m: call(m, tiled))
        except LunaError as exc:
            if exc.code != ErrorCode.OOM.value or tiled is not None:
                raise
            msg = f"VAE ran out of memory ({exc.message}); retrying tiled"
            log.warning(msg)
            self.events.emit("warning", message=msg, model=model_id)
            return self.run(ctx, model_id, lambda m: call(m, default))

    def load(self, kind: str, paths: list[str], args: dict, clip_type: str | None = None, *, internal: bool = False,
             ctx: Context | None = None) -> dict:
        """Load (or reuse) a model with the request's device / dtype / keep_alive; the answer
        of every ``*_load`` op. ``internal``: ``paths`` are the daemon's own (uploads). The
        caller's announced identity (``ctx``) becomes a user of the model."""
        entry = self.registry.load(
            kind, paths, device=_arg(args, "device", str, None), dtype=_arg(args, "dtype", str, None),
            clip_type=clip_type, keep_alive=args.get("keep_alive"), internal=internal,
        )
        self.registry.sharing.used(entry.id, getattr(ctx, "identity", None))
        return {"model": entry.id, **entry.describe(full=True)}


# ----------------------------------------------------------------------------- ops
@op("ping", auth=False)
def _ping(svc: Service, args: dict, ctx: Context) -> dict:
    return {"pong": True, "time": time.time()}


@op("hello", auth=False)
def _hello(svc: Service, args: dict, ctx: Context) -> dict:
    if "client" in args:
        svc.announce(ctx, args["client"])
    return {
        "protocol": protocol.VERSION, "daemon": __version__, "service": svc.settings.service,
        "engine": svc.registry.engine.name, "ops": svc.ops_for_service(), "devices": available_devices(),
        "shm": svc.settings.shm, **_shm_limits(svc), "auth": "token", "max_body_bytes": svc.settings.max_body_bytes,
        "instance": svc.instance_name, "instances": svc.instance_map(),
    }


@op("status")
def _status(svc: Service, args: dict, ctx: Context) -> dict:
    by_dev = svc.registry.bytes_by_device()
    devices = {d: {**device_memory(d), "models_bytes": by_dev.get(d, 0)} for d in available_devices()}
    return {
        "version": __version__, "service": svc.settings.service,
        "queue": sum(e.executor.depth for e in svc.registry.entries()),
        "devices": devices, "requests": svc.stats.snapshot(), "latency": svc.stats.latency(),
        "lora_cache": svc.lora_cache.stats() if svc.lora_cache is not None else None,
        **svc.status_provider(),
        "roots": svc.registry.root_sources(),
        "sharing": svc.registry.sharing_snapshot(),
    }


@op("ps")
def _ps(svc: Service, args: dict, ctx: Context) -> dict:
    return {"models": svc.registry.ps(), "roots": svc.registry.root_sources()}


# Folder kinds a ComfyUI instance registers (folder_paths names; "clip" is the legacy name
# of text_encoders). Only folders: nothing is read from them until a model is loaded.
ROOT_KINDS = ("vae", "clip", "text_encoders", "loras", "embeddings", "checkpoints", "diffusion_models")
MAX_REGISTER_FOLDERS = 64  # per request


@op("register_roots")
def _register_roots(svc: Service, args: dict, ctx: Context) -> dict:
    """A ComfyUI instance's model folders become model roots for this daemon's lifetime
    (the registry keeps at most MAX_CLIENT_ROOTS, never in config.toml); each refused
    folder (too broad, missing, over the limit) is also a warning in the answer."""
    folders = _arg(args, "folders", dict)
    client = _arg(args, "client", dict, {})
    pairs: list[tuple[str, str]] = []
    for kind, paths in folders.items():
        if kind not in ROOT_KINDS:
            raise LunaError(ErrorCode.BAD_ARGS, f"folders: unknown kind {protocol.shown(kind)}; kinds: {', '.join(ROOT_KINDS)}")
        if not isinstance(paths, list) or not all(isinstance(p, str) and 0 < len(p) <= 4096 for p in paths):
            raise LunaError(ErrorCode.BAD_ARGS, f"folders[{kind!r}] must be a list of folder paths")
        pairs += [(kind, p) for p in paths]
    if len(pairs) > MAX_REGISTER_FOLDERS:
        raise LunaError(ErrorCode.BAD_ARGS, f"at most {MAX_REGISTER_FOLDERS} folders per register_roots request")
    pid = client.get("pid")
    comfy = client.get("comfyui")
    what = "ComfyUI" + (f" {protocol.shown(comfy)[:300]}" if isinstance(comfy, str) and comfy else "")
    if type(pid) is int:
        what += f" (pid {pid})"
    source = f"{what} via {ctx.client}"
    added, refused = svc.registry.add_client_roots(pairs, source)
    for r in refused:
        log.warning("model folder %s of %s not added as a model root: %s", r["path"], what, r["reason"])
    if added:
        log.info("model roots added for %s: %s", what, ", ".join(a["path"] for a in added))
    return {"added": added, "refused": refused, "roots": svc.registry.root_sources()}


@op("unload")
def _unload(svc: Service, args: dict, ctx: Context) -> dict:
    if args.get("all") is True:
        return {"unloaded": svc.registry.unload_all()}
    return {"unloaded": [svc.registry.unload(_arg(args, "model", str))]}


@op("shutdown")
def _shutdown(svc: Service, args: dict, ctx: Context) -> dict:
    # The stop runs on another thread: it waits for in-flight requests, this one included.
    svc.on_shutdown()
    return {"stopping": True}


def _shm_limits(svc: Service) -> dict:
    return {"shm_min_segment": MIN_SEGMENT, "shm_max_segment": svc.settings.max_body_bytes, "shm_min_bytes": DEFAULT_MIN_BYTES}


@op("shm_register")
def _shm_register(svc: Service, args: dict, ctx: Context) -> dict:
    """Attach the caller's shared-memory segment ``{name, size}`` to this connection
    (docs/protocol.md "Shared memory"). It replaces the connection's previous segment,
    which is released; every segment is released when the connection ends."""
    if not svc.settings.shm:
        raise LunaError(ErrorCode.BAD_ARGS, "shared memory is off on this daemon (setting shm); send tensors in the body")
    segments = getattr(ctx, "segments", None)
    if segments is None:
        raise LunaError(ErrorCode.BAD_ARGS, "this connection cannot carry shared memory")
    seg = svc.shm.attach(args.get("name"), args.get("size"))
    for old in list(segments.values()):
        svc.shm.release(old)
    segments.clear()
    segments[seg.name] = seg
    return {"name": seg.name, "size": seg.size, **_shm_limits(svc)}


_ECHO_CACHE: dict[tuple, torch.Tensor] = {}


@op("echo")
def _echo(svc: Service, args: dict, ctx: Context) -> dict:
    """Diagnostics / benchmarks: returns the shapes of the tensors it got (with
    ``back: true`` the tensors themselves, under ``back``), plus an optional float32
    ``reply`` of ``reply_shape`` (zeros; cached so the benchmark measures transport)."""
    shape = args.get("reply_shape")
    out: dict[str, Any] = {"received": {k: list(v.shape) for k, v in args.items() if isinstance(v, torch.Tensor)}}
    if args.get("back") is True:
        out["back"] = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    if shape is not None:
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
            raise LunaError(ErrorCode.BAD_ARGS, "reply_shape must be a list of non-negative ints")
        n = 4
        for d in shape:
            n *= d
        if n > svc.settings.max_body_bytes:
            raise LunaError(ErrorCode.TOO_LARGE, f"reply of {n} bytes exceeds max_body_bytes")
        key = tuple(shape)
        if key not in _ECHO_CACHE:
            _ECHO_CACHE.clear()
            _ECHO_CACHE[key] = torch.zeros(key, dtype=torch.float32)
        out["reply"] = _ECHO_CACHE[key]
    return out


# [B, C, L] audio / 1-D, [B, C, h, w] image, [B, C, T, h, w] video latents (pixels likewise:
# [B, L, C], [B, H, W, C], [B, T, H, W, C]); the engine checks them against the loaded VAE.
_VAE_NDIMS = (3, 4, 5)


def _vae_options(args: dict) -> dict:
    """``vae_options`` (ComfyUI's ``decode(samples, vae_options=...)``, e.g. Hunyuan3D's
    ``num_chunks`` / ``octree_resolution``): a flat dict of JSON scalars."""
    options = args.get("vae_options")
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in options.items()):
        raise LunaError(ErrorCode.BAD_ARGS, "vae_options must be a flat object of numbers, strings or booleans")
    return options


@op("vae_load", service="full vae")
def _vae_load(svc: Service, args: dict, ctx: Context) -> dict:
    return svc.load("vae", [_arg(args, "path", str)], args, ctx=ctx)


@op("vae_encode", service="full vae")
def _vae_encode(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._vae(args)
    pixels = _tensor(args, "pixels", _VAE_NDIMS)
    latent = svc.run_vae(ctx, model_id, lambda m, t: m.encode(pixels, t), _tiled(args, DEFAULT_ENCODE_TILE), DEFAULT_ENCODE_TILE)
    return {"latent": latent}


@op("vae_decode", service="full vae")
def _vae_decode(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._vae(args)
    latent = _tensor(args, "latent", _VAE_NDIMS)
    options = _vae_options(args)
    if options:
        def call(m, t):
            if not getattr(m, "supports_vae_options", False):
                raise LunaError(ErrorCode.BAD_ARGS, f"this VAE's engine does not take vae_options {sorted(options)} "
                                                    "(run the daemon with engine = comfy)")
            return m.decode(latent, t, options=options)
    else:
        def call(m, t):
            return m.decode(latent, t)
    image = svc.run_vae(ctx, model_id, call, _tiled(args, DEFAULT_DECODE_TILE), DEFAULT_DECODE_TILE)
    return {"image": image}


@op("clip_load", service="full clip")
def _clip_load(svc: Service, args: dict, ctx: Context) -> dict:
    paths = args.get("paths", [args["path"]] if isinstance(args.get("path"), str) else None)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise LunaError(ErrorCode.BAD_ARGS, "clip_load needs 'paths' (a list of files) or 'path'")
    return svc.load("clip", paths, args, _arg(args, "clip_type", str, "sd1"), ctx=ctx)


@op("clip_tokenize", service="full clip")
def _clip_tokenize(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._clip(args)
    text = _arg(args, "text", str)
    options = dict(_arg(args, "options", dict, {}))
    options.pop("embedding_directories", None)  # only the checked top-level argument may set it
    dirs = _embedding_dirs(svc, args)
    model = svc.registry.get(model_id).model
    if dirs is not None and getattr(model, "supports_embedding_directories", False):
        options["embedding_directories"] = dirs
    elif "embedding:" in text and not getattr(model, "supports_embedding_directories", False):
        log.warning("the %s engine does not load textual-inversion embeddings: 'embedding:' names are tokenized "
                    "as plain text (set engine = comfy)", svc.registry.engine.name)
    return {"tokens": svc.run(ctx, model_id, lambda m: m.tokenize(text, **options))}


MAX_EMBEDDING_DIRS = 32


def _embedding_dirs(svc: Service, args: dict) -> list[str] | None:
    """The calling ComfyUI's embedding folders (``embedding_directories``) that lie inside
    the model roots; one outside them is left out with a warning. None: not given."""
    given = args.get("embedding_directories")
    if given is None:
        return None
    if not isinstance(given, list) or len(given) > MAX_EMBEDDING_DIRS or not all(isinstance(d, str) and d for d in given):
        raise LunaError(ErrorCode.BAD_ARGS, f"embedding_directories must be a list of at most {MAX_EMBEDDING_DIRS} folders")
    roots = svc.registry.roots()
    out: list[str] = []
    for d in given:
        real = Path(os.path.realpath(os.path.expanduser(d)))
        if not fsutil.within(real, roots):
            log.warning("embedding folder %s is not inside the daemon's model roots: its embeddings are not used "
                        "(the Luna nodes register it on first use; or add it to model_roots)", fsutil.short(d))
        elif str(real) not in out:
            out.append(str(real))
    return out


def _check_tokens(tokens: Any) -> dict:
    # Only the outer shape: the token dict must reach the engine exactly as ComfyUI's
    # tokenizer made it (empty chunk lists, tuple chunks, extra keys); each engine checks
    # the streams it reads and answers bad_args / model_error for the rest.
    if not isinstance(tokens, dict) or not tokens or not all(isinstance(k, str) for k in tokens):
        raise LunaError(ErrorCode.BAD_ARGS, "tokens must be a non-empty {encoder: [chunk, ...]} object")
    return tokens


@op("clip_encode", service="full clip")
def _clip_encode(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._clip(args)
    layer = _arg(args, "layer", int, None)
    unprojected = _arg(args, "unprojected", bool, False)
    if layer is not None and layer >= 0:
        raise LunaError(ErrorCode.BAD_ARGS, "layer counts from the end like CLIPSetLastLayer: -1 = last, -2 = penultimate ...")
    model = svc.registry.get(model_id).model
    stack = args.get("loras") or []
    loras = []
    if stack:
        loras = _lora_cache(svc).resolve_stack(stack, model.patchable_keys() if model is not None else [])
    extra: dict[str, Any] = {}
    if unprojected:  # only sent by clients that need it (GLIGEN's return_pooled="unprojected")
        if not getattr(model, "supports_unprojected", False):
            raise LunaError(ErrorCode.BAD_ARGS, "this engine cannot return the unprojected pooled output (use engine = comfy)")
        extra["unprojected"] = True
    if "tokens" in args:
        tokens = _check_tokens(args["tokens"])

        def call(m: Any) -> dict:
            return m.encode(tokens, layer=layer, loras=loras, **extra)
    else:
        text = _arg(args, "text", str)

        def call(m: Any) -> dict:
            return m.encode(m.tokenize(text), layer=layer, loras=loras, **extra)

    out = dict(svc.run(ctx, model_id, call))
    return {"cond": out.pop("cond"), "pooled_output": out.pop("pooled_output", None), "extras": out}


# ---------------------------------------------------------------- uploaded state dicts
# ``vae_load_sd`` / ``clip_load_sd`` (the ComfyUI Checkpoint Tunnel): see models/uploads.py.
def _sha_arg(args: dict) -> str:
    sha = _arg(args, "sha256", str).lower()
    if not SHA256_RE.fullmatch(sha):
        raise LunaError(ErrorCode.BAD_ARGS, "sha256 must be 64 hex digits")
    return sha


def _load_uploaded(svc: Service, kind: str, args: dict, ctx: Context) -> dict:
    sha = _sha_arg(args)
    paths, clip_type = store_upload(svc.settings, svc.registry, kind, sha, args.get("data"),
                                    model_class=args.get("model_class"), tokenizer_class=args.get("tokenizer_class"))
    out = {**svc.load(kind, [str(p) for p in paths], args, clip_type, internal=True, ctx=ctx), "sha256": sha}
    if clip_type is not None:
        out["clip_type"] = clip_type
    return out


@op("vae_load_sd", service="full vae")
def _vae_load_sd(svc: Service, args: dict, ctx: Context) -> dict:
    return _load_uploaded(svc, "vae", args, ctx)


@op("clip_load_sd", service="full clip")
def _clip_load_sd(svc: Service, args: dict, ctx: Context) -> dict:
    return _load_uploaded(svc, "clip", args, ctx)


def _lora_cache(svc: Service):
    if svc.lora_cache is None:
        raise LunaError(ErrorCode.BAD_ARGS, "this daemon has no LoRA support")
    return svc.lora_cache


@op("lora_has", service="full clip")
def _lora_has(svc: Service, args: dict, ctx: Context) -> dict:
    sha = _arg(args, "sha256", str).lower()
    return {"sha256": sha, "present": _lora_cache(svc).has(sha)}


@op("lora_put", service="full clip")
def _lora_put(svc: Service, args: dict, ctx: Context) -> dict:
    data = _arg(args, "data", torch.Tensor)
    if data.dtype != torch.uint8 or data.ndim != 1:
        raise LunaError(ErrorCode.BAD_ARGS, "data must be the LoRA file's bytes as a 1-D uint8 tensor")
    sha = _arg(args, "sha256", str, None)
    return _lora_cache(svc).put(memoryview(data.numpy()), sha, _arg(args, "name", str, ""))


@op("lora_load", service="full clip")
def _lora_load(svc: Service, args: dict, ctx: Context) -> dict:
    cache = _lora_cache(svc)
    path = svc.registry.resolve_path(_arg(args, "path", str))
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise LunaError(ErrorCode.BAD_ARGS, f"{path.name}: only .safetensors LoRA files are accepted (pickle-based formats are never loaded)")
    with svc.registry.confine():  # the file read must stay inside the model roots too
        return cache.load_path(path)


@op("lora_list", service="full clip")
def _lora_list(svc: Service, args: dict, ctx: Context) -> dict:
    cache = _lora_cache(svc)
    return {"loras": cache.list(), "stats": cache.stats()}
