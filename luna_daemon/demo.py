"""``luna-daemon demo``: an offline first proof that everything works.

Builds tiny random-weight models with real architectures in a temp dir, starts a daemon
on free ports (isolated LUNA_HOME, so a running install is never touched), runs VAE
encode/decode and CLIP encode through the client, compares with the same calls
in-process, and reports what happened with timings.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def run_demo() -> dict[str, Any]:
    from luna_daemon.client import DaemonClient
    from luna_daemon.daemon import Daemon
    from luna_daemon.models import tiny
    from luna_daemon.models.engines.standalone import StandaloneEngine
    from luna_daemon.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="luna-demo-"))
    lines: list[str] = []
    ok = True
    timings: dict[str, float] = {}

    def step(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    try:
        models = work / "models"
        vae_path = step("build tiny VAE", lambda: tiny.make_tiny_vae(models / "vae", layout="file"))
        clip_path = step("build tiny CLIP", lambda: tiny.make_tiny_clip(models / "clip_l", kind="l"))
        lines.append(f"built tiny models under {models} (random weights, real architectures)")
        settings = Settings.load(env={"LUNA_HOME": str(work / "home")},
                                 overrides={"port": 0, "monitor_port": 0, "lock_port": 0, "engine": "standalone",
                                            "model_roots": [str(models)]})
        daemon = Daemon(settings)
        step("daemon start", daemon.start)
        host, port = daemon.address
        lines.append(f"daemon running on {host}:{port} (state {daemon.state}) after {timings['daemon start'] * 1000:.0f} ms")
        try:
            with DaemonClient(host, port, token=daemon.token) as c:
                hello = c.hello()
                lines.append(f"hello: protocol {hello['protocol']}, engine {hello['engine']}, devices {', '.join(hello['devices'])}")
                vae = step("vae_load", lambda: c.vae_load(str(vae_path)))["model"]
                pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
                latent = step("vae_encode", lambda: c.vae_encode(vae, pixels))
                image = step("vae_decode", lambda: c.vae_decode(vae, latent))
                lines.append(f"VAE: pixels {list(pixels.shape)} -> latent {list(latent.shape)} in {timings['vae_encode'] * 1000:.1f} ms "
                             f"-> image {list(image.shape)} in {timings['vae_decode'] * 1000:.1f} ms")
                clip = step("clip_load", lambda: c.clip_load([str(clip_path)], "sd1"))["model"]
                out = step("clip_encode", lambda: c.clip_encode(clip, text="a photo of a cat"))
                lines.append(f"CLIP: cond {list(out['cond'].shape)}, pooled {list(out['pooled_output'].shape)} in {timings['clip_encode'] * 1000:.1f} ms")
                engine = StandaloneEngine()
                local_vae = engine.load_vae([str(vae_path)], torch.device("cpu"), None)
                local_clip = engine.load_clip([str(clip_path)], "sd1", torch.device("cpu"), None)
                with torch.inference_mode():
                    same = (torch.equal(local_vae.encode(pixels), latent)
                            and torch.equal(local_vae.decode(latent), image)
                            and torch.equal(local_clip.encode(local_clip.tokenize("a photo of a cat"))["cond"], out["cond"]))
                lines.append("results equal the same calls in-process: " + ("yes" if same else "NO"))
                ok = ok and same
                lines.append(f"models loaded: {len(c.ps())}")
        finally:
            step("daemon stop", daemon.stop)
            lines.append(f"daemon stopped cleanly in {timings['daemon stop'] * 1000:.0f} ms (state {daemon.state})")
    except Exception as exc:  # the demo reports, it does not crash
        log.exception("demo failed")
        lines.append(f"demo FAILED: {type(exc).__name__}: {exc}")
        ok = False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines.append("demo OK" if ok else "demo FAILED")
    return {"ok": ok, "lines": lines, "timings_s": timings}
