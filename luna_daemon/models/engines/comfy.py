"""The comfy engine: ComfyUI's own ``comfy`` package loads and runs the models.

Files: this module holds the engine (import, devices, loading); ``comfy_runtime.py`` the
process-wide state (the import, the one lock, logging guard), ``comfy_vae.py`` the VAE,
``comfy_clip.py`` the CLIP with its LoRA stacks and the checkpoint-CLIP split.

Results are those of the stock nodes, because the same code computes them: VAEs are
``comfy.sd.VAE`` objects, CLIPs are ``comfy.sd.CLIP`` objects built by ``comfy.sd.load_clip``,
and LoRAs are applied with ``CLIP.clone()`` + ``add_patches`` exactly as ``LoraLoader`` does.

Importing ``comfy`` (done once per process, on first use or :meth:`ComfyEngine.prepare`):

* ``<root>`` is put first on ``sys.path`` (once).
* ``comfy.options.enable_args_parsing`` is never called, so ``comfy.cli_args`` parses an
  empty argument list and the daemon's own ``sys.argv`` is never seen (if something else
  already enabled parsing, ``sys.argv`` is swapped for ``[argv0]`` during the import).
* Before ``comfy.model_management`` is imported (it picks the device at import time and
  fails on a CPU-only torch without ``--cpu``): ``comfy.cli_args.args.cpu = True`` when torch
  has no usable accelerator or ``vae_device`` / ``clip_device`` both say ``cpu``; when they
  name one specific ``cuda:N``, ``torch.cuda.set_device(N)`` makes it comfy's main device
  (``CUDA_VISIBLE_DEVICES`` is left alone: it would renumber the devices the daemon reports).
* ``comfy`` logs through the root logger, and the module-level ``logging`` calls install a
  stderr handler when the root has none. The root logger's handlers, level and filters are
  restored after the import and after every engine call, so the host's logging set-up is
  never changed. In a host, ``luna_daemon.logs`` has a handler on the root logger before
  comfy is imported: comfy's records then go to the daemon's log file and dashboard (and
  WARNING+ back to the calling client), and comfy never adds a stderr handler of its own.

Concurrency: ``comfy`` keeps process-wide, unsynchronised state (``current_loaded_models``,
the live patch set on each shared module, the clip-layer options). Every load, encode and
decode holds one process-wide lock, which serialises per device and per base model too (a
per-device lock would still let two devices edit the global loaded-model list at once).
Tokenizing only reads the tokenizer and takes a per-CLIP lock instead. Every call runs inside
``torch.inference_mode()``.

LoRA: a ``LoraSpec`` stack is applied to a clone of the loaded CLIP: each spec's pairs are
handed to ``comfy.lora.load_lora`` as ``<prefix>.lora_up.weight`` / ``.lora_down.weight`` /
``.alpha`` tensors with a ``{prefix: target key}`` map, which rebuilds the
``comfy.weight_adapter.LoRAAdapter`` patches ``LoraLoader`` would make, and the clone gets
``add_patches(patches, strength)``, one call per spec in stack order (the patch lists a chain
of LoraLoader nodes builds). Patched clones are cached per stack
(``(sha256, strength)`` pairs, small LRU), so a repeated stack is not rebuilt and, while it
stays the live patch set, not re-patched. ``patchable_keys()`` are the values of
``comfy.lora.model_lora_keys_clip`` for the loaded text encoder, i.e. the
``cond_stage_model`` state-dict keys a LoRA can target (``clip_l.transformer.text_model...``).

Devices: a model's device must exist (else ``bad_args`` listing the devices); when comfy was
set up CPU-only, accelerators are refused. Models on an accelerator are loaded there at once
and pinned (``load_device == offload_device``), so comfy never moves them behind the
registry's back; the registry owns residency.

VAE configs: ComfyUI sizes a KL VAE from its keys assuming SD dimensions. For a smaller KL
VAE the engine passes ``config=`` (the ``{"params": {"embed_dim", "ddconfig"}}`` form
``comfy.sd.VAE`` takes): from a ``<stem>.json`` next to the file (that form, a bare
``ddconfig``, or a diffusers ``AutoencoderKL`` config), else inferred from the weight shapes.
SD-sized and non-KL VAEs are left to ComfyUI's own detection.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from luna_daemon import fsutil

from .base import Engine, EngineError, as_device

# The engine's halves; names other modules and the tests import from here are re-exported.
from .comfy_clip import (  # noqa: F401
    _CLIP_FILE_COUNTS, _CLIP_TYPE_ALIASES, DEFAULT_LORA_CACHE_ENTRIES, ComfyClip, split_clip_parts, split_clip_state_dict,
    split_clip_type,
)
from .comfy_runtime import (  # noqa: F401
    _COMFY_LOCK, _STATE, _comfy_call, _first_line, _held_open, _import_comfy, _keep_root_logging, _paths, _sub_tokenizers,
)
from .comfy_vae import ComfyVae, _inferred_vae_config, _sidecar_vae_config  # noqa: F401

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- engine


class ComfyEngine(Engine):
    """Loads models with ComfyUI's ``comfy`` package from the ComfyUI install at ``root``."""

    name = "comfy"

    def __init__(self, settings, root: str | Path | None, *, lora_cache_entries: int = DEFAULT_LORA_CACHE_ENTRIES):
        self.settings = settings
        self.root = Path(root).expanduser().resolve() if root else None
        self.lora_cache_entries = lora_cache_entries
        if self.root is None:
            self._require_importable()

    @staticmethod
    def _require_importable() -> None:
        """Without a root, comfy must already be importable (e.g. running inside ComfyUI)."""
        if "comfy" not in sys.modules and importlib.util.find_spec("comfy") is None:
            raise EngineError("model_error", "engine=comfy but no ComfyUI was found: set comfyui_root or COMFYUI_PATH")

    # -- import

    def prepare(self) -> SimpleNamespace:
        """Import comfy now (idempotent, process-wide). Returns its modules."""
        if self.root is None:
            self._require_importable()
        return _import_comfy(self.root, self.settings)

    def _check_device(self, device: torch.device, comfy: SimpleNamespace | None) -> None:
        from luna_daemon.models.devices import available_devices

        devices = available_devices()
        name = str(device)
        if name not in devices:
            raise EngineError("bad_args", f"device {name!r} is not available; devices on this machine: {', '.join(devices)}")
        if comfy is not None and comfy.cpu_only and device.type != "cpu":
            raise EngineError("bad_args", f"device {name!r} cannot be used: the comfy engine was set up CPU-only "
                                          f"(vae_device and clip_device are 'cpu'); devices it can use: cpu")

    def _embedding_directories(self, comfy: SimpleNamespace) -> list[str]:
        dirs: list[str] = []
        if comfy.folder_paths is not None:
            try:
                dirs += list(comfy.folder_paths.get_folder_paths("embeddings"))
            except Exception:
                logger.debug("folder_paths.get_folder_paths('embeddings') failed", exc_info=True)
        elif self.root is not None:
            dirs.append(str(self.root / "models" / "embeddings"))
        resolve_roots = getattr(self.settings, "resolved_model_roots", None)
        roots = resolve_roots() if callable(resolve_roots) else []
        for root in roots:
            candidate = Path(root) / "embeddings"
            if candidate.is_dir() and str(candidate) not in dirs:
                dirs.append(str(candidate))
        return dirs

    # -- Engine

    @fsutil.errors_as(EngineError)
    def load_vae(self, paths: Sequence[str], device: torch.device, dtype: torch.dtype | None) -> ComfyVae:
        path_list = _paths(paths, "VAE")
        if len(path_list) != 1:
            raise EngineError("bad_args", f"load_vae takes exactly one path, got {len(path_list)}")
        path = path_list[0]
        device = as_device(device)
        self._check_device(device, None)
        comfy = self.prepare()
        self._check_device(device, comfy)
        what = f"VAE {path.name}"
        with _comfy_call(f"loading {what}"), _held_open([path], "VAE") as (checked,):
            try:
                sd, metadata = comfy.utils.load_torch_file(str(checked), safe_load=True, return_metadata=True)
            except Exception as exc:
                raise EngineError("model_error", f"{what}: cannot read the file: {_first_line(exc)}") from exc
            config = _sidecar_vae_config(path) or _inferred_vae_config(sd)
            kwargs: dict[str, Any] = {"sd": sd, "device": device, "dtype": dtype, "metadata": metadata}
            if config is not None:
                kwargs["config"] = config
            try:
                vae = comfy.sd.VAE(**kwargs)
            except NotImplementedError as exc:
                raise EngineError("model_error", f"{what}: {exc}") from exc
            except RuntimeError as exc:
                hint = "" if config is not None else (
                    f"; a KL VAE that is not SD-sized needs a config: put {path.stem}.json next to it with "
                    f'{{"params": {{"embed_dim": 4, "ddconfig": {{...}}}}}}')
                raise EngineError("model_error", f"{what}: ComfyUI cannot build it: {_first_line(exc)}{hint}") from exc
            try:
                vae.throw_exception_if_invalid()
            except Exception as exc:
                raise EngineError("model_error", f"{what}: ComfyUI does not recognise these weights as a VAE "
                                                 f"({_first_line(exc)})") from exc
            self._pin(vae.patcher, device, comfy)
        model = ComfyVae(vae, source=str(path))
        logger.info("comfy VAE loaded from %s (%d latent channels, %.1f MB, %s on %s)", path, model.info()["latent_channels"],
                    model.nbytes() / 1e6, model.dtype, model.device)
        return model

    @fsutil.errors_as(EngineError)
    def load_clip(self, paths: Sequence[str], clip_type: str, device: torch.device,
                  dtype: torch.dtype | None) -> ComfyClip:
        path_list = _paths(paths, "CLIP")
        device = as_device(device)
        self._check_device(device, None)
        comfy = self.prepare()
        self._check_device(device, comfy)
        name = str(clip_type or "sd1").strip().lower()
        member_name = _CLIP_TYPE_ALIASES.get(name, name.upper())
        clip_enum = getattr(comfy.sd.CLIPType, member_name, None)
        if clip_enum is None:
            known = sorted(set(_CLIP_TYPE_ALIASES) | {m.lower() for m in comfy.sd.CLIPType.__members__})
            raise EngineError("bad_args", f"clip_type {clip_type!r} is unknown to ComfyUI; use one of {', '.join(known)}")
        wanted = _CLIP_FILE_COUNTS.get(name)
        if wanted is not None and wanted != len(path_list):
            raise EngineError("bad_args", f"clip_type {name} takes {wanted} file(s), got {len(path_list)}")
        model_options: dict[str, Any] = {"load_device": device, "offload_device": device, "initial_device": device}
        if dtype is not None:
            model_options["dtype"] = dtype
        embeddings = self._embedding_directories(comfy)
        what = f"CLIP {', '.join(p.name for p in path_list)}"
        with _comfy_call(f"loading {what}"), _held_open(path_list, "CLIP") as checked:
            try:
                clip = comfy.sd.load_clip(ckpt_paths=[str(p) for p in checked], embedding_directory=embeddings,
                                          clip_type=clip_enum, model_options=model_options)
            except EngineError:
                raise
            except (NotImplementedError, RuntimeError, ValueError, KeyError) as exc:
                raise EngineError("model_error", f"{what}: ComfyUI cannot load it as {member_name}: "
                                                 f"{_first_line(exc)}") from exc
            model = ComfyClip(comfy, clip, clip_type=name, comfy_clip_type=member_name,
                              source=", ".join(str(p) for p in path_list), embedding_directories=embeddings,
                              lora_cache_entries=self.lora_cache_entries)
        logger.info("comfy CLIP (%s, %s) loaded from %s (%.1f MB, %s on %s)", name, model.info()["model_class"],
                    model.source, model.nbytes() / 1e6, model.dtype, model.device)
        return model

    @staticmethod
    def _pin(patcher: Any, device: torch.device, comfy: SimpleNamespace) -> None:
        """Keep a model on its device: the daemon's registry, not comfy, decides residency."""
        if device.type == "cpu" or not hasattr(patcher, "offload_device"):
            return
        patcher.offload_device = device
        comfy.model_management.load_models_gpu([patcher])

    def close(self) -> None:
        modules = _STATE.get("modules")
        if modules is None:
            return
        with _COMFY_LOCK, _keep_root_logging():
            try:
                modules.model_management.soft_empty_cache()
            except Exception:
                logger.debug("comfy soft_empty_cache failed", exc_info=True)
