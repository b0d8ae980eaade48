"""The ``luna-daemon`` commands that talk to the running daemon on its port: ``status``,
``ps``, ``unload``, ``load`` and ``stop``.

Each acts on every instance of the running host, or on the one ``--instance`` names
(:func:`luna_daemon.cli_common._reach`); an instance that does not answer is one line with
its reason. Module-level imports stay light (no torch): the client is imported per call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from luna_daemon.cli_common import (EXIT_FAIL, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, _answers, _connect,
                                    _down_lines, _entries, _json, _out, _reach)
from luna_daemon.models import sharing
from luna_daemon.units import fmt_bytes, fmt_duration


def _label(entry: dict) -> str:
    """``clip (service clip, 127.0.0.1:19283, primary)``."""
    extra = ", primary" if entry.get("primary") else ""
    return f"{entry['name']} (service {entry.get('service')}, {entry.get('host')}:{entry.get('port')}{extra})"


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
