"""The comfy engine's process-wide part (see comfy.py): the one-time import of ComfyUI's
``comfy`` package, the one lock every comfy call holds, the root-logging guard, and the
helpers the VAE and CLIP halves share."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from luna_daemon import fsutil

from .base import EngineError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------- process-wide state

_IMPORT_LOCK = threading.Lock()
# comfy's model-management state is module-global: one lock for every comfy call.
_COMFY_LOCK = threading.RLock()
_STATE: dict[str, Any] = {}


@contextlib.contextmanager
def _keep_root_logging():
    """Undo any change ``comfy`` makes to the root logger (handlers, level, filters)."""
    root = logging.getLogger()
    handlers, level, filters = list(root.handlers), root.level, list(root.filters)
    try:
        yield
    finally:
        if root.handlers != handlers:
            for h in list(root.handlers):
                if h not in handlers:
                    root.removeHandler(h)
            for h in handlers:
                if h not in root.handlers:
                    root.addHandler(h)
        if root.level != level:
            root.setLevel(level)
        if root.filters != filters:
            root.filters[:] = filters


def _sub_tokenizers(clip: Any) -> list[Any]:
    """The per-encoder tokenizers of a ``comfy.sd.CLIP`` (``SD1Tokenizer.clip_l``,
    ``SDXLTokenizer.clip_l`` / ``clip_g``, ``t5xxl``...): what holds ``embedding_directory``."""
    top = getattr(clip, "tokenizer", None)
    if top is None:
        return []
    found = [top] if hasattr(top, "embedding_directory") else []
    for value in vars(top).values():
        if hasattr(value, "embedding_directory") and value is not top and value not in found:
            found.append(value)
    return found


@contextlib.contextmanager
def _embedding_folders(clip: Any, folders: Sequence[str] | None):
    """Point the CLIP's tokenizers at ``folders`` for one call (the caller holds the
    tokenize lock: the tokenizer is shared by every client of this model)."""
    if folders is None:
        yield
        return
    saved = [(t, t.embedding_directory) for t in _sub_tokenizers(clip)]
    try:
        for t, _ in saved:
            t.embedding_directory = list(folders)
        yield
    finally:
        for t, value in saved:
            t.embedding_directory = value


@contextlib.contextmanager
def _argv_guard(options_module):
    """Hide the daemon's argv from comfy.cli_args if argument parsing was enabled elsewhere."""
    if getattr(options_module, "args_parsing", False) and "comfy.cli_args" not in sys.modules:
        saved = sys.argv
        sys.argv = saved[:1]
        try:
            yield
        finally:
            sys.argv = saved
    else:
        yield


def _accelerator_available() -> bool:
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _device_plan(settings) -> tuple[bool, int | None]:
    """(cpu_only, cuda index to make current) from the settings' default devices."""
    wanted = [str(getattr(settings, name, "auto") or "auto").strip().lower() for name in ("vae_device", "clip_device")]
    cpu_only = not _accelerator_available() or all(w == "cpu" for w in wanted)
    indices = {int(w.split(":", 1)[1]) for w in wanted if w.startswith("cuda:") and w.split(":", 1)[1].isdigit()}
    index = next(iter(indices)) if len(indices) == 1 else None
    return cpu_only, index


def _comfy_location(package, sd_module) -> Path:
    """The ComfyUI root the imported ``comfy`` comes from (symlinks resolved). ComfyUI's
    ``comfy`` is a namespace package: no __init__.py, ``__file__`` is None, and ``__path__``
    may list several folders; the one holding the ``comfy.sd`` in use decides."""
    sd_file = getattr(sd_module, "__file__", None)
    if sd_file:
        return Path(sd_file).resolve().parent.parent
    portions = list(getattr(package, "__path__", None) or ())
    return Path(portions[0]).resolve().parent if portions else Path.cwd()


def _import_comfy(root: Path | None, settings) -> SimpleNamespace:
    """Import comfy once per process with the flags set first; return its modules."""
    with _IMPORT_LOCK:
        if "modules" in _STATE:
            modules = _STATE["modules"]
            if root is not None and Path(root).resolve() != modules.root:
                # Every load calls this: say it once per ignored root, not on every load.
                warned = _STATE.setdefault("ignored_roots", set())
                if Path(root).resolve() not in warned:
                    warned.add(Path(root).resolve())
                    logger.warning("comfy was already imported from %s in this process; ignoring ComfyUI root %s",
                                   modules.root, root)
            return modules
        if root is not None and str(root) not in sys.path:
            sys.path.insert(0, str(root))
        already = "comfy.model_management" in sys.modules
        cpu_only, cuda_index = _device_plan(settings)
        with _keep_root_logging():
            try:
                options = importlib.import_module("comfy.options")
                with _argv_guard(options):
                    cli_args = importlib.import_module("comfy.cli_args")
                if already:
                    cpu_only = bool(getattr(cli_args.args, "cpu", False)) or not _accelerator_available()
                else:
                    if cpu_only:
                        cli_args.args.cpu = True
                    elif cuda_index is not None and torch.cuda.is_available():
                        if cuda_index >= torch.cuda.device_count():
                            raise EngineError("bad_args", f"cuda:{cuda_index} is not available "
                                                          f"({torch.cuda.device_count()} CUDA devices)")
                        torch.cuda.set_device(cuda_index)
                mm = importlib.import_module("comfy.model_management")
                sd = importlib.import_module("comfy.sd")
                utils = importlib.import_module("comfy.utils")
                lora = importlib.import_module("comfy.lora")
                weight_adapter = importlib.import_module("comfy.weight_adapter")
            except EngineError:
                raise
            except (Exception, SystemExit) as exc:  # SystemExit: argparse rejecting an argument
                where = f" from {root}" if root is not None else ""
                raise EngineError("model_error", f"cannot import ComfyUI's comfy package{where}: "
                                                 f"{type(exc).__name__}: {exc}") from exc
            try:
                folder_paths = importlib.import_module("folder_paths")
            except Exception as exc:  # noqa: BLE001 - only used to find the embeddings folders
                logger.warning("ComfyUI folder_paths unavailable (%s); using <root>/models/embeddings", exc)
                folder_paths = None
        location = _comfy_location(sys.modules["comfy"], sd)
        if root is not None and location != Path(root).resolve():
            logger.warning("the comfy package in use comes from %s, not the configured ComfyUI root %s", location, root)
        modules = SimpleNamespace(sd=sd, utils=utils, lora=lora, model_management=mm, weight_adapter=weight_adapter,
                                  folder_paths=folder_paths, root=location, cpu_only=cpu_only)
        _STATE["modules"] = modules
        logger.info("ComfyUI comfy package imported from %s (%s)", location,
                    "CPU only" if cpu_only else f"main device {mm.get_torch_device()}")
        return modules


@contextlib.contextmanager
def _comfy_call(what: str):
    """Hold the comfy lock, run in inference mode, keep logging, map OOM to ``oom``."""
    with _COMFY_LOCK, torch.inference_mode(), _keep_root_logging():
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError("oom", f"{what} ran out of memory: {exc}") from exc


# --------------------------------------------------------------------------- helpers


def _paths(paths: Sequence[str] | str, what: str) -> list[Path]:
    """The weight files of a load: each a regular file (inside the roots during a registry
    load), checked without opening it (see :func:`_held_open`)."""
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise EngineError("bad_args", f"{what} needs at least one path")
    for p in out:
        if fsutil.is_folder(p, what):
            raise EngineError("bad_args", f"{what} {fsutil.short(p)} is a folder; the comfy engine loads single weight "
                                          f"files, as ComfyUI's loaders do (point at the .safetensors file)")
        fsutil.stat_regular(p, f"{what} file")
    return out


@contextlib.contextmanager
def _held_open(paths: Sequence[Path], what: str):
    """Hold each file open (checked: regular, same inode) while ComfyUI reads it by name.

    ComfyUI's ``load_torch_file`` picks its reader by the file *name* (``.safetensors`` ->
    safetensors, which blocks holding the GIL on a FIFO), so it gets the checked real path,
    not ``/proc/self/fd/N``; a file swapped for a FIFO between this check and ComfyUI's
    open is the one case left (it needs write access to a model root)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(fsutil.open_regular(p, f"{what} file")).real for p in paths]


def _storage_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype holding most of the weights (a few scalars may be fp32)."""
    sizes: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _jsonable_ratio(value: Any, formula: Any, direction: str) -> Any:
    """int ratios stay ints; a video VAE's ``(lambda, s, s)`` becomes
    ``[{"temporal": "encode"|"decode", "factor": k}, s, s]`` (k from the index formula)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, (tuple, list)):
        out = []
        for i, item in enumerate(value):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                out.append(item)
            else:
                factor = formula[i] if isinstance(formula, (tuple, list)) and i < len(formula) else None
                out.append({"temporal": direction, "factor": factor})
        return out
    return None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _memory_model(fn: Any, *, encode: bool, dims: int, channels: int) -> dict[str, Any] | None:
    """A JSON model of a VAE's ``memory_used_encode`` / ``memory_used_decode`` lambda, so a
    proxy can answer it without a round trip: the bytes at a reference shape and, per
    dimension, the exponent the estimate grows with (probed by doubling that dimension) and
    the size below which it stops shrinking. ComfyUI's estimates are products of powers of
    the sizes, a few with the frame count clamped by ``max(frames, n)``, which this
    reproduces exactly; None when the lambda cannot be evaluated."""
    if not callable(fn):
        return None
    # [B, C, *sizes]: pixels for encode (sizes in pixels / frames), latents for decode.
    size = 64 if encode else 16
    shape = [1, channels] + [size] * max(1, dims)
    def at(i: int, value: int) -> float:
        probe = list(shape)
        probe[i] = value
        return float(fn(tuple(probe), torch.float32))

    try:
        base = float(fn(tuple(shape), torch.float32))
        exponents, floors = [], []
        for i in range(len(shape)):
            grown = at(i, shape[i] * 2)
            exponents.append(round(math.log2(grown / base), 3) if base > 0 and grown > 0 else 0.0)
            # A clamp such as ``max(frames, 7)``: the largest size that still costs as much as 1.
            smallest = at(i, 1)
            floors.append(max(v for v in range(1, 33) if at(i, v) == smallest) if exponents[-1] else 1)
    except Exception:  # noqa: BLE001 - an estimate for an unusual shape is optional
        return None
    return {"shape": shape, "bytes": base, "exponents": exponents, "floors": floors, "dtype_size": 4}


def _drop_dead_models() -> None:
    """Let comfy forget loaded-model entries whose patchers are gone (caller holds the lock)."""
    modules = _STATE.get("modules")
    if modules is None:
        return
    mm = modules.model_management
    for name in ("cleanup_models", "soft_empty_cache"):
        fn = getattr(mm, name, None)
        if callable(fn):
            try:
                fn()
            except Exception:  # best effort: memory is also reclaimed by the registry's gc
                logger.debug("comfy %s failed", name, exc_info=True)
