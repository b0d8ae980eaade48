"""The service: ``Service.handle`` runs one request through the op table.

No sockets here. ``Service.handle(request, ctx)`` is called by the server's connection
thread; ``ctx.wait(future)`` lets the server watch the client while the work is queued
(a client that disconnects cancels its queued work).

Every failure leaves as a :class:`LunaError` with a code from ``protocol.ErrorCode``;
anything unexpected becomes ``internal`` (logged with a traceback) and the daemon keeps
serving.

The ops themselves live in ``luna_daemon.ops`` (``table``: the ``op`` decorator, the op
table and the shared argument checks; ``stats``: request statistics; one module per op
group). This module imports every group, so importing it yields the complete table; the
names callers import from here (``Stats``, ``Context``, ``LATENCY_BUCKETS``,
``UNKNOWN_OP_LABEL``, ``ROOT_KINDS``, ``op``, ``_OPS``...) stay importable from here.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import hmac
import logging
import time
from typing import Any, Callable

from luna_daemon import instances, logs, protocol
from luna_daemon.events import EventBus
from luna_daemon.models.engines.base import TiledArgs, is_oom
from luna_daemon.models.registry import Registry
from luna_daemon.models.sharing import parse_identity

# Importing an op group registers its ops in _OPS: every group is imported here, before
# Service exists, so no request can find an op missing (this order is the table's order).
from luna_daemon.ops import control, vae, clip, uploads, lora  # noqa: F401, I001
from luna_daemon.ops.clip import MAX_EMBEDDING_DIRS  # noqa: F401 (re-exported, as below)
from luna_daemon.ops.control import MAX_REGISTER_FOLDERS, ROOT_KINDS  # noqa: F401
from luna_daemon.ops.stats import LATENCY_BUCKETS, UNKNOWN_OP_LABEL, Stats
from luna_daemon.ops.table import _OPS, Context, OpFn, _arg, _tensor, op  # noqa: F401
from luna_daemon.ops.vae import _tiled  # noqa: F401
from luna_daemon.protocol import ErrorCode, LunaError, Request
from luna_daemon.settings import Settings
from luna_daemon.shm import SegmentTable

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """Raised by ``Context.wait`` when the client disconnected while its work waited.

    Not an error of the op: the server drops the connection without answering."""


def is_supervisor_hello(req: Request) -> bool:
    """Whether ``req`` asks to mark its connection as supervision (``hello`` with a role);
    the server then waits for the answer before it announces the connection as a client."""
    return req.op == "hello" and type(req.args) is dict and "role" in req.args


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
