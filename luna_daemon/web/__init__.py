"""The monitor: a small web app served by the host process on ``monitor_port`` (19285).

``Monitor(host)`` (in :mod:`luna_daemon.web.monitor`) serves the dashboard, ``/ws`` live
events, ``/healthz``, ``/metrics`` and ``/api/*`` from one ``websockets`` server running
on its own thread. It lives as long as the host, so status and logs stay reachable while
the daemon is stopped or failed. See ``docs/monitor.md``.
"""

from __future__ import annotations

__all__ = ["Monitor", "MonitorError"]


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for package data) must not pull websockets in.
    if name in __all__:
        from luna_daemon.web import monitor

        return getattr(monitor, name)
    raise AttributeError(name)
