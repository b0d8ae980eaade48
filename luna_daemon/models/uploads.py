"""Uploaded model state dicts (``vae_load_sd`` / ``clip_load_sd``).

A client that holds a VAE / text encoder in memory (the ComfyUI Checkpoint Tunnel takes
them from a checkpoint) registers it by the SHA-256 of its safetensors serialisation. The
bytes are stored once under ``<state_dir>/uploads`` and then loaded through the registry
like any file (an *internal* root: a path a client names is never resolved there), so two
clients with the same checkpoint share one loaded copy. Asking with only the hash finds a
stored upload or answers ``not_found`` so the client sends the bytes. Unused uploads are
pruned.

Only valid safetensors are kept: the header is validated (dtypes, shapes, offsets that
tile the data exactly, :func:`luna_daemon.fsutil.safetensors_header`) before anything is
written, so a pickle or a truncated blob answers ``bad_args`` and leaves nothing on disk; a
stored upload that no longer validates is removed and asked for again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from luna_daemon import fsutil
from luna_daemon.fsutil import atomic_write
from luna_daemon.protocol import ErrorCode, LunaError

log = logging.getLogger(__name__)

_UPLOAD_LOCK = threading.Lock()
_UPLOAD_GRACE_S = 300.0  # uploads younger than this are never pruned (a load may be under way)


def upload_folder(settings: Any) -> Path:
    """Where uploads are stored: ``<state_dir>/uploads`` (resolved)."""
    base = Path(settings.state_dir) if settings.state_dir else Path(tempfile.gettempdir()) / "luna-daemon"
    return (base / "uploads").resolve()


def _upload_dir(settings: Any, registry: Any) -> Path:
    folder = upload_folder(settings)
    folder.mkdir(parents=True, exist_ok=True)
    registry.add_internal_root(folder)
    return folder


def _read_manifest(manifest: Path) -> dict[str, Any] | None:
    """A manifest ``{"files": [names], "clip_type": ..., "parts": [sub-model names]}``, or None
    if absent or unusable."""
    try:
        meta = json.loads(fsutil.read_small(manifest, "upload manifest").decode("utf-8"))
    except (LunaError, ValueError):
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    # Names only: a manifest never points out of the uploads folder.
    if not isinstance(files, list) or not files or not all(isinstance(n, str) and n and Path(n).name == n for n in files):
        return None
    return meta


def _valid_upload_file(path: Path, max_bytes: int) -> bool:
    """A stored file is still a regular, valid safetensors file of at most ``max_bytes``."""
    try:
        with fsutil.open_regular(path, "stored upload", max_bytes=max_bytes, limit_name="max_body_bytes") as f:
            fsutil.safetensors_header(f.read_at, f.size)
        return True
    except (LunaError, ValueError, OSError):
        return False


def _prune_uploads(registry: Any, folder: Path, keep: set[Path]) -> None:
    """Delete stored uploads no loaded model uses (clients re-send them on ``not_found``).

    An upload is its manifest ``<kind>-<sha>.json`` plus the files it lists; it stays while
    any of those files belongs to a loaded model, or while it is younger than the grace time.
    Stored files no manifest lists (a write cut short) go after the grace time too."""
    used = {Path(p) for e in registry.entries() for p in e.paths} | keep
    now = time.time()
    listed: set[Path] = set()
    for manifest in folder.glob("*.json"):
        meta = _read_manifest(manifest)
        files = [folder / n for n in meta["files"]] if meta else []
        group = [manifest, *files]
        try:
            if any(f in used for f in group) or now - manifest.stat().st_mtime <= _UPLOAD_GRACE_S:
                listed.update(files)
                continue
            for f in group:
                f.unlink(missing_ok=True)
        except OSError:
            pass
    for orphan in folder.glob("*.safetensors"):
        try:
            if orphan not in listed and orphan not in used and now - orphan.lstat().st_mtime > _UPLOAD_GRACE_S:
                orphan.unlink(missing_ok=True)
        except OSError:
            pass


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            log.warning("cannot remove invalid upload %s", p)


def _class_hint(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200 or not value.isidentifier():
        raise LunaError(ErrorCode.BAD_ARGS, f"{name} must be a Python class name (e.g. SD3ClipModel_), got {value!r}")
    return value


def _clip_type(names: list[str], model_class: str | None, tokenizer_class: str | None) -> str:
    # Imported here: the engine module is only needed for CLIP uploads.
    from luna_daemon.models.engines.comfy import split_clip_type

    return split_clip_type(names, model_class, tokenizer_class)  # EngineError is a LunaError (bad_args)


def store_upload(settings: Any, registry: Any, kind: str, sha: str, data: Any, *,
                 model_class: Any = None, tokenizer_class: Any = None) -> tuple[list[Path], str | None]:
    """Write (or find) the stored files for an upload -> (paths, clip_type).

    Load the returned paths with ``registry.load(..., internal=True)``. A CLIP upload is split
    into one standalone file per text encoder (``split_clip_parts``); ``model_class`` /
    ``tokenizer_class`` (the client's ``type(clip.cond_stage_model).__name__`` and
    ``type(clip.tokenizer).__name__``) pick the ``clip_type`` that rebuilds the same CLIP, per
    call, so one stored upload serves any hint. Raises ``bad_args`` for bytes that are not a
    valid safetensors serialisation or a CLIP that cannot be split or rebuilt (nothing is kept),
    ``not_found`` when only the hash was sent and nothing valid is stored under it."""
    model_class = _class_hint(model_class, "model_class")
    tokenizer_class = _class_hint(tokenizer_class, "tokenizer_class")
    folder = _upload_dir(settings, registry)
    manifest = folder / f"{kind}-{sha}.json"
    with _UPLOAD_LOCK:
        meta = _read_manifest(manifest) if fsutil.present(manifest) else None
        if meta is not None:
            paths = [folder / name for name in meta["files"]]
            if all(_valid_upload_file(p, settings.max_body_bytes) for p in paths):
                parts = meta.get("parts")
                if kind != "clip" or not isinstance(parts, list) or not all(isinstance(n, str) for n in parts):
                    return paths, meta.get("clip_type")  # a VAE, or stored before manifests named the parts
                return paths, _clip_type(parts, model_class, tokenizer_class)
            log.warning("stored upload %s is missing or invalid; removing it", manifest.name)
            _remove([p for p in paths if fsutil.present(p)] + [manifest])
        elif fsutil.present(manifest):
            _remove([manifest])
        if data is None:
            raise LunaError(ErrorCode.NOT_FOUND, f"no uploaded {kind} with sha256 {sha[:12]}...; send its bytes as 'data'")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
            raise LunaError(ErrorCode.BAD_ARGS, "data must be the safetensors bytes as a 1-D uint8 tensor")
        raw = memoryview(data.contiguous().numpy())
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha:
            raise LunaError(ErrorCode.BAD_ARGS, f"uploaded bytes hash to {digest}, not the announced {sha}")
        try:
            fsutil.safetensors_header_of(raw)
        except ValueError as exc:
            raise LunaError(ErrorCode.BAD_ARGS, f"uploaded {kind} is not a valid .safetensors blob: {exc}") from None
        from safetensors.torch import load as load_safetensors
        from safetensors.torch import save as save_safetensors

        clip_type, part_names = None, None
        if kind == "vae":
            files = [(f"vae-{sha}.safetensors", None)]  # stored as sent (validated); the engine reads it
        else:
            from luna_daemon.models.engines.comfy import split_clip_parts

            try:
                state = load_safetensors(bytes(raw))
            except Exception as exc:  # noqa: BLE001 - SafetensorError has no stable import name
                raise LunaError(ErrorCode.BAD_ARGS, f"uploaded {kind} is not a valid .safetensors blob: {exc}") from None
            parts = split_clip_parts(state)
            part_names = [name for name, _ in parts]
            clip_type = _clip_type(part_names, model_class, tokenizer_class)  # refused before anything is written
            files = [(f"clip-{sha}-{name}.safetensors", part) for name, part in parts]

        written: list[Path] = []
        try:
            for name, part in files:
                atomic_write(folder / name, raw if part is None else save_safetensors(part))
                written.append(folder / name)
            atomic_write(manifest, json.dumps({"files": [n for n, _ in files], "clip_type": clip_type,
                                               "parts": part_names}).encode())
        except OSError as exc:
            _remove(written)
            raise LunaError(ErrorCode.MODEL_ERROR, f"cannot store the uploaded {kind} in {folder}: {exc.strerror or exc}") from None
        paths = [folder / n for n, _ in files]
        _prune_uploads(registry, folder, set(paths) | {manifest})
        return paths, clip_type
