"""ComfyUI custom-node entry point of Luna Daemon (this repo cloned into ComfyUI/custom_nodes).

ComfyUI imports this file as a package and reads ``NODE_CLASS_MAPPINGS`` /
``NODE_DISPLAY_NAME_MAPPINGS``. Importing it starts nothing and opens no socket: the nodes
talk to the Luna Daemon only when they run. When a requirement is missing, the error is
logged with what to install and the mappings stay empty, so ComfyUI keeps working.

``luna_daemon`` is imported by its absolute name (installed with ``pip install -e .``, or
from this folder, which is then appended to ``sys.path``); this file never imports it
relatively, so importing the file under another package name (pytest imports a rootdir
``__init__.py`` as a package) does not create a second copy of ``luna_daemon``.
"""

import logging
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_log = logging.getLogger("luna_daemon.comfy")


def _load():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        import luna_daemon
    except ImportError:
        if here not in sys.path:
            sys.path.append(here)
    import luna_daemon

    # realpath: a checkout linked into custom_nodes is still the package's own folder.
    where = os.path.dirname(os.path.dirname(os.path.realpath(luna_daemon.__file__)))
    if os.path.normcase(where) != os.path.normcase(os.path.realpath(here)):
        _log.warning("Luna Daemon nodes: using the luna_daemon package installed at %s, not the one in %s", where, here)
    from luna_daemon.comfy_nodes import NODE_CLASS_MAPPINGS as classes
    from luna_daemon.comfy_nodes import NODE_DISPLAY_NAME_MAPPINGS as names

    return classes, names


try:
    _classes, _names = _load()
except Exception as _exc:  # noqa: BLE001 - never break ComfyUI's start-up
    _log.error("Luna Daemon nodes are disabled: %s", _exc)
else:
    NODE_CLASS_MAPPINGS.update(_classes)
    NODE_DISPLAY_NAME_MAPPINGS.update(_names)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
