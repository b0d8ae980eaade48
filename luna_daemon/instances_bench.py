"""``luna-daemon bench --instances``: two clients at once, one daemon vs a VAE + a CLIP instance.

Two client processes start together: one does tiny VAE decodes (a 32x32 latent -> 256x256
image), the other tiny CLIP encodes, for ``seconds`` each, through the ordinary
:class:`~luna_daemon.client.DaemonClient` (``instance="auto"``: it routes by op). They run
against

* (a) one full daemon (one ``serve`` process, today's layout), and
* (b) one ``serve`` host with two ``[[instances]]`` tables, ``service = "clip"`` (the
  primary, in the host process) and ``service = "vae"`` (a child process), in a temp
  ``LUNA_HOME`` -- the clients still connect to the one primary port.

Throughput is normalised per op, because a decode costs ~70x an encode: each client's rate
is divided by its *solo* rate (that client alone against (a)), and the aggregate of a
layout is the sum of the two, so 2.0 means both ran as fast as alone and 1.0 means they
took turns. The ratio (b)/(a) of the aggregates is the gain of the split. Both layouts run
side by side and take turns round by round (medians of ``rounds``), so a load that drifts
weighs on both alike. With the comfy
engine every call of a process holds one lock (ComfyUI's model management is
process-global), so in (a) the encodes wait behind each decode; the standalone engine runs
each model on its own executor thread, so (a) overlaps there, within one process's GIL.

Both engines are measured where available: standalone (diffusers / transformers) and comfy
(ComfyUI's code at ``comfyui_root`` / ``COMFYUI_PATH``, else the fake ComfyUI of
``tests/fake_comfy``, as ``bench --proxy`` does). Every temp folder, daemon and client
process is removed / ended on the way out, also on an error or Ctrl-C. No figure is
checked against a target here: the numbers depend on the machine (README "Benchmarks").
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from luna_daemon.netutil import free_port

LATENT_SIDE = 32  # 32x32 latent -> 256x256 image: ~0.1-0.3 s a decode on 2 CPUs
PROMPT = "a photo of a red cat riding a horse at night, highly detailed"

# One client process: load its model, warm up, say "ready"; then for each "run SECONDS"
# line on stdin work that long and answer one JSON line (the parent sends it to one client,
# or to both at once); EOF ends it.
_CLIENT = textwrap.dedent(
    """
    import json, sys, time, torch
    from luna_daemon.client import DaemonClient
    port, token, kind, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    c = DaemonClient("127.0.0.1", port, token=token, timeout=300)
    if kind == "vae":
        model = c.vae_load(path)["model"]
        latent = torch.randn(1, 4, %(side)d, %(side)d, generator=torch.Generator().manual_seed(0))
        work = lambda: c.vae_decode(model, latent)
    else:
        model = c.clip_load([path], "sd1")["model"]
        work = lambda: c.clip_encode(model, text=%(prompt)r)
    for _ in range(2):
        work()
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    for line in sys.stdin:
        seconds = float(line.split()[1])
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            work()
            n += 1
        sys.stdout.write(json.dumps({"ops": n, "seconds": time.perf_counter() - t0}) + "\\n"); sys.stdout.flush()
    c.close()
    """
) % {"side": LATENT_SIDE, "prompt": PROMPT}


@contextlib.contextmanager
def _clients(port: int, token: str, models: dict[str, str]) -> Iterator[Any]:
    """A VAE client and a CLIP client of the daemon on ``port``, loaded and warm; yields
    ``run(kinds, seconds) -> {kind: ops per second}`` (the named clients work at once)."""
    from luna_daemon.bench import _end_process

    procs: dict[str, subprocess.Popen] = {}
    try:
        for kind in ("vae", "clip"):  # both start (import torch, load) at the same time
            procs[kind] = subprocess.Popen([sys.executable, "-c", _CLIENT, str(port), token, kind, models[kind]],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for kind, p in procs.items():
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"the {kind} client did not start (exit code {p.wait(30)}): {line!r}")

        def run(kinds: tuple[str, ...], seconds: float) -> dict[str, float]:
            for kind in kinds:  # each is waiting on its stdin: they start together
                procs[kind].stdin.write(f"run {seconds}\n")
                procs[kind].stdin.flush()
            out = {}
            for kind in kinds:
                line = procs[kind].stdout.readline()
                if not line:
                    raise RuntimeError(f"the {kind} client ended (exit code {procs[kind].wait(30)})")
                result = json.loads(line)
                out[kind] = result["ops"] / result["seconds"]
            return out

        yield run
    finally:
        for p in procs.values():
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()  # EOF: the client ends
            _end_process(p, 30.0)


_SPLIT_CONFIG = """\
# bench --instances, layout (b): the original Luna split.
[[instances]]
name = "clip"
service = "clip"

[[instances]]
name = "vae"
service = "vae"
port = {vae_port}
"""


@contextlib.contextmanager
def _layout(split: bool, work: Path, engine_env: dict[str, str]) -> Iterator[tuple[int, str]]:
    """(primary port, token) of (a) one full daemon or (b) a clip + vae host, both on free ports."""
    from luna_daemon.bench import daemon_process
    from luna_daemon.client import DaemonUnavailable, wait_for_daemon

    with tempfile.TemporaryDirectory(prefix="luna-bench-inst-", dir=work) as home:
        vae_port = free_port()
        if split:
            (Path(home) / "config").mkdir()
            (Path(home) / "config" / "config.toml").write_text(_SPLIT_CONFIG.format(vae_port=vae_port), encoding="utf-8")
        with daemon_process([str(work / "models")], engine_env, home=home) as (port, token, proc):
            if split:  # the host answers before its child instance does
                try:
                    wait_for_daemon("127.0.0.1", vae_port, 60, proc=proc)
                except DaemonUnavailable as exc:
                    raise RuntimeError(f"the vae instance of the benchmark host did not start: {exc}") from None
            yield port, token


def _engines(work: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """{engine: {"env", "models"}} for each engine available here, and {engine: why not}."""
    import importlib.util

    from luna_daemon.models import tiny

    engines: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    models = work / "models"
    vae = str(tiny.make_tiny_vae(models / "vae", layout="file", seed=1))  # diffusers layout: both engines load it
    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        skipped["standalone"] = f"{', '.join(missing)} not installed"
    else:
        clip = str(tiny.make_tiny_clip(models / "clip", kind="l", layout="file", seed=2))
        engines["standalone"] = {"env": {"LUNA_ENGINE": "standalone"}, "models": {"vae": vae, "clip": clip}}
    try:
        from luna_daemon.comfy_nodes.bench import _clip_l_state_dict, _find_root
        from luna_daemon.settings import Settings

        root = _find_root(None, Settings.load(tolerant=True))  # comfyui_root / COMFYUI_PATH, else the fake
    except RuntimeError as exc:
        skipped["comfy"] = str(exc)
    else:
        import torch
        from safetensors.torch import save_file

        # CLIP-L in the Hugging Face layout with the sizes of that ComfyUI's own config (the
        # comfy engine loads single files, as ComfyUI's loaders do).
        cfg = json.loads((root / "comfy" / "sd1_clip_config.json").read_text(encoding="utf-8"))
        clip = models / "text_encoders" / "bench_clip_l.safetensors"
        clip.parent.mkdir(parents=True, exist_ok=True)
        sd = _clip_l_state_dict(cfg, seed=2)
        hidden = int(cfg["hidden_size"])
        sd["text_projection.weight"] = torch.eye(hidden, dtype=torch.float16)  # as HF saves CLIP-L (else "clip missing")
        save_file(sd, str(clip))
        engines["comfy"] = {"env": {"LUNA_ENGINE": "comfy", "LUNA_COMFYUI_ROOT": str(root)},
                            "models": {"vae": vae, "clip": str(clip)}, "root": str(root)}
    return engines, skipped


def _shares(rates: dict[str, float], solo: dict[str, float]) -> dict[str, float]:
    """One layout's rates, each as a share of that client's solo rate, and their sum."""
    return {"vae_decodes_per_s": rates["vae"], "clip_encodes_per_s": rates["clip"],
            "vae_share_of_solo": rates["vae"] / solo["vae"], "clip_share_of_solo": rates["clip"] / solo["clip"],
            "aggregate": rates["vae"] / solo["vae"] + rates["clip"] / solo["clip"]}


def _measure(work: Path, engine: dict[str, Any], seconds: float, rounds: int) -> dict[str, Any]:
    """Both layouts stay up side by side and take turns, round by round (solo VAE, solo
    CLIP and both on (a), then both on (b)): a machine whose load drifts (other work on a
    shared VM) then weighs on both alike. Each round is normalised by its own solo rates;
    the figures reported are the medians over the rounds."""
    models, env = engine["models"], engine["env"]
    per_round = []
    with _layout(False, work, env) as (pa, ta), _layout(True, work, env) as (pb, tb), \
            _clients(pa, ta, models) as run_a, _clients(pb, tb, models) as run_b:
        for _ in range(rounds):
            solo = {**run_a(("vae",), seconds), **run_a(("clip",), seconds)}
            a, b = _shares(run_a(("vae", "clip"), seconds), solo), _shares(run_b(("vae", "clip"), seconds), solo)
            per_round.append({"solo": {"vae_decodes_per_s": solo["vae"], "clip_encodes_per_s": solo["clip"]},
                              "one_daemon": a, "two_instances": b, "ratio_b_over_a": b["aggregate"] / a["aggregate"]})

    def median(path: tuple[str, ...]) -> float:
        values = []
        for r in per_round:
            for key in path:
                r = r[key]
            values.append(r)
        return statistics.median(values)

    out: dict[str, Any] = {part: {key: median((part, key)) for key in per_round[0][part]}
                           for part in ("solo", "one_daemon", "two_instances")}
    out["ratio_b_over_a"] = median(("ratio_b_over_a",))
    out["rounds"] = per_round
    return out


def instances_benchmark(seconds: float = 5.0, rounds: int = 3, *, quick: bool = False) -> dict[str, Any]:
    """See the module docstring. ``quick``: one round of one second per measurement (what
    the tests run).

    Returns ``{"benchmark": "instances", "machine", "seconds", "latent", "engines": {name:
    {"solo", "one_daemon", "two_instances", "ratio_b_over_a"}}, "skipped": {name: why},
    "ok", "lines"}``; ``one_daemon`` / ``two_instances`` hold ``vae_decodes_per_s``,
    ``clip_encodes_per_s``, each client's ``*_share_of_solo`` and their sum ``aggregate``
    (medians over ``rounds``; each round's own figures are in the engine's ``rounds``)."""
    from luna_daemon.cli_bench import machine

    if quick:
        seconds, rounds = min(seconds, 1.0), 1
    with tempfile.TemporaryDirectory(prefix="luna-bench-instances-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        engines, skipped = _engines(work)
        results = {name: _measure(work, engine, seconds, rounds) for name, engine in engines.items()}
    side = LATENT_SIDE * 8
    lines = [(f"two clients at once -- VAE decode {LATENT_SIDE}x{LATENT_SIDE} -> {side}x{side} and CLIP encode "
              f"(tiny random models), {seconds:g} s each, median of {rounds} round(s) ({machine()})"),
             "aggregate = sum of each client's rate / its rate alone (2.0: no waiting on each other, 1.0: taking turns)"]
    for name, r in results.items():
        for key, label in (("one_daemon", "(a) one full daemon"), ("two_instances", "(b) vae + clip instances")):
            x = r[key]
            lines.append(f"[{name}] {label}: {x['vae_decodes_per_s']:.1f} decodes/s ({x['vae_share_of_solo']:.2f} of solo), "
                         f"{x['clip_encodes_per_s']:.1f} encodes/s ({x['clip_share_of_solo']:.2f} of solo), "
                         f"aggregate {x['aggregate']:.2f}")
        lines.append(f"[{name}] solo: {r['solo']['vae_decodes_per_s']:.1f} decodes/s, "
                     f"{r['solo']['clip_encodes_per_s']:.1f} encodes/s; (b)/(a) = {r['ratio_b_over_a']:.2f}")
    lines += [f"[{name}] not measured: {why}" for name, why in skipped.items()]
    return {"benchmark": "instances", "machine": machine(), "cpus": os.cpu_count(), "seconds": seconds, "rounds": rounds,
            "latent": [1, 4, LATENT_SIDE, LATENT_SIDE], "engines": results, "skipped": skipped,
            "ok": bool(results), "lines": lines}
