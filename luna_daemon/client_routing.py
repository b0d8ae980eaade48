"""Multi-instance routing for :class:`~luna_daemon.client.DaemonClient` (``[[instances]]``
in config.toml; docs/protocol.md "Instances").

What a caller can rely on (through DaemonClient, which owns one :class:`Router`):

* The client is given the primary's address and routes by itself. Ops with a role
  (``instances.ROLE_OF_OP``: vae_* to an instance serving VAE; clip_*, lora_* to one serving
  CLIP, uploads included) go to the instance :func:`instances.pick` chooses, everything else
  to the primary, except ``register_roots`` (a ComfyUI's model folders), which every
  instance gets (the primary's answer or error is the caller's; another instance's failure
  is logged). ``instance="<name>"`` (or ``for_instance``) sends every op to that one.
* The map comes from one ``hello`` on the primary, fetched lazily by the first routed op
  (one fetch for all threads), and is fetched again (once, then the op is retried once)
  when a routed instance is unreachable (idempotent ops) or answers ``wrong_instance``.
  A daemon whose ``hello`` has no ``instances`` (an older one) gets every op, and the
  client stops routing (``_routed`` None: a call then costs nothing for routing).
* Each other instance is reached through one pooled client per address (a "target"),
  closed with the router.

This module never imports :mod:`luna_daemon.client` (which imports it): the client gives
the Router its :class:`CallPath` once and itself on each call. (The Router keeps no
reference to its client: no cycle, so a client dropped unclosed still frees its sockets
and shared memory at once, as before the split.)
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from luna_daemon.instances import ROLE_OF_OP, pick
from luna_daemon.protocol import ErrorCode, LunaError

# The client's logger: what routing logs is the client's (ComfyUI users filter on it).
log = logging.getLogger("luna_daemon.client")


class _Every:
    """The ops a pinned client routes: all of them."""

    def __contains__(self, op: object) -> bool:
        return True


_EVERY = _Every()
# Ops every instance needs to hear (in auto mode): a ComfyUI's model folders must be
# readable by the instance that loads its VAE as much as by the one that loads its CLIP.
_BROADCAST = frozenset({"register_roots"})
_AUTO_ROUTED = frozenset(ROLE_OF_OP) | _BROADCAST


def routed_ops(instance: str) -> Any:
    """The ops a client with this ``instance`` value routes (a container for ``in``):
    ``"auto"``: ops with a role and broadcast ops; a name: every op."""
    return _AUTO_ROUTED if instance == "auto" else _EVERY


def is_loopback(host: str) -> bool:
    """Is ``host`` this machine? (Shared memory needs it; so does reaching an instance
    that advertises a loopback address.)"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CallPath(NamedTuple):
    """What routing needs from the client module, which cannot be imported from here."""

    unavailable: type[Exception]  # DaemonUnavailable: raised by _send when an address is unreachable
    error: type[LunaError]  # DaemonError: the daemon's typed answer
    not_idempotent: frozenset[str]  # ops never sent twice
    hello_timeout: float  # seconds for the hello that fetches the map (answered without queueing)


class RoutedClient(Protocol):
    """The client surface a Router uses (DaemonClient)."""

    host: str
    port: int
    timeout: float
    instance: str
    _routed: Any  # routed_ops(...), or None once routing is off (set by the Router)
    _router: "Router"

    def _send(self, op: str, args: dict[str, Any] | None, timeout: float | None,
              check: Callable[[], None] | None) -> Any: ...

    def _sibling(self, host: str, port: int, instance: str | None) -> "RoutedClient": ...

    def close(self) -> None: ...


class _Routes:
    """One fetched instance map and where each role goes: an address, or None = the
    client's own address (the primary, or an instance that is the primary)."""

    __slots__ = ("entries", "others", "primary", "to")

    def __init__(self, entries: list[dict], primary: Any, to: dict[str | None, tuple[str, int] | None],
                 others: list[tuple[str, int]]):
        self.entries = entries
        self.primary = primary  # the name the primary gave itself in hello
        self.to = to
        self.others = others  # every other instance's address (broadcast ops)


class Router:
    """The routing state of one client: its fetched map and its targets. Thread-safe.
    Every method that needs the client takes it (always the same one, the owner).

    ``route`` sends one routed op (the client calls it only for ops in its ``_routed``);
    ``instance_map`` / ``for_instance`` back the client's methods of those names;
    ``close`` closes every target and refuses new ones."""

    __slots__ = ("_closed", "_lock", "_path", "_routes", "_routes_lock", "targets")

    def __init__(self, path: CallPath):
        self._path = path
        self._routes: _Routes | None = None
        self._routes_lock = threading.Lock()  # held while fetching: one fetch for all threads
        self._lock = threading.Lock()  # guards targets and _closed
        self._closed = False
        self.targets: dict[tuple[str, int], RoutedClient] = {}  # one pooled client per other address

    def route(self, client: RoutedClient, op: str, args: dict[str, Any] | None, timeout: float | None,
              check: Callable[[], None] | None) -> Any:
        """``op`` sent where the map says (fetching it first if needed); see the module docstring."""
        path = self._path
        routes = self._routes or self._fetch(client, None)
        if op in _BROADCAST and client.instance == "auto":
            return self._broadcast(client, routes, op, args, timeout, check)
        role = ROLE_OF_OP.get(op)
        for attempt in (0, 1):
            addr = routes.to.get(role)
            target = client if addr is None else self._target(client, addr)
            try:
                return target._send(op, args, timeout, check)
            except path.unavailable:
                # An instance restarted elsewhere, or stopped: ask the primary again. (The
                # primary itself unreachable: the map cannot help.)
                if attempt or addr is None or op in path.not_idempotent:
                    raise
            except path.error as exc:
                # The map was stale (config changed and the host restarted): nothing ran.
                if attempt or exc.code != ErrorCode.WRONG_INSTANCE.value:
                    raise
            routes = self._fetch(client, routes)
        raise AssertionError("unreachable")

    def _broadcast(self, client: RoutedClient, routes: _Routes, op: str, args: dict[str, Any] | None, timeout: float | None,
                   check: Callable[[], None] | None) -> Any:
        """``op`` to the primary (its answer, or its error, is the caller's), then to every
        other instance; one of those that fails is logged, not raised (the loaders send
        register_roots again when an instance answers forbidden_path)."""
        answer = client._send(op, args, timeout, check)
        for addr in routes.others:
            try:
                self._target(client, addr)._send(op, args, timeout, check)
            except (self._path.unavailable, self._path.error) as exc:
                log.warning("%s not delivered to the Luna Daemon instance at %s:%d: %s", op, *addr, exc)
        return answer

    def _fetch(self, client: RoutedClient, stale: _Routes | None) -> _Routes:
        """The instance map from the primary's ``hello`` (one fetch for all threads: a
        caller that waited here while another fetched gets that one's map)."""
        with self._routes_lock:
            if self._routes is not None and self._routes is not stale:
                return self._routes
            answer = client._send("hello", None, min(client.timeout, self._path.hello_timeout), None)
            entries = answer.get("instances") if isinstance(answer, dict) else None
            if not isinstance(entries, list) or not entries:
                # A daemon without instances (older than the map): it is the only one.
                if client.instance != "auto":
                    raise self._path.error(
                        ErrorCode.BAD_ARGS, f"the Luna Daemon at {client.host}:{client.port} has no "
                        f"instances (an older version): leave instance {client.instance!r} out")
                self._routes = _Routes([], None, {}, [])
                client._routed = None
                return self._routes
            entries = [e for e in entries if isinstance(e, dict)]
            self._routes = self._routes_for(client, entries, answer.get("instance"))
            self._drop_targets(set(self._routes.others))
            return self._routes

    def _drop_targets(self, keep: set[tuple[str, int]]) -> None:
        """Close the pooled clients of addresses the new map no longer has (an instance
        that restarted on another port): each holds up to a pool of sockets to a dead port.
        A call still running on one finishes; its connection is closed at check-in."""
        with self._lock:
            gone = [self.targets.pop(a) for a in [a for a in self.targets if a not in keep]]
        for target in gone:
            target.close()

    def _routes_for(self, client: RoutedClient, entries: list[dict], primary: Any) -> _Routes:
        """Where each role (None: ops without one) goes for the client's ``instance``."""
        if client.instance != "auto" and not any(e.get("name") == client.instance for e in entries):
            names = ", ".join(str(e.get("name")) for e in entries)
            raise self._path.error(ErrorCode.BAD_ARGS, f"no instance named {client.instance!r} at "
                                   f"{client.host}:{client.port}; configured: {names} (or 'auto')")

        def address(entry: dict | None) -> tuple[str, int] | None:
            if entry is None or entry.get("name") == primary:
                return None  # the primary (or nothing serves it: the primary says wrong_instance)
            port = entry.get("port")
            if type(port) is not int or not 0 < port <= 65535:
                return None
            return (_host_of(client, entry), port)

        to = {role: address(pick(entries, role, client.instance)) for role in (None, *set(ROLE_OF_OP.values()))}
        others = list(dict.fromkeys(a for a in map(address, entries) if a is not None))
        return _Routes(entries, primary, to, others)

    def _target(self, client: RoutedClient, addr: tuple[str, int]) -> RoutedClient:
        """The pooled client for another instance's address (made on first use)."""
        target = self.targets.get(addr)
        if target is not None:
            return target
        with self._lock:
            if self._closed:
                raise self._path.unavailable("client is closed")
            target = self.targets.get(addr)
            if target is None:
                target = self.targets[addr] = client._sibling(addr[0], addr[1], None)
        return target

    def instance_map(self, client: RoutedClient) -> list[dict]:
        """The primary's instance map (copies of its entries); [] for a daemon without instances."""
        routes = self._routes or self._fetch(client, None)
        return [dict(e) for e in routes.entries]

    def for_instance(self, client: RoutedClient, name: str) -> RoutedClient:
        """A new client pinned to the instance ``name``, given this router's map."""
        routes = self._routes or self._fetch(client, None)
        pinned = client._sibling(client.host, client.port, name)
        try:
            # The map is known: the new client needs no hello of its own (a daemon without
            # instances: its fetch raises the bad_args that explains why).
            router = pinned._router
            router._routes = (router._routes_for(pinned, routes.entries, routes.primary) if routes.entries
                              else router._fetch(pinned, None))
        except BaseException:
            pinned.close()
            raise
        return pinned

    def close(self) -> None:
        """Close every target; later ones are refused (``unavailable``: client is closed)."""
        with self._lock:
            self._closed = True
            targets, self.targets = list(self.targets.values()), {}
        for t in targets:
            t.close()


def _host_of(client: RoutedClient, entry: dict) -> str:
    """The host to reach the instance ``entry`` at. ``host`` is a host-level setting shared
    by every instance: a wildcard bind address (or a loopback one, when the client reached
    the primary through loopback too) is reached the way the primary was."""
    own = client.host
    host = entry.get("host")
    if not isinstance(host, str) or host in ("", "0.0.0.0", "::") or (is_loopback(host) and is_loopback(own)):
        return own
    return host
