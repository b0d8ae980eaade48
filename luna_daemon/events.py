"""A tiny thread-safe event bus.

The daemon emits events (``state``, ``model_loading``, ``model_loaded``,
``model_unloaded``, ``request_failed``, ``client_connected``, ``client_disconnected``,
``warning``, ``request``); faces (tray, monitor) subscribe. Subscribers run synchronously
on the emitting thread, so they must be quick and must not block: the monitor hands
events to bounded per-client queues, the tray schedules a redraw.

Every event carries a strictly increasing ``seq`` so that a consumer can detect gaps.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    type: str
    seq: int
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "seq": self.seq, "time": self.time, **self.data}


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Register ``fn``; returns a function that unsubscribes it (idempotent)."""
        with self._lock:
            self._subs.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subs:
                    self._subs.remove(fn)

        return unsubscribe

    def emit(self, type: str, **data: Any) -> Event:
        # seq is taken under the lock so delivery order equals seq order per thread.
        with self._lock:
            event = Event(type, next(self._seq), time.time(), data)
            subs = list(self._subs)
        for fn in subs:
            try:
                fn(event)
            except Exception:  # a broken face must never break the daemon
                log.exception("event subscriber %r failed on %s", fn, type)
        return event
