"""Entry point: ``python luna_daemon/tray_app.py`` starts the Luna Daemon tray app.

Also reachable as ``luna-daemon tray`` and ``python -m luna_daemon tray``; the launchers
(``start_tray_daemon.*``) use those. Exit code: 0 after Exit, 1 if another instance runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python put luna_daemon/ itself first on sys.path, which would make
    # its modules importable under bare names (``settings``, ``models``, ``tray``...) and
    # shadow real packages. Replace it with the repo root so ``import luna_daemon`` works
    # from a plain checkout, installed or not.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))


def main() -> int:
    from luna_daemon.tray.app import main as tray_main

    return tray_main()


if __name__ == "__main__":
    sys.exit(main())
