"""What the VAE and CLIP proxies share: the daemon model handle (``_Remote``), the
state-dict key stand-in, LoRA stack entries, model-root registration and the typed
unsupported error."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luna_daemon.client import DaemonError

log = logging.getLogger("luna_daemon.comfy")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float8_e4m3fn": None,
           "float8_e5m2": None, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
_BLOB_FORMAT = "luna-comfy-patches/1"


class DaemonUnsupported(RuntimeError):
    """A ComfyUI call the Luna Daemon cannot serve (the weights live in the daemon)."""


def intermediate_device() -> torch.device:
    """This ComfyUI's ``comfy.model_management.intermediate_device()`` (CPU without comfy).

    Only an already-imported ``comfy.model_management`` is used: importing it here could pick
    a device (or fail) in a process that is not ComfyUI."""
    mm = sys.modules.get("comfy.model_management")
    fn = getattr(mm, "intermediate_device", None)
    if callable(fn):
        try:
            return torch.device(fn())
        except Exception:
            log.debug("comfy intermediate_device() failed; using the CPU", exc_info=True)
    return torch.device("cpu")


def interrupt_check() -> Callable[[], None] | None:
    """ComfyUI's cancel, for a proxy waiting on the daemon: ``throw_exception_if_processing_
    interrupted`` (raises ``InterruptProcessingException`` and clears the flag, as a sampler
    would). ComfyUI's cancel only sets a flag in this process; without this a cancelled
    prompt would wait for the daemon's answer. None outside ComfyUI."""
    mm = sys.modules.get("comfy.model_management")
    fn = getattr(mm, "throw_exception_if_processing_interrupted", None)
    return fn if callable(fn) else None


def _to_client(value: Any) -> Any:
    """Floating tensors -> float32 on the intermediate device; containers recursively."""
    if isinstance(value, torch.Tensor):
        dev = intermediate_device()
        if value.is_floating_point():
            return value.to(device=dev, dtype=torch.float32)
        return value.to(device=dev)
    if isinstance(value, dict):
        return {k: _to_client(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_client(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_client(v) for v in value)
    return value


def _name_of(path: str) -> str:
    return Path(path).name if path else "?"


# ----------------------------------------------------------------------------- the handle


class _Remote:
    """What a proxy and all its clones share: the connection, the daemon's model id, the
    load answer (``info``), and how to register the model again after a daemon restart."""

    def __init__(self, conn: Any, kind: str, answer: dict, what: str,
                 reload: Callable[[], dict] | None = None):
        self.conn = conn
        self.kind = kind
        self.what = what
        self._reload = reload
        self._lock = threading.Lock()
        self._apply(answer)
        self._meta: _TextEncoderKeys | None = None

    def _apply(self, answer: dict) -> None:
        self.model_id = answer["model"]
        self.info = dict(answer.get("info") or {})
        self.daemon_device = answer.get("device")
        self.daemon_dtype = answer.get("dtype")

    @property
    def engine(self) -> str | None:
        return self.info.get("engine")

    def call(self, op: str, make_args: Callable[[str], dict], *, loras: list[_StackEntry] | None = None) -> Any:
        """Run ``op`` on this model. After a daemon restart (model or LoRA unknown, or the
        connection lost and back) the model is registered again and the call retried once."""
        for attempt in (0, 1):
            model_id = self.model_id
            try:
                return self.conn.call(op, make_args(model_id), check=interrupt_check())
            except DaemonError as exc:
                if attempt or exc.code != "not_found":
                    raise self._explain(exc) from None
                self._recover(model_id, loras, lora_only=bool(loras) and "LoRA" in exc.message)
        raise AssertionError("unreachable")

    def _recover(self, failed_id: str, loras: list[_StackEntry] | None, *, lora_only: bool = False) -> None:
        with self._lock:
            if self.model_id == failed_id and not lora_only:
                if self._reload is None:
                    raise DaemonError("not_found", f"{self.what} is no longer loaded in the Luna Daemon and cannot be "
                                                   "registered again from here; re-run its loader node")
                log.info("Luna Daemon lost %s (restarted or unloaded); registering it again", self.what)
                _send_roots(self.conn, force=True)  # a restarted daemon forgot this ComfyUI's folders too
                self._apply(self._reload())
        for entry in loras or ():
            ensure_lora(self.conn, entry.sha256, entry.blob)

    def _explain(self, exc: DaemonError) -> DaemonError:
        if exc.code == "busy":
            return DaemonError(exc.code, f"{exc.message} (the Luna Daemon is serving other ComfyUI instances; "
                                         "queue_size / max_connections in its config set the limits)")
        return exc

    # -- CLIP keys

    def text_encoder_keys(self) -> _TextEncoderKeys:
        with self._lock:
            if self._meta is None:
                entries = self.info.get("state_dict")
                if not entries:
                    raise DaemonUnsupported(
                        f"the Luna Daemon did not send the text encoder's state-dict keys for {self.what} (its engine is "
                        f"{self.engine or 'unknown'}); ComfyUI's LoRA loading needs the daemon to run engine = comfy")
                self._meta = _TextEncoderKeys(entries, self.what)
            return self._meta


def ensure_lora(conn: Any, sha256: str, blob: bytes) -> None:
    """Make the daemon hold ``blob`` (uploaded only when ``lora_has`` says it lacks it)."""
    if not conn.call("lora_has", {"sha256": sha256})["present"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer over read-only bytes: never written
            data = torch.frombuffer(blob, dtype=torch.uint8)
        conn.call("lora_put", {"data": data, "sha256": sha256, "name": f"comfy-patches-{sha256[:12]}"})


class _TextEncoderKeys:
    """``cond_stage_model`` stand-in: ``state_dict()`` has the daemon model's real key names,
    shapes and dtypes as meta tensors (no memory). ComfyUI's LoRA key mapping only reads the
    keys; everything else says the text encoder lives in the daemon."""

    def __init__(self, entries: list, what: str):
        self._what = what
        self._shapes: OrderedDict[str, tuple[tuple[int, ...], torch.dtype]] = OrderedDict()
        for key, shape, dtype in entries:
            self._shapes[str(key)] = (tuple(int(d) for d in shape), _DTYPES.get(str(dtype)) or torch.float32)
        self._meta = OrderedDict((k, torch.empty(s, dtype=dt, device="meta")) for k, (s, dt) in self._shapes.items())

    def state_dict(self, *args: Any, **kwargs: Any) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(self._meta)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...] | None:
        item = self._shapes.get(key)
        return None if item is None else item[0]

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"cond_stage_model.{name}: the text encoder of {self._what} lives in the Luna Daemon; "
                             "only state_dict() (key names, meta tensors) is available in ComfyUI")


@dataclass(frozen=True)
class _StackEntry:
    """One ``add_patches`` call: the daemon-side LoRA id, its strength and the blob (kept so
    a restarted daemon can be sent it again)."""

    sha256: str
    strength: float
    blob: bytes = b""

    def wire(self) -> dict:
        return {"lora": self.sha256, "strength": self.strength}



# ----------------------------------------------------------------------------- factories


def _device_dtype_args(device: str | None, dtype: str | None) -> dict:
    out = {}
    if device and device != "default":
        out["device"] = device
    if dtype and dtype != "default":
        out["dtype"] = dtype
    return out


def _daemon_roots(conn: Any, message: str) -> list[Path]:
    """The model roots the daemon reads, from its ``forbidden_path`` message ("... outside
    the configured model_roots (a, b)"); else what this side's settings (the same config
    file) resolve to."""
    found = re.search(r"model_roots \((.*)\)\s*$", message)
    if found:
        return [Path(os.path.realpath(p)) for p in found.group(1).split(", ") if p]
    resolve = getattr(conn.settings, "resolved_model_roots", None)
    return [Path(os.path.realpath(p)) for p in resolve()] if callable(resolve) else []


def _forbidden_hint(conn: Any, exc: DaemonError, path: str) -> DaemonError:
    """A ``forbidden_path`` error plus what to change: ``comfyui_root`` only when the daemon
    does not already read this ComfyUI's ``models`` folder, else ``model_roots``."""
    if exc.code != "forbidden_path":
        return exc
    base = getattr(sys.modules.get("folder_paths"), "base_path", None)
    folder = Path(path).parent
    config = getattr(conn.settings, "config_file", "") or "the Luna Daemon config.toml"
    if base and Path(os.path.realpath(base)) / "models" not in _daemon_roots(conn, exc.message):
        advice = f'set comfyui_root = "{base}" (this ComfyUI\'s folder) or add "{folder}" to model_roots'
    elif base:
        advice = f'add "{folder}" to model_roots (the daemon already reads this ComfyUI\'s models folder)'
    else:
        advice = f'add "{folder}" to model_roots (or set comfyui_root to this ComfyUI\'s folder)'
    return DaemonError(exc.code, f"{exc.message}. The Luna Daemon only reads model files under its model_roots: "
                                 f"{advice} in {config}, then restart the daemon")


def _send_roots(conn: Any, *, force: bool = False) -> None:
    """This ComfyUI's model folders to the daemon (:meth:`Connection.ensure_roots`)."""
    ensure = getattr(conn, "ensure_roots", None)
    if ensure is not None:
        ensure(force=force)


def _load_in_roots(conn: Any, op: str, args: dict, path: str) -> dict:
    """``op`` after this ComfyUI's folders were registered; on ``forbidden_path`` they are
    sent again once (a restarted daemon forgot them) before the error is explained."""
    _send_roots(conn)
    for attempt in (0, 1):
        try:
            return conn.call(op, args, check=interrupt_check())
        except DaemonError as exc:
            if attempt or exc.code != "forbidden_path" or getattr(conn, "ensure_roots", None) is None:
                raise _forbidden_hint(conn, exc, path) from None
            _send_roots(conn, force=True)
    raise AssertionError("unreachable")
