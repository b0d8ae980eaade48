"""One worker thread per loaded model (split out of the registry, which owns one per entry).

What a caller can rely on: calls run one at a time on the model's thread inside
``torch.inference_mode()``; the queue is bounded (``busy`` when full); a call whose future
was cancelled while queued never runs; ``shutdown`` keeps one deadline and abandons a
thread stuck in C code instead of waiting for it."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from typing import Any, Callable

import torch

from luna_daemon.protocol import ErrorCode, LunaError

log = logging.getLogger(__name__)


class ModelExecutor:
    """One worker thread per loaded model with a bounded queue.

    GPU work is serial per model anyway; one thread also makes engine objects (which are
    not thread-safe, e.g. ComfyUI's) safe to share between clients.
    """

    _STOP = object()

    def __init__(self, name: str, queue_size: int):
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name=f"luna-exec-{name}", daemon=True)
        self.running = 0
        self.completed = 0  # calls that ran (ok or failed)
        self.cancelled = 0  # calls skipped because their client went away
        # _end_lock orders submit / stop / thread end: nothing is queued once a stop began
        # (behind _STOP it would wait forever), and on_late_exit runs exactly once.
        self._end_lock = threading.Lock()
        self._closing = False       # no new calls
        self._stop_queued = False   # _STOP is in the queue
        self._abandoned = False     # shutdown() gave up waiting; queued calls fail
        self._ended = False
        self._on_late_exit: Callable[[], None] | None = None
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._end_lock:
            if self._closing:
                raise LunaError(ErrorCode.NOT_FOUND, "the model is being unloaded; load it again")
            try:
                self._q.put_nowait((fut, fn))
            except queue.Full:
                raise LunaError(ErrorCode.BUSY, f"model queue is full ({self._q.maxsize} waiting); retry later") from None
        return fut

    @property
    def depth(self) -> int:
        return self._q.qsize() + self.running

    def _run(self) -> None:
        try:
            while True:
                item = self._q.get()
                if item is self._STOP:
                    return
                if self._abandoned:
                    _fail_unrun(item)
                    return
                fut, fn = item
                if not fut.set_running_or_notify_cancel():
                    self.cancelled += 1  # cancelled while queued: the client went away
                    continue
                self.running = 1
                try:
                    with torch.inference_mode():
                        result = fn()
                except BaseException as exc:  # delivered to the waiting request
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
                finally:
                    self.running = 0
                    self.completed += 1
                    del item, fut, fn  # drop references to tensors before waiting again
        finally:
            self._end()

    def _end(self) -> None:
        """The thread is ending: fail what is still queued, run the late exit hook."""
        with self._end_lock:
            self._ended = True
            late, self._on_late_exit = self._on_late_exit, None
        while True:
            try:
                _fail_unrun(self._q.get_nowait())
            except queue.Empty:
                break
        if late is not None:
            try:
                late()
            except Exception:
                log.exception("releasing an abandoned model failed")

    def request_stop(self) -> None:
        """Begin a shutdown without waiting: no new calls, the thread ends after the queued
        ones. Lets many executors wind down in parallel before each is joined."""
        with self._end_lock:
            self._closing = True
            if self._stop_queued:
                return
            try:
                self._q.put_nowait(self._STOP)
                self._stop_queued = True
            except queue.Full:
                pass  # shutdown() queues it under its deadline as room appears

    def shutdown(self, timeout: float | None = None, on_late_exit: Callable[[], None] | None = None) -> bool:
        """Finish queued work and end the thread, all within ``timeout`` seconds (one deadline).

        True if the thread ended. False if a call was still running at the deadline: the
        thread is then *abandoned* -- a call inside C code cannot be interrupted, and as a
        daemon thread it does not hold up interpreter exit. Calls still queued fail with
        ``not_found`` instead of running, ``on_late_exit`` runs on that thread once the
        stuck call returns, and nothing waits for it any more."""
        end = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if end is None else max(0.0, end - time.monotonic())

        with self._end_lock:
            self._closing = True
            queued, self._stop_queued = self._stop_queued, True
        if not queued:
            # put() blocks while the queue is full of pending work; that work is what
            # we wait for anyway, so a blocking put under the same deadline is right.
            try:
                self._q.put(self._STOP, timeout=left())
            except queue.Full:
                pass  # still full at the deadline: abandoned below
        self._thread.join(left())
        with self._end_lock:
            if self._ended:
                return True
            self._abandoned = True
            self._on_late_exit = on_late_exit
        try:
            self._q.put_nowait(self._STOP)  # wakes the thread should it be idle by now
        except queue.Full:
            pass  # busy: it checks ``_abandoned`` after the running call
        return False


def _fail_unrun(item: Any) -> None:
    """A queued call that will never run: its waiting request gets a typed error."""
    if item is ModelExecutor._STOP:
        return
    fut = item[0]
    if fut.set_running_or_notify_cancel():
        fut.set_exception(LunaError(ErrorCode.NOT_FOUND, "the model was unloaded before this call ran; load it again"))
