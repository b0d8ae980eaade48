"""``luna-daemon demo``: an offline first proof that everything works.

Builds tiny random-weight models with real architectures in a temp dir, starts a daemon
on free ports (isolated LUNA_HOME, so a running install is never touched), runs VAE
encode/decode and CLIP encode through the client, compares with the same calls
in-process, and reports what happened with timings.

What a caller can rely on: :func:`run_demo` reports each of :data:`STEPS` to
``progress`` as it starts and as it ends (in that order; a failed step ends with
``ok=False`` and the rest are skipped), so a face can show the demo as it runs -- the
first step is importing PyTorch, which alone takes seconds. It never raises: the result
says ``ok`` and carries the report ``lines`` and ``timings_s``. This module imports only
the standard library at import time.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from luna_daemon.units import fmt_duration

log = logging.getLogger(__name__)

STEPS = (
    "load PyTorch and the daemon",
    "build tiny VAE",
    "build tiny CLIP",
    "daemon start",
    "vae_load",
    "vae_encode",
    "vae_decode",
    "clip_load",
    "clip_encode",
    "compare with in-process calls",
    "daemon stop",
)


class Progress(Protocol):
    def started(self, index: int, name: str) -> None: ...

    def finished(self, index: int, name: str, seconds: float, ok: bool) -> None: ...


class PlainProgress:
    """One line per step start and end, written (and flushed) as it happens."""

    def __init__(self, write: Callable[[str], None]):
        self.write = write

    def started(self, index: int, name: str) -> None:
        self.write(f"[{index}/{len(STEPS)}] {name} ...")

    def finished(self, index: int, name: str, seconds: float, ok: bool) -> None:
        self.write(f"[{index}/{len(STEPS)}] {name} {'done' if ok else 'FAILED'} in {fmt_duration(seconds)}")


class _Quiet:
    def started(self, index: int, name: str) -> None:
        pass

    def finished(self, index: int, name: str, seconds: float, ok: bool) -> None:
        pass


def run_demo(progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or _Quiet()
    lines: list[str] = []
    timings: dict[str, float] = {}
    ok = True

    def step(name: str, fn: Callable[[], Any]) -> Any:
        index = STEPS.index(name) + 1
        progress.started(index, name)
        t0 = time.perf_counter()
        done = False
        try:
            out = fn()
            done = True
            return out
        finally:
            timings[name] = time.perf_counter() - t0
            progress.finished(index, name, timings[name], done)

    work = Path(tempfile.mkdtemp(prefix="luna-demo-"))
    try:
        mods = step(STEPS[0], _import_heavy)
        torch = mods["torch"]
        models = work / "models"
        vae_path = step("build tiny VAE", lambda: mods["tiny"].make_tiny_vae(models / "vae", layout="file"))
        clip_path = step("build tiny CLIP", lambda: mods["tiny"].make_tiny_clip(models / "clip_l", kind="l"))
        lines.append(f"built tiny models under {models} (random weights, real architectures)")
        settings = mods["Settings"].load(env={"LUNA_HOME": str(work / "home")},
                                         overrides={"port": 0, "monitor_port": 0, "lock_port": 0, "engine": "standalone",
                                                    "model_roots": [str(models)]})
        daemon = mods["Daemon"](settings)
        step("daemon start", daemon.start)
        host, port = daemon.address
        lines.append(f"daemon running on {host}:{port} (state {daemon.state}) after {fmt_duration(timings['daemon start'])}")
        try:
            with mods["DaemonClient"](host, port, token=daemon.token) as c:
                hello = c.hello()
                lines.append(f"hello: protocol {hello['protocol']}, engine {hello['engine']}, devices {', '.join(hello['devices'])}")
                vae = step("vae_load", lambda: c.vae_load(str(vae_path)))["model"]
                pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
                latent = step("vae_encode", lambda: c.vae_encode(vae, pixels))
                image = step("vae_decode", lambda: c.vae_decode(vae, latent))
                lines.append(f"VAE: pixels {list(pixels.shape)} -> latent {list(latent.shape)} in {fmt_duration(timings['vae_encode'])} "
                             f"-> image {list(image.shape)} in {fmt_duration(timings['vae_decode'])}")
                clip = step("clip_load", lambda: c.clip_load([str(clip_path)], "sd1"))["model"]
                out = step("clip_encode", lambda: c.clip_encode(clip, text="a photo of a cat"))
                lines.append(f"CLIP: cond {list(out['cond'].shape)}, pooled {list(out['pooled_output'].shape)} "
                             f"in {fmt_duration(timings['clip_encode'])}")

                def compare() -> bool:
                    engine = mods["StandaloneEngine"]()
                    local_vae = engine.load_vae([str(vae_path)], torch.device("cpu"), None)
                    local_clip = engine.load_clip([str(clip_path)], "sd1", torch.device("cpu"), None)
                    with torch.inference_mode():
                        return (torch.equal(local_vae.encode(pixels), latent)
                                and torch.equal(local_vae.decode(latent), image)
                                and torch.equal(local_clip.encode(local_clip.tokenize("a photo of a cat"))["cond"], out["cond"]))

                same = step("compare with in-process calls", compare)
                lines.append("results equal the same calls in-process: " + ("yes" if same else "NO"))
                ok = ok and same
                lines.append(f"models loaded: {len(c.ps())}")
        finally:
            step("daemon stop", daemon.stop)
            lines.append(f"daemon stopped cleanly in {fmt_duration(timings['daemon stop'])} (state {daemon.state})")
    except Exception as exc:  # the demo reports, it does not crash
        log.exception("demo failed")
        lines.append(f"demo FAILED: {type(exc).__name__}: {exc}")
        ok = False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines.append("demo OK" if ok else "demo FAILED")
    return {"ok": ok, "lines": lines, "timings_s": timings}


def _import_heavy() -> dict[str, Any]:
    # torch and the daemon stack take seconds to import: a step of its own, so the user
    # sees the demo start at once instead of a silent wait.
    import torch

    from luna_daemon.client import DaemonClient
    from luna_daemon.daemon import Daemon
    from luna_daemon.models import tiny
    from luna_daemon.models.engines.standalone import StandaloneEngine
    from luna_daemon.settings import Settings

    return {"torch": torch, "DaemonClient": DaemonClient, "Daemon": Daemon, "tiny": tiny,
            "StandaloneEngine": StandaloneEngine, "Settings": Settings}


class RichProgress:
    """A live display on a terminal (``rich``): one row per step, a spinner on the running
    one, each with its time. Use as a context manager around :func:`run_demo`."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress as _Progress
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console()
        self._progress = _Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"),
                                   TimeElapsedColumn(), console=self.console, transient=False)
        self._tasks: dict[int, Any] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def started(self, index: int, name: str) -> None:
        self._tasks[index] = self._progress.add_task(f"[{index}/{len(STEPS)}] {name}", total=1)

    def finished(self, index: int, name: str, seconds: float, ok: bool) -> None:
        mark = f"in {fmt_duration(seconds)}" if ok else "[red]FAILED"
        self._progress.update(self._tasks[index], completed=1, description=f"[{index}/{len(STEPS)}] {name} {mark}")
