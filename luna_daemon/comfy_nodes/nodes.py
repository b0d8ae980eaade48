"""The Luna nodes for ComfyUI (v1 node classes, category "Luna").

* **Luna VAE Loader (daemon)** / **Luna CLIP Loader (daemon)** and its **Dual / Triple /
  Quadruple** siblings (ComfyUI's DualCLIPLoader, TripleCLIPLoader, QuadrupleCLIPLoader:
  same types, same file lists): files from ComfyUI's model folders, loaded by the Luna
  Daemon; the outputs are proxies (``VAE`` / ``CLIP``) that the stock nodes use unchanged.
  Every loader (and the tunnel) has an optional ``instance`` input: ``auto`` (the client
  routes VAE and CLIP ops to an instance serving them) or an ``[[instances]]`` name.
* **Luna Checkpoint Tunnel**: MODEL passes through; the checkpoint's CLIP and VAE are
  registered with the daemon by content hash and replaced by proxies.
* **Luna Daemon Status**: a text summary and whether the daemon runs (re-runs every time).

This module imports nothing heavy: ``torch``/``comfy``/the client are imported when a node
runs. ``INPUT_TYPES`` never talks to the daemon (ComfyUI calls it on every page load).

Daemon down: the loaders raise the error from :mod:`.connection` (how to start it), or with
``comfy_fallback = "local"`` load the files in this ComfyUI with ``comfy.sd`` and log a
warning.

Precision: a loader left on ``dtype = default`` sends the dtype this ComfyUI would use
(:func:`comfy_dtype`: its precision flags and device), so the daemon computes like a native
load in this ComfyUI.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from . import connection

log = logging.getLogger("luna_daemon.comfy")

CATEGORY = "Luna"
DEVICES = ["default", "cpu", "cuda:0", "cuda:1", "cuda:2", "cuda:3", "mps"]
DTYPES = ["default", "fp32", "fp16", "bf16"]
# The daemon's clip_type names: ComfyUI's CLIPType members in lower case (CLIPLoader's list
# includes "stable_diffusion"), plus Luna's own sd1 / sd2 / sdxl / sdxl_refiner (older
# workflows keep them). One file: CLIPLoader's types and the SD/SDXL ones; two files (the
# optional clip_name2): as DualCLIPLoader.
CLIP_TYPES = ["sd1", "sd2", "sdxl", "sdxl_refiner", "stable_diffusion", "sd3", "flux", "stable_cascade",
              "stable_audio", "mochi", "ltxv", "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma", "ace",
              "omnigen2", "qwen_image", "hunyuan_video", "hunyuan_image", "hunyuan_dit"]
# ComfyUI v0.3.64 DualCLIPLoader's types, in its order.
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]
NONE = "None"

_DEVICE_TIP = "where the daemon runs it; default = the daemon's vae_device / clip_device setting"
_INSTANCE_TIP = ("which Luna Daemon instance loads it: auto = the one serving this kind of model (a single daemon, or "
                 "the [[instances]] routing), else an instance name from config.toml")
_DTYPE_TIP = ("weight precision in the daemon; default = what this ComfyUI would use (its --fp16-vae / --bf16-vae / "
              "--fp32-vae, --fp16-text-enc ... flags and its device), else the daemon's vae_dtype / clip_dtype")
_warned_dtypes: set[str] = set()


def _filenames(kind: str) -> list[str]:
    """``folder_paths.get_filename_list(kind)``; [] outside ComfyUI or on any error."""
    try:
        import folder_paths

        return list(folder_paths.get_filename_list(kind))
    except Exception:  # noqa: BLE001 - INPUT_TYPES must never fail
        return []


def _full_path(kind: str, name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise(kind, name)


def _check_file(kind: str, name: Any) -> bool | str:
    if not isinstance(name, str) or not name or name == NONE:
        return f"choose a file from ComfyUI's {kind} folder"
    try:
        import folder_paths

        if folder_paths.get_full_path(kind, name) is None:
            return f"{name} is not in ComfyUI's {kind} folders ({', '.join(folder_paths.get_folder_paths(kind))})"
    except Exception:
        log.debug("cannot check %s in ComfyUI's %s folders", name, kind, exc_info=True)
    return True


def comfy_dtype(kind: str, device: str = "default") -> str | None:
    """The weight dtype this ComfyUI would give a ``"vae"`` / ``"clip"`` on ``device``
    (``"default"``: its own vae / text-encoder device), as a wire name (fp32 / fp16 / bf16),
    from its ``comfy.model_management``: ``vae_dtype`` / ``text_encoder_dtype``, which read
    the precision flags. None outside ComfyUI, when its choice depends on the VAE model (no
    flag on an fp16/bf16-capable device: the daemon's comfy engine then chooses the same way
    from the VAE's working dtypes) or when the daemon cannot store it (fp8)."""
    mm = sys.modules.get("comfy.model_management")  # only an imported one: never set up comfy here
    if mm is None:
        return None
    import torch

    from .proxies import wire_dtype

    try:
        if kind == "vae":
            dev = _torch_device(device) or mm.vae_device()
            # A VAE gets the first of its working dtypes the device runs well unless a flag
            # decides. Asking with different lists tells the two apart: one answer = decided.
            lists = ([], [torch.float16, torch.bfloat16, torch.float32], [torch.bfloat16, torch.float16, torch.float32])
            picks = {mm.vae_dtype(dev, allowed) for allowed in lists}
            if len(picks) != 1:
                return None
            chosen = picks.pop()
        else:
            chosen = mm.text_encoder_dtype(_torch_device(device) or mm.text_encoder_device())
    except Exception:  # a ComfyUI without these functions: the daemon decides
        log.debug("comfy.model_management could not say which %s dtype it would use", kind, exc_info=True)
        return None
    name = wire_dtype(chosen)
    if name is None and str(chosen) not in _warned_dtypes:
        _warned_dtypes.add(str(chosen))
        log.warning("this ComfyUI would store the %s as %s; the Luna Daemon stores fp32, fp16 or bf16 only, so it "
                    "uses its %s_dtype setting", "VAE" if kind == "vae" else "text encoder", chosen, kind)
    return name


def _load_dtype(kind: str, device: str, dtype: str) -> str:
    """The node's dtype when the user chose one, else this ComfyUI's own choice."""
    if dtype not in (None, "", "default"):
        return dtype
    return comfy_dtype(kind, device) or "default"


def _unavailable():
    from luna_daemon.client import DaemonUnavailable

    return DaemonUnavailable


# ------------------------------------------------------------------------ local fallback


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)


def _torch_device(device: str):
    import torch

    return None if device in (None, "", "default") else torch.device(device)


def native_vae(path: str, device: str = "default", dtype: str = "default") -> Any:
    """Load the VAE in this ComfyUI exactly as the daemon's comfy engine would (same config
    rules for VAEs that are not SD-sized)."""
    import comfy.sd
    import comfy.utils

    from luna_daemon.models.engines.comfy import (
        _inferred_vae_config,
        _sidecar_vae_config,
    )

    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    kwargs: dict[str, Any] = {"sd": sd, "metadata": metadata, "device": _torch_device(device),
                              "dtype": _torch_dtype(dtype)}
    config = _sidecar_vae_config(Path(path)) or _inferred_vae_config(sd)
    if config is not None:
        kwargs["config"] = config
    vae = comfy.sd.VAE(**kwargs)
    vae.throw_exception_if_invalid()
    return vae


def native_clip(paths: list[str], clip_type: str = "sd1", device: str = "default", dtype: str = "default") -> Any:
    """Load the text encoder(s) in this ComfyUI with ``comfy.sd.load_clip``."""
    import comfy.sd
    import folder_paths

    from luna_daemon.models.engines.comfy import _CLIP_TYPE_ALIASES

    member = _CLIP_TYPE_ALIASES.get(clip_type, clip_type.upper())
    enum = getattr(comfy.sd.CLIPType, member, comfy.sd.CLIPType.STABLE_DIFFUSION)
    options: dict[str, Any] = {}
    dev = _torch_device(device)
    if dev is not None:
        options["load_device"] = options["offload_device"] = dev
    if _torch_dtype(dtype) is not None:
        options["dtype"] = _torch_dtype(dtype)
    return comfy.sd.load_clip(ckpt_paths=list(paths), embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=enum, model_options=options)


def _fallback_warning(conn: connection.Connection, exc: BaseException, what: str) -> None:
    log.warning("Luna Daemon unavailable, comfy_fallback = local: %s in this ComfyUI instead (no sharing). %s",
                what, conn.down_message(exc))


# ------------------------------------------------------------------------------- nodes


# The optional inputs of every loader.
_INSTANCE_OPTION = {"instance": ("STRING", {"default": "auto", "tooltip": _INSTANCE_TIP, "advanced": True})}
_LOAD_OPTIONS = {
    "device": (DEVICES, {"default": "default", "tooltip": _DEVICE_TIP, "advanced": True}),
    "dtype": (DTYPES, {"default": "default", "tooltip": _DTYPE_TIP, "advanced": True}),
    **_INSTANCE_OPTION,
}


def _check_instance(instance: Any) -> bool | str:
    try:
        connection.instance_name(instance)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return True


def _connection(instance: Any) -> connection.Connection:
    """The connection for a node's ``instance`` input (a bad name: the typed error)."""
    try:
        return connection.get_connection(instance)
    except (TypeError, ValueError) as exc:
        from luna_daemon.client import DaemonError

        raise DaemonError("bad_args", str(exc)) from None


class LunaVAELoader:
    """Load a VAE in the Luna Daemon; outputs a proxy VAE for the stock VAE nodes."""

    DESCRIPTION = ("Loads a VAE in the Luna Daemon (shared by every ComfyUI using it) and outputs a proxy that the stock "
                   "VAE Decode / Encode (tiled too) nodes use unchanged.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"vae_name": (_filenames("vae"), {"tooltip": "a file in ComfyUI's models/vae folders"})},
            "optional": {
                **_LOAD_OPTIONS,
            },
        }

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name: str, instance: str = "auto") -> bool | str:
        checked = _check_file("vae", vae_name)
        return checked if checked is not True else _check_instance(instance)

    def load_vae(self, vae_name: str, device: str = "default", dtype: str = "default", instance: str = "auto") -> tuple:
        from . import proxies

        path = _full_path("vae", vae_name)
        conn = _connection(instance)
        try:
            return (proxies.load_vae(conn, path, device=device, dtype=_load_dtype("vae", device, dtype)),)
        except _unavailable() as exc:
            if not conn.fallback_local:
                raise
            _fallback_warning(conn, exc, f"loading VAE {vae_name}")
            return (native_vae(path, device, dtype),)


def _load_clip_files(names: list[str], clip_type: str, device: str, dtype: str, instance: str) -> tuple:
    """Load text-encoder files (names in ComfyUI's text_encoders / clip folders) as one CLIP
    in the daemon (or locally with comfy_fallback = "local")."""
    from . import proxies

    paths = [_full_path("text_encoders", n) for n in names]
    conn = _connection(instance)
    try:
        return (proxies.load_clip(conn, paths, clip_type, device=device, dtype=_load_dtype("clip", device, dtype)),)
    except _unavailable() as exc:
        if not conn.fallback_local:
            raise
        _fallback_warning(conn, exc, f"loading CLIP {', '.join(Path(p).name for p in paths)}")
        return (native_clip(paths, clip_type, device, dtype),)


def _check_clip_files(*names: Any, optional: tuple[Any, ...] = ()) -> bool | str:
    for name in names:
        checked = _check_file("text_encoders", name)
        if checked is not True:
            return checked
    for name in optional:
        if name not in (None, "", NONE):
            checked = _check_file("text_encoders", name)
            if checked is not True:
                return checked
    return True


_TE_TIP = "a file in ComfyUI's models/text_encoders (or clip) folders"


class LunaCLIPLoader:
    """Load text encoder(s) in the Luna Daemon; outputs a proxy CLIP (ComfyUI's CLIPLoader,
    plus an optional second file as DualCLIPLoader)."""

    DESCRIPTION = ("Loads one text encoder (or two, with clip_name2) in the Luna Daemon (shared by every ComfyUI using "
                   "it) and outputs a proxy CLIP for CLIP Text Encode, CLIP Set Last Layer, LoRA loaders and the "
                   "family encoders (SDXL / SD3 / Flux / ...). Three or four files: Luna Triple / Quadruple CLIP Loader.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = _filenames("text_encoders")
        return {
            "required": {
                "clip_name1": (files, {"tooltip": _TE_TIP}),
                "type": (CLIP_TYPES, {"default": "sd1", "tooltip": "model family (ComfyUI's CLIPLoader / "
                                                                   "DualCLIPLoader type); sdxl / flux take two files"}),
            },
            "optional": {
                "clip_name2": ([NONE, *files], {"default": NONE, "tooltip": "second file (SDXL: clip_g, Flux: t5xxl)"}),
                **_LOAD_OPTIONS,
            },
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name1: str, clip_name2: str = NONE, instance: str = "auto") -> bool | str:
        checked = _check_clip_files(clip_name1, optional=(clip_name2,))
        return checked if checked is not True else _check_instance(instance)

    def load_clip(self, clip_name1: str, type: str = "sd1", clip_name2: str = NONE, device: str = "default",
                  dtype: str = "default", instance: str = "auto") -> tuple:
        names = [clip_name1] + ([clip_name2] if clip_name2 not in (None, "", NONE) else [])
        return _load_clip_files(names, type, device, dtype, instance)


class LunaDualCLIPLoader:
    """ComfyUI's DualCLIPLoader through the Luna Daemon: two files and its types."""

    DESCRIPTION = ("Loads two text encoders in the Luna Daemon, like ComfyUI's DualCLIPLoader (sdxl: clip-l, clip-g; "
                   "sd3: two of clip-l / clip-g / t5; flux: clip-l, t5; hidream: t5 and/or llama; hunyuan_video; "
                   "hunyuan_image: qwen2.5vl 7b and byt5 small), and outputs a proxy CLIP.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = _filenames("text_encoders")
        return {"required": {"clip_name1": (files, {"tooltip": _TE_TIP}), "clip_name2": (files, {"tooltip": _TE_TIP}),
                             "type": (DUAL_CLIP_TYPES, {"tooltip": "model family (DualCLIPLoader's type)"})},
                "optional": dict(_LOAD_OPTIONS)}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name1: str, clip_name2: str, instance: str = "auto") -> bool | str:
        checked = _check_clip_files(clip_name1, clip_name2)
        return checked if checked is not True else _check_instance(instance)

    def load_clip(self, clip_name1: str, clip_name2: str, type: str = "sdxl", device: str = "default",
                  dtype: str = "default", instance: str = "auto") -> tuple:
        return _load_clip_files([clip_name1, clip_name2], type, device, dtype, instance)


class LunaTripleCLIPLoader:
    """ComfyUI's TripleCLIPLoader (SD3 / SD3.5: clip-l, clip-g, t5) through the Luna Daemon."""

    DESCRIPTION = ("Loads three text encoders in the Luna Daemon, like ComfyUI's TripleCLIPLoader (sd3 / sd3.5: clip-l, "
                   "clip-g, t5xxl), and outputs a proxy CLIP for CLIP Text Encode (SD3) and the other encoders.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = _filenames("text_encoders")
        return {"required": {f"clip_name{i}": (files, {"tooltip": _TE_TIP}) for i in (1, 2, 3)},
                "optional": dict(_LOAD_OPTIONS)}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name1: str, clip_name2: str, clip_name3: str, instance: str = "auto") -> bool | str:
        checked = _check_clip_files(clip_name1, clip_name2, clip_name3)
        return checked if checked is not True else _check_instance(instance)

    def load_clip(self, clip_name1: str, clip_name2: str, clip_name3: str, device: str = "default",
                  dtype: str = "default", instance: str = "auto") -> tuple:
        # ComfyUI picks the SD3 encoder from the file count (any clip_type); "sd3" says so.
        return _load_clip_files([clip_name1, clip_name2, clip_name3], "sd3", device, dtype, instance)


class LunaQuadrupleCLIPLoader:
    """ComfyUI's QuadrupleCLIPLoader (HiDream: long clip-l, long clip-g, t5xxl, llama 3.1 8b)."""

    DESCRIPTION = ("Loads four text encoders in the Luna Daemon, like ComfyUI's QuadrupleCLIPLoader (hidream: long "
                   "clip-l, long clip-g, t5xxl, llama_8b_3.1_instruct), and outputs a proxy CLIP.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = _filenames("text_encoders")
        return {"required": {f"clip_name{i}": (files, {"tooltip": _TE_TIP}) for i in (1, 2, 3, 4)},
                "optional": dict(_LOAD_OPTIONS)}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name1: str, clip_name2: str, clip_name3: str, clip_name4: str,
                        instance: str = "auto") -> bool | str:
        checked = _check_clip_files(clip_name1, clip_name2, clip_name3, clip_name4)
        return checked if checked is not True else _check_instance(instance)

    def load_clip(self, clip_name1: str, clip_name2: str, clip_name3: str, clip_name4: str, device: str = "default",
                  dtype: str = "default", instance: str = "auto") -> tuple:
        # ComfyUI picks the HiDream encoder from the file count (any clip_type).
        return _load_clip_files([clip_name1, clip_name2, clip_name3, clip_name4], "hidream", device, dtype, instance)


class LunaCheckpointTunnel:
    """MODEL passes through; CLIP and VAE become daemon proxies for the same weights."""

    DESCRIPTION = ("Put after a checkpoint loader: MODEL is passed through unchanged, the checkpoint's CLIP and VAE are "
                   "registered with the Luna Daemon by content hash (another ComfyUI with the same checkpoint shares "
                   "the daemon's copy) and replaced by proxies. Connect LoRA loaders after this node.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",)},
                "optional": dict(_INSTANCE_OPTION)}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "tunnel"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, instance: str = "auto") -> bool | str:
        return _check_instance(instance)

    def tunnel(self, model: Any, clip: Any, vae: Any, instance: str = "auto") -> tuple:
        from . import proxies

        conn = _connection(instance)
        try:
            conn.call("ping")  # reachable (or started) now, even when both proxies are cached
            new_clip = proxies.tunnel_clip(conn, clip)
            new_vae = proxies.tunnel_vae(conn, vae)
        except _unavailable() as exc:
            if not conn.fallback_local:
                raise
            _fallback_warning(conn, exc, "keeping the checkpoint's CLIP and VAE")
            return (model, clip, vae)
        return (model, new_clip, new_vae)


class LunaDaemonStatus:
    """A text summary of the daemon and whether it runs. Never raises; re-runs every time."""

    DESCRIPTION = "Shows whether the Luna Daemon runs, what it has loaded and its memory use."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    RETURN_TYPES = ("STRING", "BOOLEAN")
    RETURN_NAMES = ("summary", "running")
    FUNCTION = "status"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # never equal to itself: always re-run

    def status(self) -> dict:
        summary, running = daemon_summary(connection.get_connection())
        return {"ui": {"text": [summary]}, "result": (summary, running)}


def daemon_summary(conn: connection.Connection) -> tuple[str, bool]:
    """(text, running) from the daemon's status and ps; the down message when unreachable."""
    from luna_daemon.client import DaemonError, DaemonUnavailable
    from luna_daemon.units import fmt_bytes, fmt_duration  # the units of every face

    try:
        status = conn.client.call("status", timeout=5.0)
        models = conn.client.call("ps", timeout=5.0)["models"]
    except DaemonUnavailable as exc:
        return conn.down_message(exc), False
    except DaemonError as exc:
        return f"Luna Daemon at {conn.address} answered with an error: {exc.code}: {exc.message}", True
    except Exception as exc:  # noqa: BLE001 - a status node must not fail the workflow
        return f"Luna Daemon status unavailable: {type(exc).__name__}: {exc}", False
    lines = [(f"Luna Daemon {status.get('version', '?')} running at {conn.address} "
              f"(engine {status.get('engine', '?')}, service {status.get('service', '?')}, "
              f"up {fmt_duration(status.get('uptime', 0))})")]
    lines.append(f"models loaded: {len(models)}")
    for m in models:
        name = ", ".join(Path(p).name for p in m.get("paths", [])) or m.get("id")
        lines.append(f"  {m.get('kind')} {name}: {m.get('device')} {m.get('dtype')}, {fmt_bytes(m.get('bytes'))}, "
                     f"{m.get('calls', 0)} calls, queue {m.get('queue', 0)}")
    for dev, mem in (status.get("devices") or {}).items():
        used, total = mem.get("used"), mem.get("total")
        if total:
            lines.append(f"  {dev}: {fmt_bytes(used)} used of {fmt_bytes(total)} (models {fmt_bytes(mem.get('models_bytes'))})")
    req = status.get("requests") or {}
    lines.append(f"requests: {req.get('total', 0)} total, {req.get('errors', 0)} errors, "
                 f"{req.get('per_minute', 0)} in the last minute")
    cache = status.get("lora_cache")
    if cache:
        lines.append(f"LoRA cache: {cache.get('entries', 0)} entries, {fmt_bytes(cache.get('bytes'))} of "
                     f"{fmt_bytes(cache.get('budget'))}")
    return "\n".join(lines), True


NODE_CLASS_MAPPINGS = {
    "LunaVAELoader": LunaVAELoader,
    "LunaCLIPLoader": LunaCLIPLoader,
    "LunaDualCLIPLoader": LunaDualCLIPLoader,
    "LunaTripleCLIPLoader": LunaTripleCLIPLoader,
    "LunaQuadrupleCLIPLoader": LunaQuadrupleCLIPLoader,
    "LunaCheckpointTunnel": LunaCheckpointTunnel,
    "LunaDaemonStatus": LunaDaemonStatus,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LunaVAELoader": "Luna VAE Loader (daemon)",
    "LunaCLIPLoader": "Luna CLIP Loader (daemon)",
    "LunaDualCLIPLoader": "Luna Dual CLIP Loader (daemon)",
    "LunaTripleCLIPLoader": "Luna Triple CLIP Loader (daemon)",
    "LunaQuadrupleCLIPLoader": "Luna Quadruple CLIP Loader (daemon)",
    "LunaCheckpointTunnel": "Luna Checkpoint Tunnel",
    "LunaDaemonStatus": "Luna Daemon Status",
}
