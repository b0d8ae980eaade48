"""``/metrics``: Prometheus text exposition of the daemon's state and request statistics.

A custom collector reads every instance of the host on every scrape. Every series has
an ``instance`` label (the instance's name; ``main`` for a single daemon). The primary
instance is read live from its in-process objects; a child instance (a supervised child
process) from the last ``status`` / ``ps`` answers the monitor's poller fetched through a
supervisor connection (at most ``health_interval`` old; a scrape never waits on a child).
What a scraper can rely on:

* ``luna_daemon_up`` (1 only while running) and ``luna_daemon_state{state=...}`` (one
  series per state, exactly one of them 1) are always present for every instance, even
  while stopped.
* ``luna_daemon_requests_total{op,outcome}`` and the histogram
  ``luna_daemon_request_duration_seconds{op}`` come from the daemon's request stats. The
  daemon builds new stats on every start, so these counters reset on a daemon restart
  (Prometheus' ``rate()`` handles resets); while stopped the last values are kept. A
  child's histogram appears only when its ``status`` answer carries ``latency``.
* Gauges: uptime, queue depth, in-flight requests, connected clients, models loaded (by
  kind), model bytes per device, device memory, LoRA cache bytes; counters for LoRA cache
  hits/misses (0 when the daemon has no LoRA cache).
* Memory saved (docs/monitor.md): ``luna_memory_saved_bytes``, ``luna_sharing_clients`` and
  ``luna_shared_models`` per instance (0 while it is down), ``luna_host_memory_saved_bytes``
  and ``luna_host_sharing_clients`` for the whole host (labelled with the primary's name).
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from luna_daemon import __version__
from luna_daemon.web import views
from luna_daemon.web.instances import ChildPoller, instance_items, is_primary

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


class _Source:
    """What one instance contributes to a scrape (numbers only, no live objects)."""

    def __init__(self, name: str):
        self.name = name
        self.state = "stopped"
        self.engine = ""
        self.service = ""
        self.uptime = 0.0
        self.requests: dict[tuple[str, str], float] = {}
        self.hist: list[tuple[str, list[tuple[str, float]], float]] = []  # (op, buckets, sum)
        self.queue = self.in_flight = self.clients = 0.0
        self.by_kind: dict[str, int] = {"vae": 0, "clip": 0}
        self.model_bytes: dict[str, float] = {}
        self.memory: dict[str, tuple[float | None, float | None]] = {}  # device -> (used, total)
        self.lora = {"bytes": 0, "hits": 0, "misses": 0}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class DaemonCollector:
    """prometheus_client collector over a Host; ``monitor_clients`` is a callable,
    ``children`` the monitor's :class:`ChildPoller` (None: the primary only)."""

    def __init__(self, host: Any, monitor_clients: Any = lambda: 0, children: ChildPoller | None = None):
        self.host = host
        self.monitor_clients = monitor_clients
        self.children = children
        self._last_stats: Any = None  # keeps the primary's counters visible while it is stopped

    def describe(self) -> list:
        # Empty: no registration-time collect() call against a daemon that may be busy.
        return []

    # ------------------------------------------------------------ sources
    def _primary(self, name: str, d: Any) -> _Source:
        src = _Source(name)
        snap = d.snapshot()
        reg, svc, lora = d.registry, d.service, d.lora_cache
        src.state = snap["state"]
        src.engine = str(snap.get("engine") or "")
        src.service = str(getattr(d, "settings", self.host.settings).service)
        src.uptime = float(snap.get("uptime") or 0.0)
        if svc is not None:
            self._last_stats = svc.stats
        stats = self._last_stats
        if stats is not None:
            with stats.lock:
                src.requests = {k: float(n) for k, n in stats.requests.items()}
                sums = dict(stats.latency_sum)
                ops = sorted(stats.latency_buckets)
            for op in ops:
                b = [(_bucket_label(edge), float(c)) for edge, c in _cumulative(stats, op)]
                src.hist.append((op, b, float(sums.get(op, 0.0))))
        entries = reg.entries() if reg is not None else []
        src.queue = float(sum(e.executor.depth for e in entries))
        src.in_flight = float(snap.get("in_flight") or 0)
        src.clients = float(snap.get("clients") or 0)
        for e in entries:
            src.by_kind[e.kind] = src.by_kind.get(e.kind, 0) + 1
        by_dev = reg.bytes_by_device() if reg is not None else {}
        here = views.devices()
        for dev in here:
            src.model_bytes[dev] = float(by_dev.get(dev, 0))
            mem = views.device_memory(dev)
            src.memory[dev] = (_num(mem["used"]), _num(mem["total"]))
        for dev, n in by_dev.items():
            src.model_bytes.setdefault(dev, float(n))
        src.lora = views.lora_stats(lora) or src.lora
        return src

    def _child(self, name: str, inst: Any) -> _Source:
        src = _Source(name)
        snap = inst.snapshot()
        src.state = snap.get("state", "stopped")
        src.engine = str(snap.get("engine") or "")
        src.service = str(snap.get("service") or getattr(getattr(inst, "settings", None), "service", ""))
        src.uptime = float(snap.get("uptime") or 0.0)
        cached = self.children.get(name) if self.children is not None else None
        if cached is None:
            return src
        st = cached["status"]
        for op, outcomes in ((st.get("requests") or {}).get("by_op") or {}).items():
            for outcome, n in (outcomes or {}).items():
                if _num(n) is not None:
                    src.requests[(str(op), str(outcome))] = float(n)
        for op, h in sorted((st.get("latency") or {}).items()):
            try:
                b = [("+Inf" if edge is None else _bucket_label(float(edge)), float(c)) for edge, c in h["buckets"]]
                src.hist.append((str(op), b, float(h["sum"])))
            except (TypeError, ValueError, KeyError):
                continue  # an answer we do not understand: leave that op out
        if src.state != "running":
            return src  # counters kept; what is loaded or in use is 0 while it is down
        src.queue = float(_num(st.get("queue")) or 0)
        src.in_flight = float(_num(st.get("in_flight")) or 0)
        src.clients = float(_num(st.get("clients")) or 0)
        for m in cached["models"]:
            kind, dev = str(m.get("kind") or ""), str(m.get("device") or "")
            src.by_kind[kind] = src.by_kind.get(kind, 0) + 1
            src.model_bytes[dev] = src.model_bytes.get(dev, 0.0) + float(_num(m.get("bytes")) or 0)
        for dev, mem in (st.get("devices") or {}).items():
            if isinstance(mem, dict):
                src.memory[str(dev)] = (_num(mem.get("used")), _num(mem.get("total")))
                src.model_bytes.setdefault(str(dev), 0.0)
        lc = st.get("lora_cache")
        if isinstance(lc, dict):
            src.lora = {k: int(_num(lc.get(k)) or 0) for k in ("bytes", "hits", "misses")}
        return src

    def sources(self) -> list[_Source]:
        return [self._primary(n, i) if is_primary(self.host, i) else self._child(n, i)
                for n, i in instance_items(self.host)]

    # ------------------------------------------------------------ families
    def collect(self) -> Iterator[Metric]:
        srcs = self.sources()
        I = "instance"

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=[I])
            for s in srcs:
                g.add_metric([s.name], float(value(s)))
            return g

        yield gauge("luna_daemon_up", "1 while the instance is running (answered a protocol ping), else 0.",
                    lambda s: 1.0 if s.state == "running" else 0.0)
        g = GaugeMetricFamily("luna_daemon_state", "Instance lifecycle state (1 for the current state).", labels=[I, "state"])
        for s in srcs:
            for st in _STATES:
                g.add_metric([s.name, st], 1.0 if st == s.state else 0.0)
        yield g
        info = InfoMetricFamily("luna_daemon", "Daemon build, engine and service of each instance.", labels=[I])
        for s in srcs:
            info.add_metric([s.name], {"version": __version__, "engine": s.engine, "service": s.service})
        yield info
        yield gauge("luna_daemon_uptime_seconds", "Seconds since the instance became running (0 when not running).",
                    lambda s: s.uptime)

        requests = CounterMetricFamily("luna_daemon_requests", "Protocol requests handled, by op and outcome (ok or an error code).",
                                       labels=[I, "op", "outcome"])
        hist = HistogramMetricFamily("luna_daemon_request_duration_seconds", "Request handling time by op.", labels=[I, "op"])
        for s in srcs:
            for (op, outcome), n in sorted(s.requests.items()):
                requests.add_metric([s.name, op, outcome], n)
            for op, b, total in s.hist:
                hist.add_metric([s.name, op], b, sum_value=total)
        yield requests
        yield hist

        yield gauge("luna_daemon_queue_depth", "Calls queued or running on model executors.", lambda s: s.queue)
        yield gauge("luna_daemon_in_flight_requests", "Requests being handled right now.", lambda s: s.in_flight)
        yield gauge("luna_daemon_connected_clients", "Open protocol connections (ComfyUI instances, CLI).", lambda s: s.clients)
        loaded = GaugeMetricFamily("luna_daemon_models_loaded", "Loaded models by kind.", labels=[I, "kind"])
        model_bytes = GaugeMetricFamily("luna_daemon_model_bytes", "Bytes of loaded model weights per device.", labels=[I, "device"])
        mem_used = GaugeMetricFamily("luna_device_memory_used_bytes", "Device memory in use (CPU: process RSS).", labels=[I, "device"])
        mem_total = GaugeMetricFamily("luna_device_memory_total_bytes", "Device memory size.", labels=[I, "device"])
        for s in srcs:
            for kind, n in sorted(s.by_kind.items()):
                loaded.add_metric([s.name, kind], float(n))
            for dev, n in s.model_bytes.items():
                model_bytes.add_metric([s.name, dev], n)
            for dev, (used, total) in s.memory.items():
                if used is not None:
                    mem_used.add_metric([s.name, dev], used)
                if total is not None:
                    mem_total.add_metric([s.name, dev], total)
        yield loaded
        yield model_bytes
        yield mem_used
        yield mem_total

        yield gauge("luna_daemon_lora_cache_bytes", "Bytes held by the LoRA cache.", lambda s: s.lora["bytes"])
        hits = CounterMetricFamily("luna_daemon_lora_cache_hits", "LoRA cache hits.", labels=[I])
        misses = CounterMetricFamily("luna_daemon_lora_cache_misses", "LoRA cache misses.", labels=[I])
        for s in srcs:
            hits.add_metric([s.name], float(s.lora["hits"]))
            misses.add_metric([s.name], float(s.lora["misses"]))
        yield hits
        yield misses
        # Memory saved (docs/monitor.md "Memory saved"): per instance, and the host's total
        # in which a client of two instances counts once (so no sum over instances).
        shared = views.sharing(self.host, self.children)
        per = shared["by_instance"]
        saved = GaugeMetricFamily("luna_memory_saved_bytes", "Bytes the clients of an instance would hold without "
                                  "it: sum over its models of size x (clients using it - 1).", labels=[I])
        sharing_clients = GaugeMetricFamily("luna_sharing_clients", "Client processes (pid, ComfyUI id) counted as "
                                            "using a model of the instance.", labels=[I])
        shared_models = GaugeMetricFamily("luna_shared_models", "Loaded models with at least one counted client.", labels=[I])
        for s in srcs:
            snap = per.get(s.name) or {}
            saved.add_metric([s.name], float(_num(snap.get("saved_bytes")) or 0))
            sharing_clients.add_metric([s.name], float(_num(snap.get("clients")) or 0))
            shared_models.add_metric([s.name], float(_num(snap.get("models")) or 0))
        yield saved
        yield sharing_clients
        yield shared_models
        # Host totals carry the primary's name, like the monitor's own gauge below: the host
        # is the primary instance's process.
        host_saved = GaugeMetricFamily("luna_host_memory_saved_bytes", "luna_memory_saved_bytes of every instance "
                                       "of the host, added up.", labels=[I])
        host_saved.add_metric([srcs[0].name], float(shared["total"]["saved_bytes"]))
        yield host_saved
        host_clients = GaugeMetricFamily("luna_host_sharing_clients", "Client processes using any instance of the "
                                         "host (one using two instances counts once).", labels=[I])
        host_clients.add_metric([srcs[0].name], float(shared["total"]["clients"]))
        yield host_clients
        # The monitor belongs to the host, which the primary instance's process is.
        ws = GaugeMetricFamily("luna_monitor_websocket_clients", "Dashboard WebSocket connections.", labels=[I])
        ws.add_metric([srcs[0].name], float(self.monitor_clients()))
        yield ws


class Metrics:
    """A private registry holding one DaemonCollector (never the global default registry,
    so two monitors in one process -- tests -- never collide)."""

    def __init__(self, host: Any, monitor_clients: Any = lambda: 0, children: ChildPoller | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = DaemonCollector(host, monitor_clients, children)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The exposition text (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
