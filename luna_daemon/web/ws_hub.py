"""The monitor's WebSocket side (``/ws``): live events to dashboards, actions from them.

What a caller (the Monitor) can rely on:

* :meth:`WsHub.on_event` is an EventBus subscriber that never blocks: it appends a
  pre-serialised message to each client's bounded queue and wakes that client's sender;
  a client that falls behind has its queue dropped and gets a fresh snapshot instead.
* Whatever a client sends gets a typed answer (``error`` or ``reply`` with a code) and
  the connection stays usable: malformed, deeply nested or oddly typed messages included.
  Only a message over ``max_size`` closes it (1009, by the websockets library).
* A client without a session never receives log lines: its snapshots carry none, and a
  ``log`` event reaches it as ``{"type": "event", "seq": N, "name": "hidden"}`` so that
  its sequence stays gap-free. Logging in sends it a fresh snapshot with the log.
* Chart samples (:mod:`luna_daemon.web.history`) go out as ``{"type": "sample"}``
  through the same bounded queues, outside ``seq``; every snapshot carries the whole
  (bounded) ``history``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from luna_daemon.logs import RateLimitedLog
from luna_daemon.web import settings_io, views
from luna_daemon.web.auth import Gate, token_matches
from luna_daemon.web.common import PAGES, one_line, to_json
from luna_daemon.web.instances import ChildPoller, find, instance_items, is_primary, overall_state

log = logging.getLogger("luna_daemon.web.monitor")

QUEUE_LIMIT = 2000           # outgoing messages buffered per client before it is resynced
MAX_WS_CLIENTS = 32
MAX_PENDING_CONTROL = 4      # concurrent start/stop/unload/save per connection
MAX_DEPTH = 16               # nesting of an incoming message (the deepest real one is 3)
SNAPSHOT_LOG_LINES = 1000
TICK = 2.0                   # seconds between status pushes (uptime, memory, last use)
REFRESH_MIN_INTERVAL = 0.25  # at most this often an event-triggered status push
# Events after which the status/models views have changed.
_REFRESH_ON = frozenset({"state", "model_loaded", "model_unloaded", "client_connected", "client_disconnected",
                         "config"})  # config: restart_needed / config_error (Host.reload_config)
# Events only a logged-in client may see (log lines may hold paths and prompt text).
PRIVATE_EVENTS = frozenset({"log"})
CONTROL = frozenset({"start", "stop", "restart", "unload", "save_settings"})


class BadMessage(ValueError):
    """An incoming message that is not a JSON object we can read; the text says why."""


def _too_deep(obj: Any, limit: int) -> bool:
    """True if ``obj`` nests lists/objects deeper than ``limit`` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def parse_message(raw: str | bytes) -> dict[str, Any]:
    """One incoming WebSocket message as a JSON object, nested at most ``MAX_DEPTH`` deep."""
    if isinstance(raw, bytes):
        raise BadMessage("send JSON text messages")
    try:
        msg = json.loads(raw)
    except RecursionError:
        # The C parser recurses per bracket; the interpreter's limit stops it cleanly.
        raise BadMessage(f"message nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise BadMessage(f"invalid JSON message: {exc}") from None
    # Walk only when there are enough brackets to matter (the common message has few).
    if raw.count("[") + raw.count("{") > MAX_DEPTH and _too_deep(msg, MAX_DEPTH):
        raise BadMessage(f"message nested too deeply (at most {MAX_DEPTH} levels)")
    if not isinstance(msg, dict):
        raise BadMessage("a message is a JSON object with a \"type\"")
    return msg


class _Client:
    """One WebSocket connection: its bounded outgoing queue and login state.

    ``queue``, ``snapshot_reason`` and ``wake_pending`` are guarded by the hub's lock;
    the rest belong to the event loop thread (``authed`` is also read, unlocked, by
    :meth:`WsHub.on_event`: a stale read there is covered by the login snapshot).
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
        """Wake the sender; called with the hub lock held; never blocks."""
        if self.wake_pending:
            return
        self.wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:
            pass  # loop already closed: the monitor is stopping


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


class WsHub:
    """Every dashboard connection of one monitor; see the module docstring."""

    def __init__(self, host: Any, gate: Gate, refusals: RateLimitedLog, *, queue_limit: int = QUEUE_LIMIT,
                 children: ChildPoller | None = None, history: Any = None):
        self.host = host
        self.children = children
        self.history = history  # web.history.History: the charts' samples (None: no charts)
        self.settings = host.settings
        self.gate = gate
        self.refusals = refusals
        self.queue_limit = queue_limit
        self._lock = threading.RLock()
        self._clients: list[_Client] = []
        self._seq = 0  # the event stream's sequence number (per monitor, gap-free per client)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def clear(self) -> None:
        with self._lock:
            self._clients.clear()

    # ------------------------------------------------------------ event fan-out
    def on_event(self, event: Any) -> None:
        """EventBus subscriber: runs on the emitting (daemon) thread; never blocks."""
        if event.type == "state" and self.children is not None:
            self.children.poke()  # a child started or stopped: its card's numbers follow soon
        if not self._clients:
            return
        with self._lock:
            self._seq += 1
            text = to_json({"type": "event", "seq": self._seq, "name": event.type, "time": event.time,
                            "bus_seq": event.seq, "data": event.data})
            hidden = (to_json({"type": "event", "seq": self._seq, "name": "hidden", "time": event.time})
                      if event.type in PRIVATE_EVENTS else text)
            self._fan_out(event.type, text, hidden)

    def on_sample(self, sample: dict[str, Any]) -> None:
        """History listener (sampler thread; never blocks): one ``{"type": "sample"}``
        message per chart sample. Outside the event ``seq``: a sample lost to an overflow
        is covered by the resync snapshot, which carries the whole history."""
        if not self._clients:
            return
        with self._lock:
            text = to_json({"type": "sample", "sample": sample})
            self._fan_out("sample", text, text)

    def _fan_out(self, name: str, text: str, hidden: str) -> None:
        """Queue one message for every client; called with the lock held."""
        for c in self._clients:
            if c.snapshot_reason is not None:
                continue  # a snapshot is due; it will cover this message
            if len(c.queue) >= self.queue_limit:
                # Too slow: drop what is buffered and resync with a snapshot rather
                # than ever making the daemon wait for a browser.
                c.dropped += len(c.queue) + 1
                c.queue.clear()
                c.snapshot_reason = "overflow"
            else:
                c.queue.append((name, text if c.authed else hidden))
            c.poke()

    def _status(self) -> dict[str, Any]:
        return views.status(self.host, monitor_clients=len(self._clients), children=self.children)

    def _models(self) -> list[dict[str, Any]]:
        return views.models(self.host, self.children)

    def _snapshot(self, seq: int, reason: str, client: _Client, dropped: int = 0) -> dict[str, Any]:
        return {
            "type": "snapshot", "seq": seq, "reason": reason, "dropped": dropped,
            "authenticated": client.authed,
            "status": self._status(),
            "models": self._models(),
            "logs": self.host.log_tail.since(0, SNAPSHOT_LOG_LINES) if client.authed else [],
            "settings": settings_io.describe(self.settings, views.devices()),
            "pages": list(PAGES),
            "history": self.history.describe() if self.history is not None else None,
        }

    def _resync(self, c: _Client, reason: str) -> None:
        with self._lock:
            c.snapshot_reason = c.snapshot_reason or reason
            c.poke()

    # ------------------------------------------------------------ connection
    async def handler(self, ws: ServerConnection) -> None:
        """The ``websockets`` connection handler of ``/ws``."""
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
                    await c.ws.send(to_json(self._snapshot(seq, reason, c, dropped)))
                    last_status = loop.time()
                refresh = False
                for name, text in items:
                    await c.ws.send(text)
                    refresh = refresh or name in _REFRESH_ON
                now = loop.time()
                if (refresh and now - last_status >= REFRESH_MIN_INTERVAL) or now - last_status >= TICK:
                    await c.ws.send(to_json({"type": "status", "status": self._status(), "models": self._models()}))
                    last_status = now
                elif refresh:
                    # Too soon after the last push: make sure the next wait ends in time.
                    last_status = now - TICK + REFRESH_MIN_INTERVAL
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - logged; the page reconnects
            # A view that failed to build (e.g. mid daemon teardown): close this
            # connection; the page reconnects and starts over from a fresh snapshot.
            self.refusals.error("sender", "dashboard sender failed, closing the connection: %s", one_line(exc))
            await c.ws.close(1011, "internal error")

    async def _send(self, c: _Client, obj: dict[str, Any]) -> None:
        try:
            await c.ws.send(to_json(obj))
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------ incoming
    async def _on_message(self, c: _Client, raw: str | bytes) -> None:
        try:
            msg = parse_message(raw)
        except BadMessage as exc:
            await self._send(c, {"type": "error", "error": {"code": "bad_message", "message": str(exc)}})
            return
        try:
            await self._dispatch(c, msg)
        except ConnectionClosed:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: answer it rather than drop the connection (1011)
            self.refusals.error("message", "dashboard %.40r message failed: %s", msg.get("type"), one_line(exc))
            await self._send(c, _reply(msg.get("id"), error=("internal", "the monitor could not handle this message (see the log)")))

    async def _dispatch(self, c: _Client, msg: dict[str, Any]) -> None:
        kind, mid = msg.get("type"), msg.get("id")
        if not isinstance(kind, str):
            await self._send(c, _reply(mid, error=("bad_message", '"type" must be a string such as "ping" or "login"')))
            return
        if kind == "login":
            await self._login(c, msg)
        elif kind == "snapshot":
            # The page saw a gap in seq (or wants a full refresh).
            self._resync(c, "requested")
        elif kind == "ping":
            await self._send(c, {"type": "pong", "id": mid, "time": time.time()})
        elif kind in CONTROL:
            if not (c.authed or token_matches(msg.get("token"), self.host.daemon.token)):
                self.refusals.warning("auth", "refused dashboard %s: not logged in", kind)
                await self._send(c, _reply(mid, error=("unauthorized",
                    "not logged in: run `luna-daemon dashboard` (or use the tray's Open Dashboard) to get a login link")))
                return
            if c.pending_control >= MAX_PENDING_CONTROL:
                await self._send(c, _reply(mid, error=("busy", "too many actions in progress; wait for them to finish")))
                return
            c.pending_control += 1
            asyncio.get_running_loop().create_task(self._control(c, kind, mid, msg))
        else:
            await self._send(c, _reply(mid, error=("unknown_type", f"unknown message type {kind[:64]!r}")))

    async def _login(self, c: _Client, msg: dict[str, Any]) -> None:
        gate = self.gate
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
                "login link": "this login link has expired or was already used; run `luna-daemon dashboard` (or the tray's Open Dashboard) again",
                "session": "the dashboard session has ended (Luna Daemon was restarted); run `luna-daemon dashboard` (or the tray's Open Dashboard) again",
                "token": "wrong token",
            }.get(how, "send secret, session or token")
            await self._send(c, {"type": "auth", "ok": False, "id": msg.get("id"), "error": reason})
            return
        first = not c.authed
        c.authed = True
        log.debug("dashboard logged in by %s", how)
        await self._send(c, {"type": "auth", "ok": True, "id": msg.get("id"), "session": session})
        if first:
            self._resync(c, "login")  # now with the log lines its first snapshot left out

    async def _control(self, c: _Client, kind: str, mid: Any, msg: dict[str, Any]) -> None:
        try:
            result = await _in_thread(lambda: self._do_control(kind, msg))
            reply = _reply(mid, result=result)
            if kind == "save_settings" and isinstance(result, dict) and not result.get("ok"):
                codes = result.get("codes", {}).values()
                code = "read_only" if "read_only" in codes else "invalid"
                text = ("some settings cannot be changed from the dashboard" if code == "read_only"
                        else "some settings are invalid")
                reply = _reply(mid, error=(code, text), extra={"result": result})
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
        """Runs on a worker thread (daemon start/stop/unload may take seconds). ``instance``
        names one instance; without it start/stop/restart/unload act on every instance."""
        from luna_daemon.daemon import DaemonStartError
        from luna_daemon.protocol import LunaError

        model = msg.get("model")
        if kind == "save_settings":
            log.info("dashboard: %s", kind)
            return settings_io.save(self.settings, msg.get("values"), views.devices())
        targets = self._targets(msg)
        one = "instance" in msg
        log.info("dashboard: %s%s%s", kind, f" {model[:200]}" if isinstance(model, str) and model else "",
                 f" (instance {targets[0][0]})" if one else "")
        try:
            if kind == "start":
                return self._start(targets)
            if kind == "stop":
                clean = self._stop(targets, one)
                return {"clean": clean, **self._states(targets)}
            if kind == "restart":
                clean = self._stop(targets, one)
                return {"clean": clean, **self._start(targets)}
            if kind == "unload":
                return self._unload(targets, msg, model)
        except DaemonStartError as exc:
            raise _ControlError("start_failed", f"daemon failed to start: {exc}") from None
        except LunaError as exc:
            raise _ControlError(exc.code, exc.message) from None
        raise _ControlError("unknown_type", kind)

    def _targets(self, msg: dict[str, Any]) -> list[tuple[str, Any]]:
        if "instance" not in msg:
            return instance_items(self.host)
        name = msg["instance"]
        if not isinstance(name, str):
            raise _ControlError("bad_args", '"instance" must be an instance name (a string), or left out for all')
        try:
            return [find(self.host, name)]
        except ValueError as exc:
            raise _ControlError("bad_args", str(exc)) from None

    def _states(self, targets: list[tuple[str, Any]]) -> dict[str, Any]:
        """``state`` (the one target's, or the host's overall state) and ``states`` per instance."""
        states = {n: i.state for n, i in targets}
        state = next(iter(states.values())) if len(targets) == 1 else overall_state(self.host)
        return {"state": state, "states": states}

    def _start(self, targets: list[tuple[str, Any]]) -> dict[str, Any]:
        from luna_daemon.daemon import DaemonStartError

        if len(targets) == 1:
            name, inst = targets[0]
            try:
                inst.start()
            except DaemonStartError as exc:
                if len(instance_items(self.host)) == 1:
                    raise  # one daemon: the message it always had
                raise _ControlError("start_failed", f"instance {name!r} failed to start: {exc}") from None
        else:
            # Host.start_all: primary first, then the children; one failing does not keep
            # the others from starting, and the error names each one that failed.
            failed = self.host.start_all()
            if failed:
                raise _ControlError("start_failed", "; ".join(f"instance {n!r} failed to start: {why}"
                                                              for n, why in failed.items()))
        return self._states(targets)

    def _stop(self, targets: list[tuple[str, Any]], one: bool) -> bool:
        if one:
            return bool(targets[0][1].stop())
        return bool(self.host.stop_all())  # all at once, each with its bounded clean stop

    def _unload(self, targets: list[tuple[str, Any]], msg: dict[str, Any], model: Any) -> dict[str, Any]:
        everything = msg.get("all") is True
        if not everything and (not isinstance(model, str) or not model):
            raise _ControlError("bad_args", "unload needs a model id (or all: true)")
        running = [(n, i) for n, i in targets if i.state == "running"]
        if not running:
            what = f"instance {targets[0][0]!r} is" if len(targets) == 1 else "no instance is"
            raise _ControlError("not_running", f"{what} not running; nothing is loaded")
        if not everything and len(running) > 1:
            # A model id belongs to one instance; ask the one that has it (or the primary).
            owner = next((n for n, _ in running if any(m.get("id") == model and m.get("instance") == n
                                                         for m in views.models(self.host, self.children))), None)
            running = [t for t in running if t[0] == owner] or running[:1]
        out: list[dict[str, Any]] = []
        for name, inst in running:
            got = self._unload_one(name, inst, model if not everything else None)
            out += [{**u, "instance": name} for u in got]
        if self.children is not None:
            self.children.poke()
        return {"unloaded": out}

    def _unload_one(self, name: str, inst: Any, model: str | None) -> list[dict[str, Any]]:
        if is_primary(self.host, inst):
            reg = inst.registry
            if reg is None:
                raise _ControlError("not_running", "the daemon is not running; nothing is loaded")
            return reg.unload_all() if model is None else [reg.unload(model)]
        # A child: the same unload op any client sends, on a supervisor connection (not
        # counted as client traffic), bounded by the child's own stop timeout.
        from luna_daemon.client import DaemonClient, DaemonError, DaemonUnavailable

        host, port = inst.address
        token = getattr(inst, "token", None) or self.host.daemon.token
        timeout = float(getattr(getattr(inst, "settings", None), "stop_timeout", 10.0)) + 5.0
        with DaemonClient(host, port, token=token, timeout=timeout, connect_timeout=5.0, supervisor=True, shm=False) as c:
            try:
                return c.unload(model, all=model is None)
            except DaemonUnavailable as exc:
                raise _ControlError("unavailable", f"instance {name!r} did not answer: {exc}") from None
            except DaemonError as exc:
                raise _ControlError(exc.code, exc.message) from None


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
