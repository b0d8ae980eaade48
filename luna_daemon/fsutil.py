"""Files written so that a reader never sees half of them (uploads, autostart entries)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path`` and move it over ``path``.

    The temporary name is unique per thread, so concurrent writers of one path never
    share it; it is removed if anything fails."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
