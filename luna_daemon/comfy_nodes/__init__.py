"""Luna Daemon's ComfyUI nodes and proxy VAE / CLIP objects.

Importing this package is cheap: it checks that the packages the nodes need at run time
are installed (without importing them) and defines the node classes; it starts nothing
and opens no socket. The repo-root ``__init__.py`` (ComfyUI's custom-node entry) exports
:data:`NODE_CLASS_MAPPINGS` / :data:`NODE_DISPLAY_NAME_MAPPINGS` from here.
"""

from __future__ import annotations

import importlib.util
import sys


def missing_dependencies() -> list[str]:
    """Requirements of the nodes that this Python lacks (names as pip knows them)."""
    missing = []
    # The config file reader: tomllib from Python 3.11 on, the tomli package before.
    if sys.version_info < (3, 11) and importlib.util.find_spec("tomli") is None:
        missing.append("tomli")
    for module, package in (("torch", "torch"), ("numpy", "numpy"), ("safetensors", "safetensors"),
                            ("platformdirs", "platformdirs"), ("orjson", "orjson")):
        if importlib.util.find_spec(module) is None:
            missing.append(package)
    return missing


_MISSING = missing_dependencies()
if _MISSING:
    raise ImportError("Luna Daemon nodes need " + ", ".join(_MISSING) + " in ComfyUI's Python: run "
                      "`<ComfyUI python> -m pip install -e <this repo>` (or the start_tray_daemon launcher's venv)")

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "missing_dependencies"]
