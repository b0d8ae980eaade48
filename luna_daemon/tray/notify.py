"""Desktop notifications for the tray: rate-limited, switchable, never fatal.

What a caller can rely on:

* :meth:`Notifier.alert` (errors / warnings from the daemon) shows a notification only
  when ``settings.notifications`` is on, the backend can notify, the same text was not
  shown within ``repeat_after`` seconds, and fewer than ``burst`` alerts were shown in
  the last ``window`` seconds. It returns whether it showed one.
* :meth:`Notifier.reply` (the answer to something the user just asked for: Check Status,
  a second launch) skips the switch and the rate limit -- the user is waiting for it --
  but still needs a backend that can notify.
* Nothing here raises: a backend without notifications (pystray's ``HAS_NOTIFICATION``
  false, e.g. xorg and macOS) or a failing notification service is logged and skipped.
  Every notification is also written to the log, so nothing is lost where none shows.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Notifier:
    def __init__(
        self,
        icon: Any,
        enabled: Callable[[], bool] = lambda: True,
        *,
        repeat_after: float = 60.0,
        burst: int = 4,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.icon = icon
        self.enabled = enabled
        self.repeat_after, self.burst, self.window = repeat_after, burst, window
        self.clock = clock
        self._last_by_text: dict[str, float] = {}
        self._recent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.shown = 0
        self.suppressed = 0

    @property
    def supported(self) -> bool:
        # Checked at run time: the class attribute differs per pystray backend.
        return bool(self.icon is not None and getattr(type(self.icon), "HAS_NOTIFICATION", False))

    def alert(self, message: str, title: str = "Luna Daemon") -> bool:
        """An error or warning. Rate-limited; obeys the notifications setting."""
        log.warning("notification: %s: %s", title, message)
        if not self.enabled():
            return False
        now = self.clock()
        key = f"{title}\n{message}"
        with self._lock:
            while self._recent and now - self._recent[0] > self.window:
                self._recent.popleft()
            last = self._last_by_text.get(key)
            if (last is not None and now - last < self.repeat_after) or len(self._recent) >= self.burst:
                self.suppressed += 1
                log.debug("notification suppressed by rate limit: %s", message)
                return False
            self._last_by_text[key] = now
            self._recent.append(now)
            if len(self._last_by_text) > 256:  # bounded: forget the oldest texts
                for k, _ in sorted(self._last_by_text.items(), key=lambda kv: kv[1])[:128]:
                    del self._last_by_text[k]
        return self._show(message, title)

    def reply(self, message: str, title: str = "Luna Daemon", *, logged: str | None = None) -> bool:
        """The answer to a user action. Not rate-limited; shown whenever the backend can.
        ``logged``: what the log gets instead of ``message`` (one holding a secret)."""
        log.info("notification: %s: %s", title, message if logged is None else logged)
        return self._show(message, title)

    def _show(self, message: str, title: str) -> bool:
        if not self.supported:
            log.debug("this tray backend has no notifications; logged only")
            return False
        try:
            self.icon.notify(message, title)
        except Exception as exc:  # no notification daemon, backend quirk: never fatal
            log.info("could not show a notification: %s", exc)
            return False
        self.shown += 1
        return True
