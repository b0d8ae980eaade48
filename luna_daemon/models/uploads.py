"""Uploaded model state dicts (``vae_load_sd`` / ``clip_load_sd``).

A client that holds a VAE / text encoder in memory (the ComfyUI Checkpoint Tunnel takes
them from a checkpoint) registers it by the SHA-256 of its safetensors serialisation. The
bytes are stored once under ``<state_dir>/uploads`` (a folder the registry accepts as a
model root) and then loaded through the registry like any file, so two clients with the
same checkpoint share one loaded copy. Asking with only the hash finds a stored upload or
answers ``not_found`` so the client sends the bytes. Unused uploads are pruned.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from luna_daemon.fsutil import atomic_write
from luna_daemon.protocol import ErrorCode, LunaError

_UPLOAD_LOCK = threading.Lock()
_UPLOAD_GRACE_S = 300.0  # uploads younger than this are never pruned (a load may be under way)


def _upload_dir(settings: Any, registry: Any) -> Path:
    base = Path(settings.state_dir) if settings.state_dir else Path(tempfile.gettempdir()) / "luna-daemon"
    folder = (base / "uploads").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    registry.add_root(folder)
    return folder


def _prune_uploads(registry: Any, folder: Path, keep: set[Path]) -> None:
    """Delete stored uploads no loaded model uses (clients re-send them on ``not_found``).

    An upload is its manifest ``<kind>-<sha>.json`` plus the files it lists; it stays while
    any of those files belongs to a loaded model, or while it is younger than the grace time."""
    used = {Path(p) for e in registry.entries() for p in e.paths} | keep
    now = time.time()
    for manifest in folder.glob("*.json"):
        try:
            files = [folder / n for n in json.loads(manifest.read_text(encoding="utf-8")).get("files", [])]
        except (OSError, ValueError, AttributeError):
            files = []
        group = [manifest, *files]
        try:
            if any(f in used for f in group) or now - manifest.stat().st_mtime <= _UPLOAD_GRACE_S:
                continue
            for f in group:
                f.unlink(missing_ok=True)
        except OSError:
            pass


def store_upload(settings: Any, registry: Any, kind: str, sha: str, data: Any) -> tuple[list[Path], str | None]:
    """Write (or find) the stored files for an upload -> (paths, clip_type)."""
    folder = _upload_dir(settings, registry)
    manifest = folder / f"{kind}-{sha}.json"
    with _UPLOAD_LOCK:
        if manifest.is_file():
            meta = json.loads(manifest.read_text(encoding="utf-8"))
            paths = [folder / name for name in meta["files"]]
            if all(p.is_file() for p in paths):
                return paths, meta.get("clip_type")
        if data is None:
            raise LunaError(ErrorCode.NOT_FOUND, f"no uploaded {kind} with sha256 {sha[:12]}...; send its bytes as 'data'")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
            raise LunaError(ErrorCode.BAD_ARGS, "data must be the safetensors bytes as a 1-D uint8 tensor")
        raw = memoryview(data.numpy())
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha:
            raise LunaError(ErrorCode.BAD_ARGS, f"uploaded bytes hash to {digest}, not the announced {sha}")
        from safetensors.torch import load as load_safetensors
        from safetensors.torch import save as save_safetensors

        clip_type = None
        if kind == "vae":
            files = [(f"vae-{sha}.safetensors", None)]  # stored as sent; the engine reads it
        else:
            from luna_daemon.models.engines.comfy import split_clip_state_dict

            try:
                state = load_safetensors(bytes(raw))
            except Exception as exc:  # noqa: BLE001 - SafetensorError has no stable import name
                raise LunaError(ErrorCode.BAD_ARGS, f"uploaded {kind} is not a valid .safetensors blob: {exc}") from None
            clip_type, parts = split_clip_state_dict(state)
            files = [(f"clip-{sha}-{name}.safetensors", part) for name, part in parts]

        for name, part in files:
            atomic_write(folder / name, raw if part is None else save_safetensors(part))
        atomic_write(manifest, json.dumps({"files": [n for n, _ in files], "clip_type": clip_type}).encode())
        paths = [folder / n for n, _ in files]
        _prune_uploads(registry, folder, set(paths) | {manifest})
        return paths, clip_type


