"""What every ``luna-daemon`` command shares: the one output writer, the effective
settings, the exit codes, and reaching the daemon and its instances.

``_out`` is the CLI's only writer to stdout (the project keeps ``print`` to the CLI). Module-
level imports are the standard library only, so that importing this costs the light
commands nothing; the client, the settings and the instance map are imported per call.

Several instances (``[[instances]]``): :func:`_reach` connects to the primary, reads the
instance map from its ``hello`` and yields every instance (or the one ``--instance`` names),
a down one as a line with its reason, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

# Exit codes of every command (what each means: luna_daemon.cli, which re-exports them).
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
# ``serve`` stopped, but not cleanly: work was cut off at stop_timeout (the log names it).
# The tray's headless mode uses the same code (tray/app.py).
EXIT_UNCLEAN = 4
# Connect + first-answer deadline of every daemon command: a program on the port that
# accepts and never answers costs this, not the long client_timeout meant for model work.
HANDSHAKE_S = 3.0


def _out(text: str = "") -> None:
    """Write one line to stdout and flush (a progress line shows at once, even through a pipe)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _json(obj: Any) -> None:
    _out(json.dumps(obj, indent=2, default=str))


def _settings(args: argparse.Namespace, *, tolerant: bool = False):
    """The effective settings. ``tolerant`` (``status``, ``ps``, ``stop``, ``logs``, ``serve``):
    a bad value keeps its default and each problem is printed as one warning
    line on stderr (stdout stays parseable: ``logs --path``, ``--json``); otherwise a bad
    config file is an error (exit 2)."""
    from luna_daemon.settings import Settings

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "monitor_port", "lock_port", "log_level")}
    s = Settings.load(getattr(args, "config", None), overrides=overrides, tolerant=tolerant)
    for problem in s.problems:
        sys.stderr.write(f"luna-daemon: warning: {problem} (using the default; fix the file, "
                         "'luna-daemon doctor' checks it)\n")
    sys.stderr.flush()
    return s


class UsageError(Exception):
    """A command line that cannot work (an unknown ``--instance``): printed, exit 2."""


class _Reach(NamedTuple):
    """One instance as a daemon command sees it: its entry in the host's instance map
    (``name``, ``service``, ``host``, ``port``, ``primary``, ``state``), and a client bound
    to it that has answered ``hello``, or None and why not (``down``)."""

    entry: dict
    client: Any
    down: str


def _connect(args: argparse.Namespace, *, tolerant: bool = False):
    """(client, hello): a client of the primary instance whose peer has answered ``hello``
    within HANDSHAKE_S (else DaemonUnavailable / NotLunaDaemon, naming the port's holder).
    Its calls then wait ``--timeout`` or ``client_timeout``. With ``[[instances]]`` the
    primary is the first table (it may set its own port)."""
    from luna_daemon.client import DaemonClient
    from luna_daemon.instances import instance_specs

    kw = {"timeout": args.timeout} if getattr(args, "timeout", None) else {}
    primary = instance_specs(_settings(args, tolerant=tolerant))[0].settings
    c = DaemonClient.from_settings(primary, connect_timeout=HANDSHAKE_S, **kw)
    try:
        return c, c.verify(HANDSHAKE_S)
    except BaseException:
        c.close()
        raise


def _entries(c: Any, hello: dict) -> list[dict]:
    """The running host's instances, primary first, from the primary's ``hello``; a daemon
    without a map (older than multi-instance) is one entry: the address we reached."""
    entries = [dict(e) for e in hello.get("instances") or () if isinstance(e, dict) and e.get("name")]
    if not entries:
        entries = [{"name": hello.get("instance") or "main", "service": hello.get("service"), "host": c.host,
                    "port": c.port, "primary": True, "state": None}]
    return entries


def _down_reason(entry: dict, exc: Exception) -> str:
    """Why an instance did not answer: its state and reason as the host reported it, else
    what connecting said."""
    state, reason = entry.get("state"), entry.get("detail") or entry.get("exit_reason")
    if state in (None, "running"):
        return f"not answering: {exc}"  # the host thinks it runs: the connect error is the news
    return f"{state}: {reason}" if reason else f"{state} ({exc})"


@contextlib.contextmanager
def _reach(args: argparse.Namespace, *, tolerant: bool = False) -> Iterator[list[_Reach]]:
    """The instances a daemon command acts on: the one ``--instance`` names, else every
    instance of the running host (primary first). The primary must answer (else the
    command fails as before: exit 3, naming the port's holder); another that does not
    comes back with ``client`` None and the reason, so a down child is a line, never a
    traceback. An unknown ``--instance`` raises UsageError naming the configured ones."""
    from luna_daemon.client import DaemonError, DaemonUnavailable

    c, hello = _connect(args, tolerant=tolerant)
    subs: list[Any] = []
    try:
        entries = _entries(c, hello)
        wanted = getattr(args, "instance", None)
        if wanted:
            names = [e["name"] for e in entries]
            if wanted not in names:
                raise UsageError(f"no instance named {wanted!r}; configured: {', '.join(names)}")
        if len(entries) == 1:
            yield [_Reach(entries[0], c, "")]  # the only instance: the client we have reaches only it
            return
        if wanted:
            entries = [e for e in entries if e["name"] == wanted]
        out = []
        for e in entries:
            try:
                # Bound to that instance: its ops are never routed elsewhere (``load vae
                # --instance clip`` must get clip's wrong_instance answer, not the VAE's).
                sub = c.for_instance(e["name"])
                subs.append(sub)
                # Routed to the instance (verify() would ask the primary's address again).
                sub.call("hello", timeout=HANDSHAKE_S)
            except (DaemonUnavailable, DaemonError) as exc:
                if e.get("primary"):
                    raise  # it answered a moment ago: whatever this is, report it as always
                out.append(_Reach(e, None, _down_reason(e, exc)))
            else:
                out.append(_Reach(e, sub, ""))
        yield out
    finally:
        for sub in subs:
            sub.close()
        c.close()


def _answers(reach: list[_Reach], call: Callable[[Any], Any]) -> list[tuple[_Reach, Any]]:
    """``call(client)`` on every instance that answered; (reach, result or None). A further
    instance that fails meanwhile becomes down with the reason; the primary's errors (and
    the only instance's) propagate as they always did."""
    from luna_daemon.client import DaemonError, DaemonUnavailable

    out = []
    for r in reach:
        if r.client is None:
            out.append((r, None))
            continue
        try:
            out.append((r, call(r.client)))
        except (DaemonUnavailable, DaemonError) as exc:
            if len(reach) == 1 or r.entry.get("primary"):
                raise
            out.append((r._replace(client=None, down=_down_reason(r.entry, exc)), None))
    return out


def _down_lines(answers: list[tuple[_Reach, Any]], stream: Any = None) -> None:
    """One line per instance that did not answer (on stderr under --json: stdout stays JSON)."""
    for r, result in answers:
        if result is None:
            line = f"[{r.entry['name']}] down  {r.entry.get('host')}:{r.entry.get('port')} — {r.down}"
            if stream is None:
                _out(line)
            else:
                stream.write(line + "\n")
