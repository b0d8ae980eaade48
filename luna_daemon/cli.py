"""``luna-daemon`` command line (thin over the client, the settings and the host).

Output for people goes to stdout; ``--json`` on read commands prints machine-readable JSON.
Exit codes: 0 ok, 1 failure (daemon error / already running / doctor found a problem),
2 usage or a bad config file (``status``, ``ps``, ``stop`` and ``logs`` warn on stderr and go
on; ``serve`` keeps its dashboard up and exits 2 only if it ends before the file is fixed),
3 daemon unreachable (nothing listens, or the port's holder is not a Luna daemon),
4 ``serve`` stopped uncleanly (work was cut off at ``stop_timeout``).

Start-up cost: this module imports only the standard library at module level, and each
command imports what it needs when it runs. The light commands (``--version``, ``--help``,
``status``, ``ps``, ``stop``, ``unload``, ``load``, ``logs``, ``config``, ``dashboard``,
``doctor --no-devices``, ``service``) never import torch (tests/test_cli.py and
tests/test_packaging.py check ``sys.modules``); ``serve``,
``tray``, ``demo``, ``bench`` and doctor's device check do.

Several instances (``[[instances]]``): ``status``, ``ps``, ``unload``, ``load`` and ``stop``
connect to the primary, read the instance map from its ``hello`` and act on every instance
(``load``: the one that serves the kind) or on ``--instance NAME`` (see :func:`_reach`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from luna_daemon import __version__
from luna_daemon.models import sharing
from luna_daemon.units import fmt_bytes, fmt_duration

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
# ``serve`` stopped, but not cleanly: work was cut off at stop_timeout (the log names it).
# The tray's headless mode uses the same code (tray/app.py).
EXIT_UNCLEAN = 4
# Connect + first-answer deadline of every daemon command: a program on the port that
# accepts and never answers costs this, not the long client_timeout meant for model work.
HANDSHAKE_S = 3.0


def _out(text: str = "") -> None:
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


def _label(entry: dict) -> str:
    """``clip (service clip, 127.0.0.1:19283, primary)``."""
    extra = ", primary" if entry.get("primary") else ""
    return f"{entry['name']} (service {entry.get('service')}, {entry.get('host')}:{entry.get('port')}{extra})"


def _setting_text(key: str, value: Any) -> str:
    """A setting as people read it: sizes and durations through luna_daemon.units."""
    from luna_daemon.settings import value_kind

    kind = value_kind(key)
    if kind == "duration" and isinstance(value, (int, float)):
        return fmt_duration(value)
    if kind == "size" and isinstance(value, int):
        return fmt_bytes(value)
    if kind == "size_map" and isinstance(value, dict):
        return ", ".join(f"{dev}={fmt_bytes(n)}" for dev, n in value.items()) or "none"
    return json.dumps(value, default=str)


# ----------------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon (and the monitor) in the foreground until Ctrl-C / SIGTERM / stop."""
    from luna_daemon.daemon import DaemonStartError
    from luna_daemon.host import AlreadyRunning, Host

    from luna_daemon.settings import problems_text

    if getattr(args, "instance", None):
        return _serve_instance(args)
    settings = _settings(args, tolerant=True)  # the host reports a bad file and keeps the daemon stopped
    # A bad LUNA_* variable or flag cannot be fixed by editing the file the host watches:
    # waiting for that would only hang whoever started us (a launcher, a service manager).
    fixed_outside = [p for p in settings.problems if not p.file]
    if fixed_outside:
        _out(f"invalid setting: {problems_text(fixed_outside)} (set in the environment or on the command line)")
        return EXIT_USAGE
    host = Host(settings)
    try:
        host.acquire()
    except AlreadyRunning as exc:
        _out(str(exc))  # Luna (pid) or the foreign program holding lock_port
        return EXIT_FAIL
    if not args.no_monitor:
        host.start_monitor()
        if host.monitor is not None:
            # A headless host has no tray menu to open a logged-in dashboard from.
            log.info("dashboard login link (to start, stop, unload, change settings): run `luna-daemon dashboard`")
    try:
        clean = host.serve()
    except DaemonStartError as exc:
        _out(f"Luna Daemon failed to start: {exc}")
        host.close(2.0)
        return EXIT_FAIL
    if host.start_refused:
        code = EXIT_USAGE  # the daemon never ran: the config file was broken until the end
    else:
        code = EXIT_OK if clean else EXIT_UNCLEAN
    return host.end_process(code)


def _serve_instance(args: argparse.Namespace) -> int:
    """``serve --instance NAME``: one instance as a child host (host.InstanceHost). It
    does not wait for a file fix at start (its watcher only applies edits once it
    serves): any settings problem exits 2."""
    from luna_daemon.daemon import DaemonStartError
    from luna_daemon.host import InstanceHost
    from luna_daemon.settings import Settings, SettingsError, problems_text

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "monitor_port", "lock_port", "log_level")}
    try:
        overrides.update(json.loads(args.instance_overrides) if args.instance_overrides else {})
        settings = Settings.load(getattr(args, "config", None), overrides=overrides, tolerant=True)
        if settings.problems:
            _out(f"invalid setting: {problems_text(settings.problems)}")
            return EXIT_USAGE
        host = InstanceHost(settings, args.instance, supervised_by=args.supervised_by)
    except (SettingsError, ValueError) as exc:  # no such instance / unreadable overrides
        _out(f"Luna Daemon instance {args.instance!r}: {exc}")
        return EXIT_USAGE
    try:
        clean = host.serve()
    except DaemonStartError as exc:
        _out(f"Luna Daemon instance {args.instance!r} failed to start: {exc}")
        return EXIT_FAIL
    return host.end_process(EXIT_OK if clean else EXIT_UNCLEAN)


def cmd_tray(args: argparse.Namespace) -> int:
    try:
        from luna_daemon.tray.app import main as tray_main
    except ImportError as exc:
        _out(f"the tray app is not available ({exc}); running headless")
        args.no_monitor = False
        return cmd_serve(args)
    return tray_main(config=getattr(args, "config", None))


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


def _status_lines(st: dict, indent: str = "  ") -> list[str]:
    req = st.get("requests", {})
    lines = [f"{indent}uptime {fmt_duration(st.get('uptime', 0))} · clients {st.get('clients')} · models {st.get('models')} · queue {st.get('queue')}",
             f"{indent}requests {req.get('total', 0)} ({req.get('errors', 0)} failed, {req.get('per_minute', 0)}/min)"]
    if isinstance(st.get("sharing"), dict):
        lines.append(f"{indent}{sharing.summary(st['sharing'])}")
    if st.get("config_error"):
        lines.append(f"{indent}config file not applied: {st['config_error']}")
    if st.get("restart_needed"):
        lines.append(f"{indent}restart needed for: {', '.join(st['restart_needed'])} (edited in {st.get('config_file')})")
    for dev, m in (st.get("devices") or {}).items():
        lines.append(f"{indent}{dev}: models {fmt_bytes(m.get('models_bytes'))}, used {fmt_bytes(m.get('used'))} of {fmt_bytes(m.get('total'))}")
    hp = st.get("huge_pages")
    if isinstance(hp, dict):
        lines.append(f"{indent}huge pages: {'on' if hp.get('active') else 'off'} ({hp.get('reason')})")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    with _reach(args, tolerant=True) as reach:
        answers = _answers(reach, lambda c: c.status())
    if len(answers) == 1 and answers[0][1] is not None:  # one instance (or --instance): as always
        r, st = answers[0]
        if args.json:
            _json({**st, "instance": r.entry["name"]})
            return EXIT_OK
        _out(f"Luna Daemon {st.get('version')} — {st.get('state')}  engine={st.get('engine')}  service={st.get('service')}"
             + (f"  instance={r.entry['name']}" if args.instance else ""))
        for line in _status_lines(st):
            _out(line)
        _roots(st.get("roots"))
        return EXIT_OK
    blocks = [{**r.entry, "state": st.get("state"), "status": st} if st is not None
              else {**r.entry, "state": r.entry.get("state") or "down", "down": r.down} for r, st in answers]
    primary = next((st for r, st in answers if st is not None and r.entry.get("primary")), None)
    if args.json:
        # The primary's answer stays at the top (scripts written for one daemon keep working).
        _json({**(primary or {}), "instances": blocks,
               "sharing_total": sharing.combine(st.get("sharing") for _r, st in answers if st is not None)})
        return EXIT_OK
    if primary is not None:
        _out(f"Luna Daemon {primary.get('version')} — {len(blocks)} instances")
        # Host total: a ComfyUI using two instances counts once (docs/monitor.md "Memory saved").
        _out(f"  {sharing.summary(sharing.combine(st.get('sharing') for _r, st in answers if st is not None))}")
    for b in blocks:
        where = f"{b.get('host')}:{b.get('port')}"
        if "down" in b:
            _out(f"[{b['name']}] down  {where}  service={b.get('service')} — {b['down']}")
            continue
        st = b["status"]
        _out(f"[{b['name']}] {st.get('state')}  {where}  engine={st.get('engine')}  service={st.get('service')}"
             + ("  (primary)" if b.get("primary") else ""))
        for line in _status_lines(st):
            _out(line)
    _roots((primary or {}).get("roots"))
    return EXIT_OK if primary is not None or any("down" not in b for b in blocks) else EXIT_UNAVAILABLE


def _roots(roots: Any) -> None:
    """The model roots with where each came from (settings, or the ComfyUI that registered it)."""
    if roots:
        _out("model roots:")
    for r in roots or ():
        kinds = f" [{', '.join(r['kinds'])}]" if r.get("kinds") else ""
        _out(f"  {r['path']}  ({r['source']}){kinds}")


def _models_table(models: list[dict]) -> None:
    _out(f"{'ID':<18} {'KIND':<5} {'DEVICE':<7} {'DTYPE':<5} {'SIZE':>10} {'USERS':>5}  {'EXPIRES':<14} FILE")
    for m in models:
        exp = "never" if m["expires_at"] is None else f"in {fmt_duration(max(0, m['expires_at'] - time.time()))}"
        _out(f"{m['id']:<18} {m['kind']:<5} {m['device']:<7} {m['dtype']:<5} {fmt_bytes(m['bytes']):>10} {m['users']:>5}  {exp:<14} {m['paths'][0]}")


def _down_lines(answers: list[tuple[_Reach, Any]], stream: Any = None) -> None:
    """One line per instance that did not answer (on stderr under --json: stdout stays JSON)."""
    for r, result in answers:
        if result is None:
            line = f"[{r.entry['name']}] down  {r.entry.get('host')}:{r.entry.get('port')} — {r.down}"
            if stream is None:
                _out(line)
            else:
                stream.write(line + "\n")


def cmd_ps(args: argparse.Namespace) -> int:
    with _reach(args, tolerant=True) as reach:
        answers = _answers(reach, lambda c: c.call("ps"))
    models = [{**m, "instance": r.entry["name"]} for r, a in answers if a is not None for m in a["models"]]
    roots = next((a.get("roots") for r, a in answers if a is not None), None)
    if args.json:
        _down_lines(answers, sys.stderr)
        _json(models)
    elif len(answers) == 1:
        _down_lines(answers)
        if answers[0][1] is not None:
            if models:
                _models_table(models)
            else:
                _out("no models loaded")
    else:
        for r, a in answers:
            if a is None:
                _down_lines([(r, a)])
                continue
            mine = [m for m in models if m["instance"] == r.entry["name"]]
            _out(f"[{r.entry['name']}] {r.entry.get('host')}:{r.entry.get('port')}  service={r.entry.get('service')}"
                 + ("" if mine else ": no models loaded"))
            if mine:
                _models_table(mine)
    if not args.json:
        _roots(roots)
    return EXIT_OK if any(a is not None for _r, a in answers) else EXIT_UNAVAILABLE


def cmd_unload(args: argparse.Namespace) -> int:
    """Unload on the instance ``--instance`` names, else on every instance (a model id is
    looked for on each; not found anywhere is the daemon's ``not_found``)."""
    from luna_daemon.client import DaemonError

    if not args.model and not args.all:
        _out("give a model id (see 'luna-daemon ps') or --all")
        return EXIT_USAGE
    not_found: list[DaemonError] = []

    def unload(c: Any) -> list[dict]:
        try:
            return c.unload(args.model, all=args.all)
        except DaemonError as exc:
            if exc.code != "not_found" or args.instance:
                raise
            not_found.append(exc)  # another instance may hold it
            return []

    with _reach(args) as reach:
        answers = _answers(reach, unload)
    done = [{**d, "instance": r.entry["name"]} for r, a in answers if a for d in a]
    if not done and not_found:
        raise not_found[0]
    if args.json:
        _down_lines(answers, sys.stderr)
        _json(done)
    else:
        _down_lines(answers)
        where = f" on {len(answers)} instances" if len(answers) > 1 else ""
        _out(f"unloaded {len(done)} model(s){where}" + "".join(
            f"\n  {d['id']} {d['paths'][0]}" + (f"  ({d['instance']})" if len(answers) > 1 else "") for d in done))
    return EXIT_OK if any(a is not None for _r, a in answers) else EXIT_UNAVAILABLE


def cmd_load(args: argparse.Namespace) -> int:
    """Load a model now (``luna-daemon load vae|clip PATH...``), e.g. before ComfyUI starts:
    on the instance ``--instance`` names, else on one that serves that kind (as the client
    routes: a dedicated running instance before a full one)."""
    from luna_daemon.instances import pick, serves

    if args.kind == "vae" and (len(args.paths) != 1 or args.clip_type):
        _out("a VAE is one file or folder, without --type (that is for clip)")
        return EXIT_USAGE
    # The daemon runs elsewhere (its own working directory) and resolves a relative path
    # against its model_roots: a path that exists from here is sent absolute, anything
    # else as given ("vae/sdxl_vae.safetensors" under a model root).
    paths = [os.path.abspath(p) if os.path.exists(p) else p for p in map(os.path.expanduser, args.paths)]
    opts = {"device": args.device, "dtype": args.dtype, "keep_alive": args.keep_alive}
    with _reach(args) as reach:
        up = [r for r in reach if r.client is not None]
        chosen = pick([r.entry for r in up], args.kind, args.instance or "auto")
        if chosen is None:
            down = [r for r in reach if r.client is None and (args.instance or serves(str(r.entry.get("service")), args.kind))]
            if down:
                _down_lines([(r, None) for r in down])
                return EXIT_UNAVAILABLE
            _out(f"no instance serves {args.kind} models; configured: {', '.join(_label(r.entry) for r in reach)}"
                 f" (add service = \"{args.kind}\" or \"full\" to an [[instances]] table)")
            return EXIT_FAIL
        target = next(r for r in up if r.entry is chosen)
        if args.kind == "vae":
            done = target.client.vae_load(paths[0], **opts)
        else:
            done = target.client.clip_load(paths, args.clip_type or "sd1", **opts)
    # A CLIP answer carries its state-dict key list (for LoRA mapping): not for people or scripts here.
    done.get("info", {}).pop("state_dict", None)
    done["instance"] = chosen["name"]
    if args.json:
        _json(done)
        return EXIT_OK
    ka = done.get("keep_alive")
    stays = "until unloaded" if ka is None or ka < 0 else f"keep_alive {fmt_duration(ka)}"
    on = f" (instance {chosen['name']})" if len(reach) > 1 or args.instance else ""
    _out(f"loaded {done['model']}  {done['kind']} on {done['device']} ({done['dtype']}), {fmt_bytes(done.get('bytes'))}, {stays}{on}")
    for path in done.get("paths", []):
        _out(f"  {path}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from luna_daemon.doctor import FAIL, WARN, run_checks

    settings, error = _settings_or_none(args)
    findings = run_checks(settings, error, devices=not args.no_devices, config_file=getattr(args, "config", None))
    if args.json:
        _json([f._asdict() for f in findings])
    else:
        for f in findings:
            _out(f"[{f.status:<4}] {f.check}: {f.finding}")
            if f.fix:
                _out(f"       fix: {f.fix}")
        bad, warns = (sum(f.status == st for f in findings) for st in (FAIL, WARN))
        _out(f"{bad} problem(s), {warns} warning(s)")
    return EXIT_FAIL if any(f.status == FAIL for f in findings) else EXIT_OK


def _settings_or_none(args: argparse.Namespace):
    """(settings, None) or (None, the SettingsError): doctor reports a bad config as a finding."""
    from luna_daemon.settings import SettingsError

    try:
        return _settings(args), None
    except SettingsError as exc:
        return None, exc


# Pages of the dashboard (web/common.py PAGES; not imported: it would load the web face).
DASHBOARD_PAGES = ("status", "models", "logs", "settings")


def can_open_browser(env: Any = None, platform: str | None = None) -> bool:
    """Whether a browser window can appear: always on Windows / macOS, elsewhere only with
    DISPLAY or WAYLAND_DISPLAY (over SSH a text browser would take over the terminal)."""
    env = os.environ if env is None else env
    platform = platform or sys.platform
    return platform in ("win32", "darwin") or bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def cmd_dashboard(args: argparse.Namespace) -> int:
    """A one-time dashboard login link from the running host (lock port, proven by the
    token); opened in a browser when one can be opened."""
    from luna_daemon.instance import LoginRefused, NotLunaHost, request_login
    from luna_daemon.settings import read_token

    s = _settings(args)
    token = read_token(s)
    if not token:
        _out(f"no token at {s.token_path}: the daemon has never run with this config; start it with `luna-daemon serve`")
        return EXIT_UNAVAILABLE
    try:
        url = request_login(s.host, s.lock_port, token, args.page)
    except ConnectionRefusedError:
        _out(f"Luna Daemon is not running (nothing on lock port {s.lock_port}); start it with `luna-daemon serve`")
        return EXIT_UNAVAILABLE
    except NotLunaHost as exc:
        _out(f"port {s.lock_port} (lock_port) is held by {exc.owner}, not Luna Daemon")
        return EXIT_UNAVAILABLE
    except LoginRefused as exc:
        _out({
            "token": f"the running Luna host refused this token ({s.token_path}): it was started with another "
                     "config dir (--config / LUNA_CONFIG_DIR); run this command with the same settings",
            "monitor": "the running Luna host serves no dashboard (started with --no-monitor, or monitor_port was "
                       "taken: see `luna-daemon logs`)",
            "page": f"unknown page {args.page!r}",
        }.get(exc.reason, "the running Luna host is too old to hand out login links; restart it after updating"))
        return EXIT_FAIL
    opened = False
    if not args.no_open and can_open_browser():
        import webbrowser

        try:
            opened = bool(webbrowser.open(url))
        except Exception:  # noqa: BLE001 - no usable browser: the printed link still works
            opened = False
    if args.json:
        _json({"url": url, "page": args.page, "opened": opened})
    else:
        _out(url)
        _out("opened in your browser" if opened else "open this link in a browser on this machine (valid once, for a "
             "short time); it logs the page in to start, stop, unload and change settings")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    """Without ``--instance``: stop the host's primary daemon, and so the ``serve`` host and
    every instance it supervises. With it: stop that instance only."""
    if not args.instance:
        c, hello = _connect(args, tolerant=True)
        with c:
            names = [e["name"] for e in _entries(c, hello)]
            c.shutdown()
        every = f" (instances {', '.join(names)})" if len(names) > 1 else ""
        _out(f"stop requested; the daemon{every} finishes in-flight requests, unloads models and stops")
        return EXIT_OK
    with _reach(args, tolerant=True) as reach:
        [r] = reach
        if r.client is None:
            _down_lines([(r, None)])
            return EXIT_UNAVAILABLE
        r.client.shutdown()
    _out(f"stop requested for instance {r.entry['name']}; it finishes in-flight requests, unloads models and stops")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    # Strict: ``config`` is how a file is checked; a bad one is exit 2 naming file, line, key.
    s = _settings(args)
    rows = {k: {"value": v, "source": s.sources.get(k, "default")} for k, v in s.public_dict().items()}
    if args.json:
        _json({"config_file": s.config_file, "settings": rows})
        return EXIT_OK
    _out(f"config file: {s.config_file}")
    width = max(len(k) for k in rows)
    for k, r in rows.items():
        _out(f"  {k:<{width}}  {_setting_text(k, r['value']):<40} ({r['source']})")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    s = _settings(args, tolerant=True)
    if args.path:
        _out(str(s.log_file))
        return EXIT_OK
    try:
        lines = s.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        _out(f"no log file yet at {s.log_file}")
        return EXIT_OK
    for line in lines[-args.lines:]:
        _out(line)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from luna_daemon import demo

    # Each step is shown as it happens (the first, importing torch, takes seconds): a live
    # display on a terminal when rich is installed, else one plain line per step event.
    if args.json:
        report = demo.run_demo()
    elif _isatty(sys.stdout) and _has_module("rich"):
        with demo.RichProgress() as progress:
            report = demo.run_demo(progress)
    else:
        report = demo.run_demo(demo.PlainProgress(_out))
    _report(args, report)
    return EXIT_OK if report["ok"] else EXIT_FAIL


def cmd_service(args: argparse.Namespace) -> int:
    """``service install|uninstall|status``: the systemd user unit / LaunchAgent that runs
    ``serve`` (luna_daemon.system_service). Exit 1 when it refuses or fails."""
    from luna_daemon import system_service

    try:
        if args.action == "install":
            res = system_service.install(config=getattr(args, "config", None), enable=args.enable)
        elif args.action == "uninstall":
            res = system_service.uninstall(disable=args.disable)
        else:
            res = system_service.status()
    except system_service.ServiceError as exc:
        _out(f"luna-daemon service {args.action}: {exc}")
        return EXIT_FAIL
    if args.json:
        _json(res.as_dict())
    else:
        for line in res.lines:
            _out(line)
    return EXIT_OK


def tray_entry() -> int:
    """The ``luna-daemon-tray`` gui-script (no console window on Windows): ``luna-daemon tray``."""
    return main(["tray", *sys.argv[1:]])


def cmd_bench(args: argparse.Namespace) -> int:
    from luna_daemon import bench

    # Each benchmark has its own default number of repeats (a tray launch takes
    # seconds, a loopback exchange milliseconds); --repeats overrides it.
    kw = {} if args.repeats is None else {"repeats": args.repeats}
    if args.reliability:
        from luna_daemon.reliability import run as reliability_suite  # docs/reliability.md

        report = reliability_suite(quick=args.quick, progress=None if args.json else _out)
        _report(args, report)
        return EXIT_OK if report["ok"] else EXIT_FAIL
    if args.memory:
        report = bench.memory_benchmark(model_mb=args.model_mb, clients=args.clients)
    elif args.startup:
        from luna_daemon.tray.bench import startup_benchmark  # tray launch, or headless serve -> ping

        report = startup_benchmark(**kw)
    elif args.cli:
        from luna_daemon.cli_bench import cli_benchmark

        report = cli_benchmark(**kw)
    elif args.instances:
        from luna_daemon.instances_bench import instances_benchmark

        report = instances_benchmark(quick=args.quick)
    elif args.proxy:
        from luna_daemon.comfy_nodes.bench import proxy_overhead_benchmark

        report = proxy_overhead_benchmark(**kw)
    else:
        report = bench.transport_benchmark(**kw)
    _report(args, report)
    return EXIT_OK


def _isatty(stream: Any) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _report(args: argparse.Namespace, report: dict) -> None:
    """A demo / benchmark report: the whole object with --json, else its lines."""
    if args.json:
        _json(report)
    else:
        for line in report.get("lines", []):
            _out(line)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="luna-daemon", description="Luna Daemon: shared VAE / CLIP / LoRA for ComfyUI instances.")
    p.add_argument("--version", action="version", version=f"luna-daemon {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default: the user config dir)")
    common.add_argument("--host", help="daemon host (default 127.0.0.1)")
    common.add_argument("--port", type=int, help="daemon port (default 19283)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--timeout", type=float, help="client timeout in seconds")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground (headless)")
    s.add_argument("--monitor-port", type=int, dest="monitor_port", help="dashboard port (default 19285)")
    s.add_argument("--lock-port", type=int, dest="lock_port", help="single-instance lock port (default 19299)")
    s.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    s.add_argument("--no-monitor", action="store_true", help="do not serve the dashboard")
    s.add_argument("--instance", metavar="NAME",
                   help="run only this [[instances]] entry, as a child of a host (no lock, no dashboard)")
    # Set by the supervising host (supervisor.child_command), not meant for people.
    s.add_argument("--supervised-by", type=int, dest="supervised_by", help=argparse.SUPPRESS)
    s.add_argument("--instance-overrides", dest="instance_overrides", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("tray", parents=[common], help="run the system-tray app")
    t.set_defaults(func=cmd_tray, no_monitor=False)

    # --instance NAME: one instance of a host running several ([[instances]] in config.toml).
    inst = argparse.ArgumentParser(add_help=False)
    inst.add_argument("--instance", metavar="NAME", help="only this instance (default: every instance; "
                      "load: one that serves the kind)")
    sub.add_parser("status", parents=[common, inst], help="daemon status (every instance)").set_defaults(func=cmd_status)
    sub.add_parser("ps", parents=[common, inst], help="list loaded models (every instance)").set_defaults(func=cmd_ps)
    u = sub.add_parser("unload", parents=[common, inst], help="unload a model or all (on every instance)")
    u.add_argument("model", nargs="?")
    u.add_argument("--all", action="store_true")
    u.set_defaults(func=cmd_unload)
    ld = sub.add_parser("load", parents=[common, inst], help="load a VAE or CLIP now (warm the daemon before ComfyUI starts)")
    ld.add_argument("kind", choices=("vae", "clip"))
    ld.add_argument("paths", nargs="+", metavar="PATH", help="one VAE; one or more CLIP text-encoder files")
    ld.add_argument("--type", dest="clip_type", help="CLIP type: sd1 (default), sdxl, flux, ...")
    ld.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default: vae_device / clip_device)")
    ld.add_argument("--dtype", help="auto, fp32, fp16, bf16 (default: vae_dtype / clip_dtype)")
    ld.add_argument("--keep-alive", dest="keep_alive", help="how long it stays loaded when idle: 30s, 5m, forever")
    ld.set_defaults(func=cmd_load)
    sub.add_parser("stop", parents=[common, inst], help="stop the daemon cleanly (the host and every instance; "
                   "--instance: that one)").set_defaults(func=cmd_stop)
    db = sub.add_parser("dashboard", parents=[common], help="print (and open) a one-time login link to the dashboard")
    db.add_argument("page", nargs="?", default="status", choices=DASHBOARD_PAGES)
    db.add_argument("--no-open", action="store_true", help="only print the link, never start a browser")
    db.add_argument("--lock-port", type=int, dest="lock_port", help="the running host's lock port (default 19299)")
    db.set_defaults(func=cmd_dashboard)
    c = sub.add_parser("config", parents=[common], help="show the effective settings and where each comes from")
    c.add_argument("--show", action="store_true", help="(default) print every setting with its source")
    c.set_defaults(func=cmd_config)
    lg = sub.add_parser("logs", parents=[common], help="print the end of the log file")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--path", action="store_true", help="print the log file's path only")
    lg.set_defaults(func=cmd_logs)
    dr = sub.add_parser("doctor", parents=[common], help="check config, ports, lock, token, ComfyUI, engine, devices, model roots")
    dr.add_argument("--no-devices", action="store_true", help="skip the device check (the only one that imports torch)")
    dr.set_defaults(func=cmd_doctor)
    sub.add_parser("demo", parents=[common], help="offline proof: tiny models, a daemon, encode/decode").set_defaults(func=cmd_demo)
    sv = sub.add_parser("service", parents=[common], help="run `serve` at login under systemd (user unit) or "
                        "launchd (LaunchAgent): install, uninstall, status")
    sv.add_argument("action", choices=("install", "uninstall", "status"))
    sv.add_argument("--enable", action="store_true", help="install: also run `systemctl --user enable --now "
                    "luna-daemon` (launchctl bootstrap on macOS)")
    sv.add_argument("--disable", action="store_true", help="uninstall: stop and disable it first")
    sv.set_defaults(func=cmd_service)
    b = sub.add_parser("bench", parents=[common], help="benchmarks (transport by default)")
    b.add_argument("--memory", action="store_true", help="memory sharing benchmark")
    b.add_argument("--startup", action="store_true", help="tray launch -> green")
    b.add_argument("--cli", action="store_true", help="CLI response times (--version, --help, status, ps, config) as subprocesses")
    b.add_argument("--proxy", action="store_true", help="ComfyUI proxy per-call overhead vs in-process (needs ComfyUI: comfyui_root / COMFYUI_PATH)")
    b.add_argument("--reliability", action="store_true", help="hostile-client suite: fuzz, floods, stop under load, killed clients, odd files, dashboard; exit 1 if anything failed")
    b.add_argument("--instances", action="store_true", help="two clients (VAE decodes + CLIP encodes) at once: one full "
                   "daemon vs a VAE and a CLIP instance, both engines")
    b.add_argument("--quick", action="store_true", help="with --reliability: small counts (what CI runs); with "
                   "--instances: 1 s per measurement")
    b.add_argument("--repeats", type=int, default=None, help="samples per measurement (default: per benchmark)")
    b.add_argument("--model-mb", type=int, default=320, dest="model_mb")
    b.add_argument("--clients", type=int, default=3)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.command not in ("serve", "tray"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        return code


def _exit_code(exc: Exception) -> int | None:
    """Print a known failure and return its exit code; None for anything else."""
    from luna_daemon.settings import SettingsError

    if isinstance(exc, SettingsError):
        _out(f"invalid setting: {exc}")
        return EXIT_USAGE
    if isinstance(exc, UsageError):
        _out(str(exc))
        return EXIT_USAGE
    # Looked up, not imported: a client error can only come from a client that a command
    # imported, and importing it up front would slow every command down.
    client = sys.modules.get("luna_daemon.client")
    if client is not None and isinstance(exc, client.DaemonUnavailable):
        _out(str(exc))
        return EXIT_UNAVAILABLE
    if client is not None and isinstance(exc, client.DaemonError):
        _out(f"daemon error ({exc.code}): {exc.message}")
        return EXIT_FAIL
    return None


if __name__ == "__main__":
    sys.exit(main())
