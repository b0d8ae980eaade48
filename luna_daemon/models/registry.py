"""What is loaded: identity, executors, residency (keep_alive), memory budgets, ``ps``.

Guarantees a caller can rely on:

* Two requests for the same file (same real path, size, mtime, device, dtype) share one
  loaded copy; concurrent loads of the same model load it once.
* Every call on a model runs on that model's single executor thread, inside
  ``torch.inference_mode()``; the queue in front of it is bounded (``busy`` when full).
* A queued call whose future is cancelled (client disconnected) never runs.
* Eviction (memory budget, keep_alive expiry) only ever removes *idle* models.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from luna_daemon.events import EventBus
from luna_daemon.models.engines.base import Engine, LoadedModel, load_progress
from luna_daemon.protocol import ErrorCode, LunaError
from luna_daemon.settings import FOREVER, Settings

log = logging.getLogger(__name__)

DTYPE_ALIASES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_SHORT = {v: k for k, v in DTYPE_ALIASES.items()}


# --------------------------------------------------------------------------- devices
def available_devices() -> list[str]:
    """Devices torch can use in this process, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devs.append("mps")
    return devs


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` -> first GPU if any, else CPU. An unavailable device is an error listing
    the devices that exist -- never a silent fallback."""
    spec = (spec or "auto").strip().lower()
    devs = available_devices()
    if spec == "auto":
        return torch.device(devs[1] if len(devs) > 1 else "cpu")
    if spec == "cuda":
        spec = "cuda:0"
    if spec not in devs:
        raise LunaError(ErrorCode.BAD_ARGS, f"device {spec!r} is not available; devices on this machine: {', '.join(devs)}")
    return torch.device(spec)


def resolve_dtype(spec: str | None) -> torch.dtype | None:
    """``auto`` -> None (the engine picks); fp32 / fp16 / bf16 -> torch dtype."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return None
    aliases = {**DTYPE_ALIASES, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if spec not in aliases:
        raise LunaError(ErrorCode.BAD_ARGS, f"dtype {spec!r} unknown; use auto, fp32, fp16 or bf16")
    return aliases[spec]


def device_memory(device: str) -> dict[str, int | None]:
    """Used / total bytes of a device (process RSS and system RAM for the CPU)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(idx)
        return {"used": total - free, "total": total, "allocated": torch.cuda.memory_allocated(idx)}
    if device == "cpu":
        import psutil

        return {"used": psutil.Process().memory_info().rss, "total": psutil.virtual_memory().total, "allocated": None}
    return {"used": None, "total": None, "allocated": None}


# --------------------------------------------------------------------------- paths
def resolve_model_path(path: Any, roots: Sequence[Path]) -> Path:
    """Resolve ``path`` (absolute, or relative to a root) and require it under a root.

    Symlinks are resolved first, so a link inside a root that points outside is refused.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        raise LunaError(ErrorCode.BAD_ARGS, "path must be a non-empty string")
    if not roots:
        raise LunaError(ErrorCode.FORBIDDEN_PATH, "no model_roots are configured; add the folder to model_roots in the config file")
    candidates = [Path(path).expanduser()] if os.path.isabs(path) else [r / path for r in roots]
    for cand in candidates:
        real = cand.resolve()
        if not any(real == r or r in real.parents for r in roots):
            continue
        if not real.exists():
            raise LunaError(ErrorCode.NOT_FOUND, f"model file not found: {real}")
        return real
    raise LunaError(ErrorCode.FORBIDDEN_PATH, f"{path} is outside the configured model_roots ({', '.join(map(str, roots))})")


def _fingerprint(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def _disk_bytes(paths: Sequence[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*.safetensors"))
        else:
            total += p.stat().st_size
    return total


class _LoadProgress:
    """``model_loading`` events for one load: 0.0 first, then each further 5 % of the
    weights read (at most ~20 events), capped below 1.0: ``model_loaded`` says done.
    The estimate is the size of the files, so a folder that holds more than the engine
    reads (say an fp16 variant too) ends below 100 %."""

    STEP = 0.05

    def __init__(self, events: EventBus, model_id: str, kind: str, paths: list[str], total_bytes: int):
        self.events, self.model_id, self.kind, self.paths = events, model_id, kind, paths
        self.total = max(1, total_bytes)
        self.last = 0.0

    def emit(self, fraction: float) -> None:
        self.last = fraction
        self.events.emit("model_loading", model=self.model_id, kind=self.kind, paths=self.paths,
                         progress=round(fraction, 3))

    def update(self, done_bytes: int) -> None:
        fraction = min(done_bytes / self.total, 0.99)
        if fraction >= self.last + self.STEP:
            self.emit(fraction)


# --------------------------------------------------------------------------- executor
class ModelExecutor:
    """One worker thread per loaded model with a bounded queue.

    GPU work is serial per model anyway; one thread also makes engine objects (which are
    not thread-safe, e.g. ComfyUI's) safe to share between clients.
    """

    _STOP = object()

    def __init__(self, name: str, queue_size: int):
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name=f"luna-exec-{name}", daemon=True)
        self._thread.start()
        self.running = 0
        self.completed = 0  # calls that ran (ok or failed)
        self.cancelled = 0  # calls skipped because their client went away

    def submit(self, fn: Callable[[], Any]) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            self._q.put_nowait((fut, fn))
        except queue.Full:
            raise LunaError(ErrorCode.BUSY, f"model queue is full ({self._q.maxsize} waiting); retry later") from None
        return fut

    @property
    def depth(self) -> int:
        return self._q.qsize() + self.running

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is self._STOP:
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

    def shutdown(self, timeout: float | None = None) -> bool:
        """Finish queued work, stop the thread. Returns False if it did not end in time."""
        # put() may block if the queue is full of pending work; that work is what we
        # are waiting for anyway, so a blocking put with the same deadline is right.
        try:
            self._q.put(self._STOP, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


# --------------------------------------------------------------------------- entries
@dataclass
class ModelEntry:
    id: str
    kind: str
    paths: list[str]
    device: str
    dtype: str
    model: LoadedModel | None
    executor: ModelExecutor
    nbytes: int
    keep_alive: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    users: int = 0
    unloading: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_bytes(self) -> int:
        """Memory the model holds besides its weights (LoRA-patched copies), read live.
        Optional in a model (``LoadedModel.cache_nbytes``): duck-typed models hold none."""
        fn = getattr(self.model, "cache_nbytes", None)
        return fn() if fn is not None else 0

    @property
    def held_bytes(self) -> int:
        """What counts against the device's ``max_model_bytes``: weights + caches."""
        return self.nbytes + self.cache_bytes

    @property
    def expires_at(self) -> float | None:
        if self.keep_alive == FOREVER or self.keep_alive < 0:
            return None
        return self.last_used + self.keep_alive

    def describe(self, full: bool = False) -> dict[str, Any]:
        """JSON-safe facts for ``ps`` / load answers. ``full`` adds bulky info such as a
        CLIP's state-dict key list (only the load answer needs it; ``ps`` polls do not)."""
        info = self.model.info() if self.model is not None else {}
        if not full:
            info = {k: v for k, v in info.items() if k != "state_dict"}
        return {
            "id": self.id, "kind": self.kind, "paths": self.paths, "device": self.device, "dtype": self.dtype,
            "bytes": self.nbytes, "cache_bytes": self.cache_bytes, "loaded_at": self.loaded_at, "last_used": self.last_used,
            "expires_at": self.expires_at, "keep_alive": self.keep_alive, "users": self.users,
            "queue": self.executor.depth, "calls": self.executor.completed, "cancelled": self.executor.cancelled,
            "info": info, "options": self.options,
        }


class Registry:
    """Loaded models and their residency. Thread-safe."""

    def __init__(self, settings: Settings, engine: Engine, events: EventBus | None = None):
        self.settings = settings
        self.engine = engine
        self.events = events or EventBus()
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        self._loading: dict[str, threading.Event] = {}
        self._roots = settings.resolved_model_roots()
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="luna-reaper", daemon=True)
        self._reaper.start()

    # ------------------------------------------------------------ lookup
    def add_root(self, folder: Path) -> None:
        """Accept models under ``folder`` too (e.g. the daemon's own upload store)."""
        folder = folder.resolve()
        with self._lock:
            if folder not in self._roots:
                self._roots.append(folder)

    def resolve_path(self, path: Any) -> Path:
        return resolve_model_path(path, self._roots)

    def get(self, model_id: Any) -> ModelEntry:
        with self._lock:
            entry = self._entries.get(model_id) if isinstance(model_id, str) else None
            if entry is None or entry.unloading:
                raise LunaError(ErrorCode.NOT_FOUND, f"model {model_id!r} is not loaded (load it first; see 'ps')")
            return entry

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def ps(self) -> list[dict[str, Any]]:
        return [e.describe() for e in self.entries()]

    def bytes_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries():
            out[e.device] = out.get(e.device, 0) + e.held_bytes
        return out

    # ------------------------------------------------------------ load
    def load(
        self,
        kind: str,
        paths: Sequence[str],
        *,
        device: str | None = None,
        dtype: str | None = None,
        clip_type: str | None = None,
        keep_alive: Any = None,
    ) -> ModelEntry:
        """Load (or reuse) a model. Blocks until it is loaded; raises LunaError."""
        from luna_daemon.settings import parse_duration

        if not paths:
            raise LunaError(ErrorCode.BAD_ARGS, "at least one model path is required")
        real = [self.resolve_path(p) for p in paths]
        default_dev = self.settings.vae_device if kind == "vae" else self.settings.clip_device
        default_dt = self.settings.vae_dtype if kind == "vae" else self.settings.clip_dtype
        dev = resolve_device(device or default_dev)
        dt = resolve_dtype(dtype or default_dt)
        try:
            ka = self.settings.keep_alive if keep_alive is None else parse_duration(keep_alive, "keep_alive")
        except ValueError as exc:
            raise LunaError(ErrorCode.BAD_ARGS, str(exc)) from None
        ident = repr((kind, clip_type, _fingerprint(real), str(dev), str(dt)))
        model_id = f"{kind}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"

        while True:
            with self._lock:
                entry = self._entries.get(model_id)
                if entry is not None and not entry.unloading:
                    if keep_alive is not None:
                        entry.keep_alive = ka
                    entry.last_used = time.time()
                    return entry
                waiter = self._loading.get(model_id)
                if waiter is None:
                    waiter = self._loading[model_id] = threading.Event()
                    break
            # Someone else is loading the same model: wait and share their result. If their
            # load failed, the loop comes round and this thread tries (and reports) itself.
            waiter.wait()

        try:
            estimate = _disk_bytes(real)
            self._make_room(str(dev), estimate, exclude=model_id)
            progress = _LoadProgress(self.events, model_id, kind, [str(p) for p in real], estimate)
            progress.emit(0.0)
            t0 = time.perf_counter()
            try:
                with load_progress(progress.update):
                    if kind == "vae":
                        model = self.engine.load_vae([str(p) for p in real], dev, dt)
                    elif kind == "clip":
                        model = self.engine.load_clip([str(p) for p in real], clip_type or "sd1", dev, dt)
                    else:
                        raise LunaError(ErrorCode.BAD_ARGS, f"unknown model kind {kind!r}")
            except LunaError:
                raise
            except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                raise LunaError(ErrorCode.OOM, f"out of memory loading {real[0].name} on {dev}: {exc}") from None
            except Exception as exc:
                log.exception("loading %s failed", real)
                raise LunaError(ErrorCode.MODEL_ERROR, f"cannot load {real[0].name}: {type(exc).__name__}: {exc}") from None
            entry = ModelEntry(
                id=model_id, kind=kind, paths=[str(p) for p in real], device=str(dev),
                dtype=DTYPE_SHORT.get(model.dtype, str(model.dtype)), model=model,
                executor=ModelExecutor(model_id, self.settings.queue_size), nbytes=model.nbytes(), keep_alive=ka,
                options={"clip_type": clip_type} if kind == "clip" else {},
            )
            with self._lock:
                self._entries[model_id] = entry
            log.info("loaded %s %s on %s (%s, %.1f MB) in %.2fs", kind, real[0].name, dev, entry.dtype, entry.nbytes / 1e6, time.perf_counter() - t0)
            self.events.emit("model_loaded", model=model_id, kind=kind, paths=entry.paths, device=entry.device, bytes=entry.nbytes)
            self._warn_if_over_budget(str(dev))
            return entry
        except LunaError as exc:
            self.events.emit("warning", message=f"model failed to load: {exc.message}", model=model_id)
            raise
        finally:
            with self._lock:
                self._loading.pop(model_id).set()

    # ------------------------------------------------------------ run
    def submit(self, model_id: str, fn: Callable[[LoadedModel], Any]) -> cf.Future:
        """Queue ``fn(model)`` on the model's executor. The future's result is fn's.

        ``users`` counts queued + running calls; the model cannot be evicted meanwhile.
        """
        with self._lock:
            entry = self.get(model_id)
            entry.users += 1
            entry.last_used = time.time()
        model = entry.model

        def call() -> Any:
            return fn(model)

        try:
            fut = entry.executor.submit(call)
        except LunaError:
            with self._lock:
                entry.users -= 1
            raise

        cache_before = entry.cache_bytes

        def done(_f: cf.Future) -> None:
            with self._lock:
                entry.users -= 1
                entry.last_used = time.time()
                unload_now = entry.keep_alive == 0 and entry.users == 0
            if unload_now:
                # keep_alive 0 = unload after use; off the executor thread (it is joined).
                threading.Thread(target=self._unload_quiet, args=(entry.id,), daemon=True).start()
            elif entry.cache_bytes > cache_before and self._over_budget(entry.device):
                # The call grew the model's cache past the budget: make room as a load
                # would, off the executor thread (unloading joins other executors).
                threading.Thread(target=self._fit_budget, args=(entry.device, entry.id), daemon=True).start()

        fut.add_done_callback(done)
        return fut

    # ------------------------------------------------------------ unload
    def _unload_quiet(self, model_id: str) -> None:
        try:
            self.unload(model_id)
        except LunaError:
            pass

    def unload(self, model_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Unload a model: no new calls are accepted, queued/in-flight ones finish first.

        Returns what was unloaded. Memory is released (gc + empty device caches).
        """
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry.unloading:
                raise LunaError(ErrorCode.NOT_FOUND, f"model {model_id!r} is not loaded")
            entry.unloading = True
        timeout = self.settings.stop_timeout if timeout is None else timeout
        finished = entry.executor.shutdown(timeout)
        if not finished:
            log.warning("model %s still busy after %.0fs; unloading anyway", model_id, timeout)
        with self._lock:
            self._entries.pop(model_id, None)
        model, entry.model = entry.model, None
        if model is not None:
            model.release()
        del model
        release_memory()
        self.events.emit("model_unloaded", model=model_id, kind=entry.kind, paths=entry.paths, bytes=entry.nbytes)
        log.info("unloaded %s (%s)", model_id, Path(entry.paths[0]).name)
        return {"id": model_id, "kind": entry.kind, "paths": entry.paths, "bytes": entry.nbytes}

    def unload_all(self, timeout: float | None = None) -> list[dict[str, Any]]:
        out = []
        for e in self.entries():
            try:
                out.append(self.unload(e.id, timeout))
            except LunaError:
                pass  # unloaded concurrently
        return out

    def close(self, timeout: float | None = None) -> None:
        self._reaper_stop.set()
        self.unload_all(timeout)
        self._reaper.join(5)

    # ------------------------------------------------------------ budgets / expiry
    def _budget(self, device: str) -> int | None:
        b = self.settings.max_model_bytes
        return b.get(device) or (b.get("cuda") if device.startswith("cuda") else None)

    def _make_room(self, device: str, needed: int, exclude: str) -> None:
        budget = self._budget(device)
        if budget is None:
            return
        if needed > budget:
            raise LunaError(ErrorCode.OOM, f"model needs ~{needed / 1e6:.0f} MB but max_model_bytes for {device} is {budget / 1e6:.0f} MB")
        while True:
            with self._lock:
                on_dev = [e for e in self._entries.values() if e.device == device and not e.unloading and e.id != exclude]
                used = sum(e.held_bytes for e in on_dev)
                if used + needed <= budget:
                    return
                idle = sorted((e for e in on_dev if e.users == 0), key=lambda e: e.last_used)
                if not idle:
                    busy = ", ".join(Path(e.paths[0]).name for e in on_dev)
                    msg = f"memory budget for {device} ({budget / 1e6:.0f} MB) is full and every model is in use ({busy})"
                    self.events.emit("warning", message=msg)
                    raise LunaError(ErrorCode.OOM, msg)
                victim = idle[0]
            log.info("evicting idle %s to stay within the %s budget", victim.id, device)
            self.events.emit("warning", message=f"memory budget pressure on {device}: evicting {Path(victim.paths[0]).name}")
            try:
                self.unload(victim.id)
            except LunaError:
                pass

    def _over_budget(self, device: str) -> bool:
        budget = self._budget(device)
        return budget is not None and self.bytes_by_device().get(device, 0) > budget

    def _fit_budget(self, device: str, keep: str) -> None:
        """Evict idle models (not ``keep``) until ``device`` is within its budget again."""
        try:
            self._make_room(device, self.get(keep).held_bytes, exclude=keep)
        except LunaError:
            pass  # gone meanwhile, or nothing idle to evict (_make_room emitted the warning)
        self._warn_if_over_budget(device)

    def _warn_if_over_budget(self, device: str) -> None:
        budget = self._budget(device)
        used = self.bytes_by_device().get(device, 0)
        if budget is not None and used > budget:
            self.events.emit("warning", message=f"models on {device} use {used / 1e6:.0f} MB, over the {budget / 1e6:.0f} MB budget")

    def _reap_loop(self) -> None:
        while not self._reaper_stop.wait(1.0):
            now = time.time()
            for e in self.entries():
                exp = e.expires_at
                if exp is not None and now >= exp and e.users == 0 and not e.unloading:
                    log.info("keep_alive expired for %s", e.id)
                    self._unload_quiet(e.id)


def release_memory() -> None:
    """Return freed memory: collect cycles, empty device caches, trim the C heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        try:
            torch.cuda.ipc_collect()
        except RuntimeError:
            pass
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed arenas mapped; malloc_trim hands them back so RSS really drops.
    if os.name != "posix":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
