"""The dashboard's charts: a bounded, in-memory history of every instance's numbers.

A sampler thread reads the host every ``SAMPLE_INTERVAL`` seconds (the primary's live
objects, each child's last :class:`~luna_daemon.web.instances.ChildPoller` answer: never
a blocking call) and keeps one sample per tick:

``{"t": unix time, "clients": n, "queue": n,
   "mem": {device: {"weights", "other", "free", "total"}},   # bytes; None where unknown
   "ops": {op: {"rps", "p50", "p95"}}}``                       # per second; milliseconds

summed over every instance. ``rps`` and the latency quantiles are over the tick just
ended (from the difference of the request counters and latency histograms, so a
restarted instance, whose counters start again at 0, is handled); an op without
requests in a tick is left out of that sample.

What a caller can rely on (the bound stated in docs/monitor.md):

* At most ``RECENT`` samples at full resolution (1 h at 5 s) plus ``OLD`` downsampled
  ones, each merging ``FACTOR`` consecutive samples (5 h at 1 min): about 6 h in at most
  1020 samples, whatever the daemon does. A merged sample holds the mean of its samples,
  except ``queue`` and ``p95``, which hold their maximum (a peak must not vanish).
* :meth:`History.samples` is oldest first and JSON-safe; listeners get each new sample
  on the sampler thread and must not block.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from luna_daemon.web import views
from luna_daemon.web.instances import ChildPoller, instance_items, is_primary

log = logging.getLogger("luna_daemon.web.monitor")

SAMPLE_INTERVAL = 5.0   # seconds between samples (tests shorten it before the monitor starts)
RECENT = 720            # full-resolution samples kept (1 h at 5 s)
FACTOR = 12             # samples merged into one old sample (1 min at 5 s)
OLD = 300               # downsampled samples kept (5 h at 1 min)
_MAX_KEYS = ("queue", "p95")


def quantile(q: float, cumulative: list[tuple[float | None, int]]) -> float | None:
    """The ``q`` quantile (seconds) of a cumulative histogram ``[(upper bound, count), ...]``
    ending with the +Inf bound (None), interpolated linearly inside the bucket as
    Prometheus' ``histogram_quantile`` does; None for an empty histogram. A rank in the
    +Inf bucket is reported as the highest finite bound (all that is known about it)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0
    for edge, count in cumulative:
        if count >= rank and count > below:
            if edge is None:
                return lower
            return lower + (edge - lower) * (rank - below) / (count - below)
        if edge is not None:
            lower = edge
        below = count
    return lower


def merge(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One sample standing for ``samples`` (consecutive, oldest first): the mean of every
    number (``queue`` and ``p95``: the maximum), the time of the last one."""
    def combine(values: list[Any], key: str) -> Any:
        if all(isinstance(v, dict) for v in values):
            keys: dict[str, None] = {}
            for v in values:
                keys.update(dict.fromkeys(v))
            return {k: combine([v[k] for v in values if k in v], k) for k in keys}
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not nums:
            return None
        return max(nums) if key in _MAX_KEYS else sum(nums) / len(nums)

    out = combine(samples, "")
    out["t"] = samples[-1]["t"]
    return out


def _finite(buckets: Any) -> list[tuple[float | None, int]]:
    """A ``Stats.latency()`` histogram's buckets as (bound, cumulative count) pairs."""
    out = []
    for pair in buckets or []:
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], int):
            out.append((float(pair[0]) if isinstance(pair[0], (int, float)) else None, pair[1]))
    return out


class History:
    """The sampler and its two rings; see the module docstring."""

    def __init__(self, host: Any, children: ChildPoller | None = None, *, interval: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.host = host
        self.children = children
        self.interval = float(interval if interval is not None else SAMPLE_INTERVAL)
        self.clock = clock
        self._lock = threading.Lock()
        self._recent: collections.deque[dict[str, Any]] = collections.deque()
        self._old: collections.deque[dict[str, Any]] = collections.deque(maxlen=OLD)
        self._pending: list[dict[str, Any]] = []   # left the recent ring, waiting to be merged
        # Per (instance, op): the last request count and cumulative latency counts.
        self._prev: dict[tuple[str, str], tuple[int, list[int]]] = {}
        self._prev_t: float | None = None
        self._prev_instances: set[str] = set()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ reading
    def samples(self) -> list[dict[str, Any]]:
        """Every kept sample, oldest first (downsampled ones before the recent ones)."""
        with self._lock:
            return [*self._old, *self._recent]

    def describe(self) -> dict[str, Any]:
        """The snapshot's ``history``: the samples and the bounds the page trims to."""
        return {"interval": self.interval, "window": self.interval * (RECENT + FACTOR * OLD),
                "samples": self.samples()}

    def subscribe(self, fn: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``fn(sample)`` for each new sample; returns the unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    # ------------------------------------------------------------ sampling
    def add(self, sample: dict[str, Any]) -> None:
        """Keep ``sample`` (the newest), downsampling what leaves the recent ring."""
        with self._lock:
            self._recent.append(sample)
            while len(self._recent) > RECENT:
                self._pending.append(self._recent.popleft())
                if len(self._pending) >= FACTOR:
                    self._old.append(merge(self._pending))
                    self._pending = []
        for fn in list(self._listeners):
            try:
                fn(sample)
            except Exception:  # a listener bug must not stop the sampler
                log.exception("history listener failed")

    def sample(self) -> dict[str, Any]:
        """Read the host once, keep and return the sample (also called by tests)."""
        now = self.clock()
        dt = (now - self._prev_t) if self._prev_t is not None else None
        self._prev_t = now
        clients = queue = 0
        mem: dict[str, dict[str, Any]] = {}
        ops: dict[str, dict[str, Any]] = {}
        seen: set[tuple[str, str]] = set()
        current: set[str] = set()  # instances that answered this time
        per_op: dict[str, tuple[int, list[int], list[float | None]]] = {}
        for name, inst in instance_items(self.host):
            numbers = self._numbers(name, inst)
            if numbers is None:
                continue
            current.add(name)
            clients += numbers["clients"]
            queue += numbers["queue"]
            for dev, d in numbers["devices"].items():
                self._add_memory(mem, dev, d)
            for op, (count, buckets) in numbers["ops"].items():
                key = (name, op)
                seen.add(key)
                prev = self._prev.get(key)
                self._prev[key] = (count, [c for _, c in buckets])
                if dt is None or name not in self._prev_instances:
                    continue  # first look at this instance: its counters are the baseline
                # An op first seen now had no requests at the previous sample.
                pcount, pcum = prev if prev is not None else (0, [0] * len(buckets))
                if count < pcount or len(pcum) != len(buckets):  # restarted: counters from 0
                    pcount, pcum = 0, [0] * len(buckets)
                n, cum, edges = per_op.get(op, (0, [0] * len(buckets), [e for e, _ in buckets]))
                if len(cum) != len(buckets):
                    continue
                per_op[op] = (n + count - pcount, [a + c - p for a, (_, c), p in zip(cum, buckets, pcum)], edges)
        for key in [k for k in self._prev if k not in seen]:
            del self._prev[key]  # a stopped instance: its next counters start from scratch
        self._prev_instances = current
        for op, (n, cum, edges) in sorted(per_op.items()):
            if n <= 0 or not dt or dt <= 0:
                continue
            hist = list(zip(edges, cum))
            p50, p95 = quantile(0.5, hist), quantile(0.95, hist)
            ops[op] = {"rps": n / dt, "p50": None if p50 is None else p50 * 1000.0,
                       "p95": None if p95 is None else p95 * 1000.0}
        for d in mem.values():
            used, total, weights = d.pop("_used"), d["total"], d["weights"]
            d["other"] = max(0, used - weights) if used is not None else None
            if d.get("free") is None:
                d["free"] = max(0, total - used) if used is not None and total is not None else None
        out = {"t": now, "clients": clients, "queue": queue, "mem": mem, "ops": ops}
        self.add(out)
        return out

    def _numbers(self, name: str, inst: Any) -> dict[str, Any] | None:
        """One instance's clients, queue, devices and per-op (count, latency buckets)."""
        if is_primary(self.host, inst):
            reg, svc = inst.registry, inst.service
            if reg is None or svc is None:
                return None
            snap = inst.snapshot()
            by_dev = reg.bytes_by_device()
            devices = {dev: {**views.device_memory(dev), "models_bytes": by_dev.get(dev, 0)} for dev in views.devices()}
            counts = {op: sum(by.values()) for op, by in svc.stats.snapshot()["by_op"].items()}
            latency = svc.stats.latency()
            queue = sum(e.executor.depth for e in reg.entries())
            clients = snap.get("clients") or 0
        else:
            cached = self.children.get(name) if self.children is not None else None
            if cached is None or getattr(inst, "state", None) != "running":
                return None
            st = cached.get("status") or {}
            devices = st.get("devices") if isinstance(st.get("devices"), dict) else {}
            by_op = (st.get("requests") or {}).get("by_op") or {}
            counts = {op: sum(v for v in by.values() if isinstance(v, int)) for op, by in by_op.items()
                      if isinstance(by, dict)}
            latency = st.get("latency") if isinstance(st.get("latency"), dict) else {}
            queue = st.get("queue") if isinstance(st.get("queue"), int) else 0
            clients = st.get("clients") if isinstance(st.get("clients"), int) else 0
        ops = {op: (count, _finite((latency.get(op) or {}).get("buckets"))) for op, count in counts.items()}
        return {"clients": clients, "queue": queue, "devices": devices, "ops": ops}

    @staticmethod
    def _add_memory(mem: dict[str, dict[str, Any]], dev: str, d: Any) -> None:
        if not isinstance(d, dict):
            return
        cur = mem.setdefault(dev, {"weights": 0, "_used": None, "total": None, "free": None})
        cur["weights"] += int(d.get("models_bytes") or 0)
        used, total = d.get("used"), d.get("total")
        if isinstance(used, int):
            # cpu: each instance's process memory adds up; a GPU's "used" is the whole device.
            cur["_used"] = (cur["_used"] or 0) + used if dev == "cpu" else max(cur["_used"] or 0, used)
        if isinstance(total, int):
            cur["total"] = max(cur["total"] or 0, total)
        if dev == "cpu" and cur["free"] is None:
            try:
                import psutil

                cur["free"] = int(psutil.virtual_memory().available)  # RAM, not total - our RSS
            except Exception:  # noqa: BLE001 - unknown then; the chart leaves it out
                cur["free"] = None

    # ------------------------------------------------------------ thread
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="luna-monitor-history", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - e.g. mid daemon teardown; next tick retries
                log.debug("history sample failed: %s", exc)
            if self._stop.wait(self.interval):
                return
