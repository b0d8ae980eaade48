"""Engines: the code that actually loads and runs VAE / CLIP weights.

``select_engine(settings)`` picks one: ``comfy`` when ComfyUI's package is importable
(exact parity with native nodes), ``standalone`` (diffusers + transformers) otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

from luna_daemon.models.engines.base import Engine, EngineError

log = logging.getLogger(__name__)


def detect_comfyui_root(settings) -> Path | None:
    """See :meth:`Settings.comfyui_path` (kept here for callers of the engine layer)."""
    return settings.comfyui_path()


def select_engine(settings) -> Engine:
    """The engine named by ``settings.engine``; ``auto`` prefers ComfyUI's own code."""
    choice = settings.engine
    if choice in ("auto", "comfy"):
        root = detect_comfyui_root(settings)
        if root is not None or choice == "comfy":
            try:
                from luna_daemon.models.engines.comfy import ComfyEngine
            except ImportError as exc:
                if choice == "comfy":
                    raise EngineError("model_error", f"engine=comfy but the ComfyUI engine is unavailable: {exc}") from None
            else:
                engine = ComfyEngine(settings, root)
                if choice == "auto":
                    # A detected ComfyUI may still not import here (e.g. its torchvision
                    # against this torch): auto falls back; engine=comfy reports it.
                    try:
                        engine.prepare()
                    except EngineError as exc:
                        log.warning("ComfyUI at %s is not usable (%s); using the standalone engine", root, exc.message)
                        from luna_daemon.models.engines.standalone import StandaloneEngine

                        return StandaloneEngine()
                return engine
        if choice == "comfy":
            raise EngineError("model_error", "engine=comfy but no ComfyUI was found: set comfyui_root or COMFYUI_PATH")
    from luna_daemon.models.engines.standalone import StandaloneEngine

    return StandaloneEngine()
