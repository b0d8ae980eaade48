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
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from luna_daemon import fsutil
from luna_daemon.events import EventBus
from luna_daemon.models.engines.base import Engine, LoadedModel, load_progress
from luna_daemon.models.devices import DTYPE_SHORT, release_memory, resolve_device, resolve_dtype
from luna_daemon.models.executor import ModelExecutor
from luna_daemon.models.sharing import Sharing
from luna_daemon.protocol import ErrorCode, LunaError
from luna_daemon.settings import FOREVER, Settings
from luna_daemon.units import fmt_bytes, fmt_duration

log = logging.getLogger(__name__)

# Model folders ComfyUI instances may register (register_roots) over a daemon's lifetime:
# each instance sends a handful (vae, text_encoders, loras, embeddings, ... plus extra
# model paths); the bound keeps one client from growing every root check without limit.
MAX_CLIENT_ROOTS = 64

# --------------------------------------------------------------------------- paths
def resolve_model_path(path: Any, roots: Sequence[Path], config_file: str = "") -> Path:
    """Resolve ``path`` (absolute, or relative to a root) and require it under a root.

    Symlinks are resolved first, so a link inside a root that points outside is
    ``forbidden_path``. A relative path is tried against every root; the first root where
    it exists wins. Nothing is opened: what kind of file it is, the engine's reads check
    (see :mod:`luna_daemon.fsutil`). Every failure is typed (``bad_args`` for an unusable
    path, ``not_found``, ``forbidden_path``; the latter names ``config_file``, where
    model_roots is set)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise LunaError(ErrorCode.BAD_ARGS, "path must be a non-empty string")
    config = config_file or "the config file"
    if not roots:
        raise LunaError(ErrorCode.FORBIDDEN_PATH, f"no model_roots are configured; add the folder to model_roots in {config}")
    expanded = os.path.expanduser(path)  # (os.path's never raises; an unknown ~user stays as is)
    candidates = [Path(expanded)] if os.path.isabs(expanded) else [r / path for r in roots]
    first_error: LunaError | None = None
    for cand in candidates:
        real = fsutil.real_path(cand, "model")
        if not fsutil.within(real, roots):
            continue
        try:
            os.stat(real)
        except (OSError, ValueError) as exc:
            # Missing here may exist under the next root; remember why this one failed.
            first_error = first_error or fsutil.file_error(exc, real, "model file")
            continue
        return real
    if first_error is not None:
        raise first_error
    raise LunaError(ErrorCode.FORBIDDEN_PATH, f"{fsutil.short(path)} is outside the configured model_roots "
                    f"({', '.join(map(str, roots))}); add its folder to model_roots in {config}")


def _fingerprint(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except (OSError, ValueError) as exc:
            raise fsutil.file_error(exc, p, "model file") from None
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def _disk_bytes(paths: Sequence[Path]) -> int:
    """Estimated bytes a load reads: the file, or a folder's ``*.safetensors`` (links to
    files followed, links to folders not: the estimate must not loop)."""
    total = 0
    for p in paths:
        if not os.path.isdir(p):
            total += _regular_size(p)
            continue
        for top, _dirs, files in os.walk(p, followlinks=False):
            total += sum(_regular_size(os.path.join(top, f)) for f in files if f.endswith(".safetensors"))
    return total


def _regular_size(path: Any) -> int:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return 0  # an estimate; the engine's checked read reports what is wrong with it
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


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
        self._internal_roots: list[Path] = []
        # Folders ComfyUI instances registered (register_roots): path -> {"kinds", "source"}.
        # Kept for this registry's (the daemon's) lifetime only, never written to config.
        self._client_roots: dict[Path, dict[str, Any]] = {}
        # Which client identities use which loaded model (status's "sharing", docs/monitor.md).
        self.sharing = Sharing()
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="luna-reaper", daemon=True)
        self._reaper.start()

    # ------------------------------------------------------------ lookup
    def add_internal_root(self, folder: Path) -> None:
        """Accept models under ``folder`` for the daemon's own loads (``internal=True``,
        e.g. its upload store) -- never for a path a client names."""
        folder = folder.resolve()
        with self._lock:
            if folder not in self._internal_roots:
                self._internal_roots.append(folder)

    def refresh_roots(self) -> None:
        """Re-read ``model_roots`` / ``comfyui_root`` from the (live) settings: an edited
        config file applies to the next path check; loaded models stay loaded."""
        roots = self.settings.resolved_model_roots()
        with self._lock:
            self._roots = roots

    def roots(self, internal: bool = False) -> list[Path]:
        """The model roots (configured, then client-registered); with ``internal``, plus the
        daemon's own folders."""
        with self._lock:
            return list(self._roots) + list(self._client_roots) + (list(self._internal_roots) if internal else [])

    def add_client_roots(self, folders: Sequence[tuple[str, str]], source: str) -> tuple[list[dict], list[dict]]:
        """Accept ``(kind, folder)`` pairs a client registered as model roots.

        Each folder is resolved (symlinks followed) and must be an existing folder that
        :func:`~luna_daemon.settings.too_broad_model_root` accepts; one already inside a
        root only gains the kind. At most MAX_CLIENT_ROOTS are kept (the first ones stay).
        Returns (added, refused): ``{"path", "kind"}`` / ``{"path", "reason"}`` dicts."""
        from luna_daemon.settings import _home, too_broad_model_root

        home = _home()
        added: list[dict] = []
        refused: list[dict] = []
        for kind, folder in folders:
            shown = fsutil.short(folder)
            try:
                real = Path(os.path.realpath(os.path.expanduser(folder)))
            except (OSError, ValueError) as exc:
                refused.append({"path": shown, "reason": f"cannot resolve it ({exc})"})
                continue
            why = too_broad_model_root(real, home)
            if why:
                refused.append({"path": shown, "reason": f"{why}: never a model root"})
                continue
            if not real.is_dir():
                refused.append({"path": shown, "reason": "not an existing folder"})
                continue
            with self._lock:
                known = self._client_roots.get(real)
                if known is not None:
                    if kind not in known["kinds"]:
                        known["kinds"].append(kind)
                    continue
                if fsutil.within(real, self._roots) or fsutil.within(real, list(self._client_roots)):
                    continue  # already readable: nothing to add
                if len(self._client_roots) >= MAX_CLIENT_ROOTS:
                    refused.append({"path": shown, "reason": f"the daemon already keeps {MAX_CLIENT_ROOTS} registered "
                                                             "folders (restart it, or list the folder in model_roots)"})
                    continue
                self._client_roots[real] = {"kinds": [kind], "source": source}
            added.append({"path": str(real), "kind": kind})
        return added, refused

    def root_sources(self) -> list[dict[str, Any]]:
        """Every model root with where it came from: ``{"path", "source", "kinds"}``;
        ``source`` is ``settings`` (model_roots / comfyui_root) or the registering client."""
        with self._lock:
            out = [{"path": str(r), "source": "settings", "kinds": []} for r in self._roots]
            out += [{"path": str(r), "source": v["source"], "kinds": list(v["kinds"])} for r, v in self._client_roots.items()]
        return out

    def resolve_path(self, path: Any, *, internal: bool = False) -> Path:
        """A client's path -> its real path under the model roots (see :func:`resolve_model_path`)."""
        return resolve_model_path(path, self.roots(internal), self.settings.config_file)

    def confine(self, internal: bool = False):
        """Context manager: file reads in this thread must stay inside the roots
        (:func:`luna_daemon.fsutil.confined_to`)."""
        return fsutil.confined_to(self.roots(internal))

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

    def sharing_snapshot(self) -> dict[str, Any]:
        """Which clients share the loaded models and the bytes saved (``Sharing.snapshot``)."""
        return self.sharing.snapshot([e for e in self.entries() if not e.unloading])

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
        internal: bool = False,
    ) -> ModelEntry:
        """Load (or reuse) a model. Blocks until it is loaded; raises LunaError.

        ``paths`` must lie under the model roots (``internal``: or the daemon's own folders,
        for uploads). Every file the engine reads -- weights, configs, sidecars, tokenizer
        files -- must be a regular file that resolves inside those roots
        (:mod:`luna_daemon.fsutil`); a FIFO, device or link out of the roots is refused
        before anything opens it."""
        from luna_daemon.settings import parse_duration

        if not paths:
            raise LunaError(ErrorCode.BAD_ARGS, "at least one model path is required")
        real = [self.resolve_path(p, internal=internal) for p in paths]
        for p in real:
            if not os.path.isdir(p):
                fsutil.stat_regular(p, "model file")  # fail fast; the engine's reads check again
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
                with load_progress(progress.update), self.confine(internal):
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
            log.info("loaded %s %s on %s (%s, %s) in %s", kind, real[0].name, dev, entry.dtype, fmt_bytes(entry.nbytes), fmt_duration(time.perf_counter() - t0))
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
        """Unload a model: no new calls are accepted, queued/in-flight ones finish first,
        within ``timeout`` seconds (default ``stop_timeout``).

        Returns ``{id, kind, paths, bytes, freed}``. ``freed`` is True once the memory is
        released (gc + empty device caches). False if a call was still running at the
        deadline: the model is gone from the registry at once, but a call inside C code
        cannot be interrupted, so its executor thread is abandoned and the memory is
        released when that call returns (or when the process ends); a warning says so.
        """
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry.unloading:
                raise LunaError(ErrorCode.NOT_FOUND, f"model {model_id!r} is not loaded")
            entry.unloading = True
        result = self._finish_unload(entry, self.settings.stop_timeout if timeout is None else timeout)
        if result["freed"]:
            release_memory()
        return result

    def _finish_unload(self, entry: ModelEntry, timeout: float) -> dict[str, Any]:
        """Shut the entry's executor down (``timeout``), drop the entry, release its model
        unless a call is stuck in it. The caller runs release_memory()."""
        name = Path(entry.paths[0]).name

        def release_late() -> None:  # on the abandoned executor thread, once its call returned
            self._release(entry)
            release_memory()
            log.info("model %s (%s): its stuck call returned; memory released", entry.id, name)

        freed = entry.executor.shutdown(timeout, on_late_exit=release_late)
        with self._lock:
            self._entries.pop(entry.id, None)
        self.sharing.forget(entry.id)
        if freed:
            self._release(entry)
            log.info("unloaded %s (%s)", entry.id, name)
        else:
            msg = (f"model {name} ({entry.id}) was still running a call {timeout:.1f}s into its unload; it is unloaded "
                   "but its memory is NOT freed until that call returns (a call inside C code cannot be interrupted)")
            log.warning(msg)
            self.events.emit("warning", message=msg, model=entry.id)
        self.events.emit("model_unloaded", model=entry.id, kind=entry.kind, paths=entry.paths, bytes=entry.nbytes)
        return {"id": entry.id, "kind": entry.kind, "paths": entry.paths, "bytes": entry.nbytes, "freed": freed}

    @staticmethod
    def _release(entry: ModelEntry) -> None:
        model, entry.model = entry.model, None
        if model is None:
            return
        try:
            model.release()
        except Exception:  # an unload (or a stop) must go on: the memory is freed with the objects
            log.exception("releasing %s failed", entry.id)

    def unload_all(self, timeout: float | None = None, *, release: bool = True) -> list[dict[str, Any]]:
        """Unload every model within one ``timeout`` (default ``stop_timeout``) for all of
        them: every executor is told to stop first, so idle ones end in parallel while busy
        ones finish their queue. Returns one :meth:`unload` result per model. ``release``
        False leaves release_memory() (a full gc: ~1 s with torch loaded) to the caller."""
        timeout = self.settings.stop_timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        with self._lock:
            victims = [e for e in self._entries.values() if not e.unloading]
            for e in victims:
                e.unloading = True
        for e in victims:
            e.executor.request_stop()
        out = [self._finish_unload(e, max(0.0, end - time.monotonic())) for e in victims]
        if release and any(r["freed"] for r in out):
            release_memory()
        return out

    def close(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Stop the keep_alive reaper and unload every model, within one ``timeout``.
        Returns :meth:`unload_all`'s results (``freed: False``: a call was stuck, see unload).
        The caller runs release_memory() once it has dropped everything else it holds."""
        timeout = self.settings.stop_timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        self._reaper_stop.set()
        out = self.unload_all(timeout, release=False)
        # The reaper wakes at once; it is a daemon thread, so a missed join costs nothing.
        self._reaper.join(max(0.0, end - time.monotonic()))
        return out

    # ------------------------------------------------------------ budgets / expiry
    def _budget(self, device: str) -> int | None:
        b = self.settings.max_model_bytes
        return b.get(device) or (b.get("cuda") if device.startswith("cuda") else None)

    def _make_room(self, device: str, needed: int, exclude: str) -> None:
        budget = self._budget(device)
        if budget is None:
            return
        if needed > budget:
            raise LunaError(ErrorCode.OOM, f"model needs ~{fmt_bytes(needed)} but max_model_bytes for {device} is {fmt_bytes(budget)}")
        while True:
            with self._lock:
                on_dev = [e for e in self._entries.values() if e.device == device and not e.unloading and e.id != exclude]
                used = sum(e.held_bytes for e in on_dev)
                if used + needed <= budget:
                    return
                idle = sorted((e for e in on_dev if e.users == 0), key=lambda e: e.last_used)
                if not idle:
                    busy = ", ".join(Path(e.paths[0]).name for e in on_dev)
                    msg = f"memory budget for {device} ({fmt_bytes(budget)}) is full and every model is in use ({busy})"
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
