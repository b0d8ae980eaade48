"""Who may talk to the monitor, and who may change things.

Three independent checks, all pure (no sockets), all thread-safe:

* **Host header** (DNS rebinding): a request is served only when its ``Host`` names this
  server by loopback address or ``localhost`` with the monitor's real port (plus the hosts
  of ``allowed_origins``). A rebinding page at ``http://evil.example:19285`` sends
  ``Host: evil.example:19285`` and gets 403.
* **Origin** (cross-site WebSocket hijacking): a browser always sends ``Origin`` on a
  WebSocket handshake; only this server's own origins and ``allowed_origins`` pass. No
  ``Origin`` at all means a non-browser client (scripts, tests) -- those cannot be
  steered by a web page, and they still need the token to change anything.
* **Authority to change state**: the per-install token. The browser never sees it. The
  tray mints a one-time, short-lived *login secret* (:meth:`Gate.mint_login`) and puts it
  in the URL fragment (never sent to any server, never in a Referer). The page redeems it
  over the origin-checked WebSocket for a *session* id (:meth:`Gate.redeem_login`), kept
  in the tab's ``sessionStorage`` so a reload stays logged in. Plain HTTP endpoints that
  need a session (the logs) take it in the ``X-Luna-Session`` header, or the token as
  ``Authorization: Bearer <token>`` (:meth:`Gate.http_authorized`).
"""

from __future__ import annotations

import collections
import hmac
import re
import secrets
import threading
import time
from typing import Any, Iterable
from urllib.parse import urlsplit

LOGIN_TTL = 120.0        # seconds a login link stays valid (the browser may start slowly)
SESSION_TTL = 12 * 3600.0  # sliding: every use extends it
MAX_LOGINS = 16           # outstanding login secrets; the oldest is dropped beyond this
MAX_SESSIONS = 64

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")
SESSION_HEADER = "X-Luna-Session"

# What a Host header (RFC 9110: host [":" port]) and a serialised Origin (RFC 6454:
# scheme "://" host [":" port], or "null") look like. Anything else -- a list, userinfo,
# spaces, a broken IPv6 literal -- is a malformed request (400), not merely a foreign one.
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{1,5})?"
_HOST_RE = re.compile(_HOST)
_ORIGIN_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://" + _HOST + "/?")


def well_formed_host(value: str) -> bool:
    """True when ``value`` has the shape of a Host header (not whether it is ours)."""
    return _HOST_RE.fullmatch(value.strip()) is not None


def well_formed_origin(value: str) -> bool:
    """True when ``value`` has the shape of an Origin header (``null`` included)."""
    v = value.strip()
    return v == "null" or _ORIGIN_RE.fullmatch(v) is not None


def _norm_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class Gate:
    """Host/Origin allow-lists, login secrets and sessions for one monitor port."""

    def __init__(self, bind_host: str, port: int, allowed_origins: Iterable[str] = (), *,
                 login_ttl: float = LOGIN_TTL, session_ttl: float = SESSION_TTL):
        self.port = port
        self.login_ttl = login_ttl
        self.session_ttl = session_ttl
        names = list(_LOOPBACK_NAMES)
        if bind_host.lower() not in _WILDCARDS and bind_host.lower() not in names:
            names.append(bind_host.lower())
        self.hosts = {f"{n}:{port}" for n in names}
        self.origins = {f"http://{h}" for h in self.hosts}
        for origin in allowed_origins:
            o = _norm_origin(origin)
            if not o:
                continue
            self.origins.add(o)
            netloc = urlsplit(o).netloc
            if netloc:
                # A configured origin is also a configured name for this server (e.g. a
                # reverse proxy or a hosts-file alias), so its Host must pass too.
                self.hosts.add(netloc)
        self._lock = threading.Lock()
        self._logins: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._sessions: collections.OrderedDict[str, float] = collections.OrderedDict()

    # ------------------------------------------------------------ request checks
    def host_allowed(self, host_header: str | None) -> bool:
        """True when ``Host`` names this server (loopback/localhost + real port)."""
        return bool(host_header) and host_header.strip().lower() in self.hosts

    def origin_allowed(self, origin: str | None) -> bool:
        """True for no Origin (non-browser client) or one of this server's origins."""
        if origin is None:
            return True
        return _norm_origin(origin) in self.origins

    # ------------------------------------------------------------ login secrets
    def mint_login(self) -> str:
        """A new one-time login secret, valid for ``login_ttl`` seconds."""
        secret = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._purge(now)
            self._logins[secret] = now + self.login_ttl
            while len(self._logins) > MAX_LOGINS:
                self._logins.popitem(last=False)
        return secret

    def redeem_login(self, secret: object) -> str | None:
        """Consume a login secret; returns a new session id, or None if the secret is
        unknown, expired or already used."""
        if not isinstance(secret, str) or not secret:
            return None
        now = time.monotonic()
        with self._lock:
            self._purge(now)
            match = _find(self._logins, secret)
            if match is None:
                return None
            del self._logins[match]
            return self._new_session(now)

    # ------------------------------------------------------------ sessions
    def _new_session(self, now: float) -> str:
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = now + self.session_ttl
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sid

    def session_for_token(self) -> str:
        """A session for a caller that already proved it holds the token."""
        with self._lock:
            return self._new_session(time.monotonic())

    def check_session(self, sid: object) -> bool:
        """True if ``sid`` is a live session (and extends it)."""
        if not isinstance(sid, str) or not sid:
            return False
        now = time.monotonic()
        with self._lock:
            self._purge(now)
            match = _find(self._sessions, sid)
            if match is None:
                return False
            self._sessions[match] = now + self.session_ttl
            self._sessions.move_to_end(match)
            return True

    def http_authorized(self, session: str | None, authorization: str | None, token: str) -> bool:
        """True when a plain HTTP request carries a live session (``X-Luna-Session``) or
        the per-install token (``Authorization: Bearer <token>``)."""
        if session is not None and self.check_session(session.strip()):
            return True
        if authorization:
            scheme, _, credential = authorization.strip().partition(" ")
            return scheme.lower() == "bearer" and token_matches(credential.strip(), token)
        return False

    def revoke_all(self) -> None:
        with self._lock:
            self._logins.clear()
            self._sessions.clear()

    def _purge(self, now: float) -> None:
        for table in (self._logins, self._sessions):
            for key in [k for k, exp in table.items() if exp <= now]:
                del table[key]


def token_matches(given: object, token: str) -> bool:
    """Constant-time check of a presented per-install token."""
    return isinstance(given, str) and bool(given) and bool(token) and hmac.compare_digest(given.encode(), token.encode())


def _find(table: Any, value: str) -> str | None:
    """The key of ``table`` equal to ``value``, compared in constant time (a handful of keys)."""
    return next((k for k in table if hmac.compare_digest(k.encode(), value.encode())), None)
