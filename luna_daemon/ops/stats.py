"""Request statistics: counters and latency histograms per registered op (read by the
``status`` op and the monitor's /metrics)."""

from __future__ import annotations

import bisect
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from luna_daemon.ops.table import _OPS

# Requests for an op that does not exist are counted under this one label: their names are
# never stored (a client could otherwise grow the stats, status and /metrics without bound).
UNKNOWN_OP_LABEL = "(unknown)"

# Seconds; Prometheus-style cumulative buckets for request latency.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Stats:
    """Request counters and latency histograms (read by status and /metrics).

    ``record`` is on every request's path, so it is O(1): latency counts are stored per
    bucket (not cumulative; see ``cumulative_buckets``) and the requests-per-minute
    window keeps one counter per second. Keys are bounded: an op name that is not a
    registered op is recorded as ``UNKNOWN_OP_LABEL``, and outcomes are ``ok``,
    ``cancelled`` or an error code.
    """

    started: float = field(default_factory=time.time)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    latency_buckets: dict[str, list[int]] = field(default_factory=dict)  # len(LATENCY_BUCKETS) + 1 (+Inf)
    latency_sum: dict[str, float] = field(default_factory=dict)
    latency_count: dict[str, int] = field(default_factory=dict)
    _per_second: collections.deque = field(default_factory=collections.deque, repr=False)  # [second, count]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, op: str, outcome: str, seconds: float) -> None:
        if op not in _OPS:
            op = UNKNOWN_OP_LABEL
        sec = int(time.time())
        idx = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        key = (op, outcome)
        requests, sums, counts, ps = self.requests, self.latency_sum, self.latency_count, self._per_second
        with self.lock:
            requests[key] = requests.get(key, 0) + 1
            b = self.latency_buckets.get(op)
            if b is None:
                b = self.latency_buckets[op] = [0] * (len(LATENCY_BUCKETS) + 1)
            b[idx] += 1
            sums[op] = sums.get(op, 0.0) + seconds
            counts[op] = counts.get(op, 0) + 1
            last = ps[-1] if ps else None
            if last is not None and last[0] == sec:
                last[1] += 1
            else:
                ps.append([sec, 1])
                while ps and ps[0][0] < sec - 60:
                    ps.popleft()

    def cumulative_buckets(self, op: str) -> list[tuple[float, int]]:
        """Prometheus-style (upper bound, cumulative count) pairs, ending with +Inf."""
        with self.lock:
            counts = list(self.latency_buckets.get(op, []))
        out, total = [], 0
        for edge, n in zip((*LATENCY_BUCKETS, float("inf")), counts):
            total += n
            out.append((edge, total))
        return out

    def latency(self) -> dict[str, dict[str, Any]]:
        """Per op: cumulative ``buckets`` ``[[upper bound, count], ...]`` (the last bound
        None = +Inf) and ``sum`` (seconds): the histogram a host's /metrics shows for an
        instance it reads through the ``status`` op (a child process)."""
        with self.lock:
            raw = {op: (list(b), self.latency_sum.get(op, 0.0)) for op, b in self.latency_buckets.items()}
        out: dict[str, dict[str, Any]] = {}
        for op, (counts, total) in raw.items():
            acc, buckets = 0, []
            for edge, n in zip((*LATENCY_BUCKETS, None), counts):
                acc += n
                buckets.append([edge, acc])
            out[op] = {"buckets": buckets, "sum": total}
        return out

    def snapshot(self) -> dict[str, Any]:
        now = int(time.time())
        with self.lock:
            total = sum(self.requests.values())
            errors = sum(n for (op, oc), n in self.requests.items() if oc != "ok")
            per_minute = sum(n for sec, n in self._per_second if sec > now - 60)
            by_op: dict[str, dict[str, int]] = {}
            for (op, oc), n in self.requests.items():
                by_op.setdefault(op, {})[oc] = n
        return {"total": total, "errors": errors, "per_minute": per_minute, "by_op": by_op}
