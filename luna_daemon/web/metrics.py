"""``/metrics``: Prometheus text exposition of the daemon's state and request statistics.

A custom collector reads the live daemon on every scrape (nothing is double-counted or
cached). What a scraper can rely on:

* ``luna_daemon_up`` (1 only while running) and ``luna_daemon_state{state=...}`` (one
  series per state, exactly one of them 1) are always present, even while stopped.
* ``luna_daemon_requests_total{op,outcome}`` and the histogram
  ``luna_daemon_request_duration_seconds{op}`` come from the daemon's request stats. The
  daemon builds new stats on every start, so these counters reset on a daemon restart
  (Prometheus' ``rate()`` handles resets); while stopped the last values are kept.
* Gauges: uptime, queue depth, in-flight requests, connected clients, models loaded (by
  kind), model bytes per device, device memory, LoRA cache bytes; counters for LoRA cache
  hits/misses (0 when the daemon has no LoRA cache).
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from luna_daemon import __version__
from luna_daemon.web import views

CONTENT_TYPE = CONTENT_TYPE_LATEST
_STATES = ("stopped", "starting", "running", "stopping", "error")


def _bucket_label(edge: float) -> str:
    return "+Inf" if edge == float("inf") else repr(float(edge))


def _cumulative(stats: Any, op: str) -> list[tuple[float, int]]:
    """(upper bound, cumulative count) pairs ending with +Inf, from the daemon's Stats."""
    if hasattr(stats, "cumulative_buckets"):
        return list(stats.cumulative_buckets(op))
    # Older Stats kept cumulative counts per LATENCY_BUCKETS edge and no +Inf bucket.
    from luna_daemon.service import LATENCY_BUCKETS

    with stats.lock:
        counts = list(stats.latency_buckets.get(op, []))
        total = stats.latency_count.get(op, 0)
    return [*zip(LATENCY_BUCKETS, counts), (float("inf"), total)]


class DaemonCollector:
    """prometheus_client collector over a Host; ``monitor_clients`` is a callable."""

    def __init__(self, host: Any, monitor_clients: Any = lambda: 0):
        self.host = host
        self.monitor_clients = monitor_clients
        self._last_stats: Any = None  # keeps counters visible while the daemon is stopped

    def describe(self) -> list:
        # Empty: no registration-time collect() call against a daemon that may be busy.
        return []

    def collect(self) -> Iterator[Metric]:
        d = self.host.daemon
        snap = d.snapshot()
        reg, svc, lora = d.registry, d.service, d.lora_cache
        state = snap["state"]

        yield GaugeMetricFamily("luna_daemon_up", "1 while the daemon is running (answered a protocol ping), else 0.",
                                value=1.0 if state == "running" else 0.0)
        g = GaugeMetricFamily("luna_daemon_state", "Daemon lifecycle state (1 for the current state).", labels=["state"])
        for s in _STATES:
            g.add_metric([s], 1.0 if s == state else 0.0)
        yield g
        info = InfoMetricFamily("luna_daemon", "Daemon build and engine.")
        info.add_metric([], {"version": __version__, "engine": str(snap.get("engine") or ""), "service": self.host.settings.service})
        yield info
        yield GaugeMetricFamily("luna_daemon_uptime_seconds", "Seconds since the daemon became running (0 when not running).",
                                value=float(snap.get("uptime") or 0.0))

        if svc is not None:
            self._last_stats = svc.stats
        stats = self._last_stats
        requests = CounterMetricFamily("luna_daemon_requests", "Protocol requests handled, by op and outcome (ok or an error code).",
                                       labels=["op", "outcome"])
        hist = HistogramMetricFamily("luna_daemon_request_duration_seconds", "Request handling time by op.", labels=["op"])
        if stats is not None:
            with stats.lock:
                counts = dict(stats.requests)
                sums = dict(stats.latency_sum)
                ops = sorted(stats.latency_buckets)
            for (op, outcome), n in sorted(counts.items()):
                requests.add_metric([op, outcome], float(n))
            for op in ops:
                b = [(_bucket_label(edge), float(c)) for edge, c in _cumulative(stats, op)]
                hist.add_metric([op], b, sum_value=float(sums.get(op, 0.0)))
        yield requests
        yield hist

        entries = reg.entries() if reg is not None else []
        yield GaugeMetricFamily("luna_daemon_queue_depth", "Calls queued or running on model executors.",
                                value=float(sum(e.executor.depth for e in entries)))
        yield GaugeMetricFamily("luna_daemon_in_flight_requests", "Requests being handled right now.",
                                value=float(snap.get("in_flight") or 0))
        yield GaugeMetricFamily("luna_daemon_connected_clients", "Open protocol connections (ComfyUI instances, CLI).",
                                value=float(snap.get("clients") or 0))
        loaded = GaugeMetricFamily("luna_daemon_models_loaded", "Loaded models by kind.", labels=["kind"])
        by_kind: dict[str, int] = {"vae": 0, "clip": 0}
        for e in entries:
            by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
        for kind, n in sorted(by_kind.items()):
            loaded.add_metric([kind], float(n))
        yield loaded

        by_dev = reg.bytes_by_device() if reg is not None else {}
        model_bytes = GaugeMetricFamily("luna_daemon_model_bytes", "Bytes of loaded model weights per device.", labels=["device"])
        mem_used = GaugeMetricFamily("luna_device_memory_used_bytes", "Device memory in use (CPU: process RSS).", labels=["device"])
        mem_total = GaugeMetricFamily("luna_device_memory_total_bytes", "Device memory size.", labels=["device"])
        for dev in views.devices():
            model_bytes.add_metric([dev], float(by_dev.get(dev, 0)))
            mem = views.device_memory(dev)
            if mem["used"] is not None:
                mem_used.add_metric([dev], float(mem["used"]))
            if mem["total"] is not None:
                mem_total.add_metric([dev], float(mem["total"]))
        for dev, n in by_dev.items():
            if dev not in views.devices():
                model_bytes.add_metric([dev], float(n))
        yield model_bytes
        yield mem_used
        yield mem_total

        ls = views.lora_stats(lora) or {"bytes": 0, "hits": 0, "misses": 0}
        yield GaugeMetricFamily("luna_daemon_lora_cache_bytes", "Bytes held by the LoRA cache.", value=float(ls["bytes"]))
        yield CounterMetricFamily("luna_daemon_lora_cache_hits", "LoRA cache hits.", value=float(ls["hits"]))
        yield CounterMetricFamily("luna_daemon_lora_cache_misses", "LoRA cache misses.", value=float(ls["misses"]))
        yield GaugeMetricFamily("luna_monitor_websocket_clients", "Dashboard WebSocket connections.",
                                value=float(self.monitor_clients()))


class Metrics:
    """A private registry holding one DaemonCollector (never the global default registry,
    so two monitors in one process -- tests -- never collide)."""

    def __init__(self, host: Any, monitor_clients: Any = lambda: 0):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = DaemonCollector(host, monitor_clients)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The exposition text (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
