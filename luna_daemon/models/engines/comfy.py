"""The comfy engine: ComfyUI's own ``comfy`` package loads and runs the models.

Results are those of the stock nodes, because the same code computes them: VAEs are
``comfy.sd.VAE`` objects, CLIPs are ``comfy.sd.CLIP`` objects built by ``comfy.sd.load_clip``,
and LoRAs are applied with ``CLIP.clone()`` + ``add_patches`` exactly as ``LoraLoader`` does.

Importing ``comfy`` (done once per process, on first use or :meth:`ComfyEngine.prepare`):

* ``<root>`` is put first on ``sys.path`` (once).
* ``comfy.options.enable_args_parsing`` is never called, so ``comfy.cli_args`` parses an
  empty argument list and the daemon's own ``sys.argv`` is never seen (if something else
  already enabled parsing, ``sys.argv`` is swapped for ``[argv0]`` during the import).
* Before ``comfy.model_management`` is imported (it picks the device at import time and
  fails on a CPU-only torch without ``--cpu``): ``comfy.cli_args.args.cpu = True`` when torch
  has no usable accelerator or ``vae_device`` / ``clip_device`` both say ``cpu``; when they
  name one specific ``cuda:N``, ``torch.cuda.set_device(N)`` makes it comfy's main device
  (``CUDA_VISIBLE_DEVICES`` is left alone: it would renumber the devices the daemon reports).
* ``comfy`` logs through the root logger, and the module-level ``logging`` calls install a
  stderr handler when the root has none. The root logger's handlers, level and filters are
  restored after the import and after every engine call, so the host's logging set-up is
  never changed. In a host, ``luna_daemon.logs`` has a handler on the root logger before
  comfy is imported: comfy's records then go to the daemon's log file and dashboard (and
  WARNING+ back to the calling client), and comfy never adds a stderr handler of its own.

Concurrency: ``comfy`` keeps process-wide, unsynchronised state (``current_loaded_models``,
the live patch set on each shared module, the clip-layer options). Every load, encode and
decode holds one process-wide lock, which serialises per device and per base model too (a
per-device lock would still let two devices edit the global loaded-model list at once).
Tokenizing only reads the tokenizer and takes a per-CLIP lock instead. Every call runs inside
``torch.inference_mode()``.

LoRA: a ``LoraSpec`` stack is applied to a clone of the loaded CLIP: each spec's pairs are
handed to ``comfy.lora.load_lora`` as ``<prefix>.lora_up.weight`` / ``.lora_down.weight`` /
``.alpha`` tensors with a ``{prefix: target key}`` map, which rebuilds the
``comfy.weight_adapter.LoRAAdapter`` patches ``LoraLoader`` would make, and the clone gets
``add_patches(patches, strength)``, one call per spec in stack order (the patch lists a chain
of LoraLoader nodes builds). Patched clones are cached per stack
(``(sha256, strength)`` pairs, small LRU), so a repeated stack is not rebuilt and, while it
stays the live patch set, not re-patched. ``patchable_keys()`` are the values of
``comfy.lora.model_lora_keys_clip`` for the loaded text encoder, i.e. the
``cond_stage_model`` state-dict keys a LoRA can target (``clip_l.transformer.text_model...``).

Devices: a model's device must exist (else ``bad_args`` listing the devices); when comfy was
set up CPU-only, accelerators are refused. Models on an accelerator are loaded there at once
and pinned (``load_device == offload_device``), so comfy never moves them behind the
registry's back; the registry owns residency.

VAE configs: ComfyUI sizes a KL VAE from its keys assuming SD dimensions. For a smaller KL
VAE the engine passes ``config=`` (the ``{"params": {"embed_dim", "ddconfig"}}`` form
``comfy.sd.VAE`` takes): from a ``<stem>.json`` next to the file (that form, a bare
``ddconfig``, or a diffusers ``AutoencoderKL`` config), else inferred from the weight shapes.
SD-sized and non-KL VAEs are left to ComfyUI's own detection.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from luna_daemon import fsutil

from .base import ClipModel, Engine, EngineError, LoraSpec, TiledArgs, VaeModel, as_device, module_nbytes

logger = logging.getLogger(__name__)

DEFAULT_LORA_CACHE_ENTRIES = 4

# Daemon clip_type names -> comfy.sd.CLIPType member names (anything else: NAME.upper()).
_CLIP_TYPE_ALIASES = {
    "sd1": "STABLE_DIFFUSION", "sd15": "STABLE_DIFFUSION", "sd1.5": "STABLE_DIFFUSION",
    "sd2": "STABLE_DIFFUSION", "sd21": "STABLE_DIFFUSION", "stable_diffusion": "STABLE_DIFFUSION",
    "sdxl": "STABLE_DIFFUSION", "sdxl_refiner": "STABLE_DIFFUSION", "sd35": "SD3", "sd3.5": "SD3",
}
# How many files a clip_type takes, where that is fixed.
_CLIP_FILE_COUNTS = {"sd1": 1, "sd15": 1, "sd1.5": 1, "sd2": 1, "sd21": 1, "sdxl_refiner": 1, "sdxl": 2, "flux": 2}

# comfy's hard-coded KL VAE size (SD1/SD2/SDXL/SD3/Flux): detection handles these itself.
_SD_KL = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "in_channels": 3, "out_ch": 3}

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


# -------------------------------------------------------------------- VAE configs


def _ddconfig_from_diffusers(cfg: Mapping[str, Any], what: str) -> dict[str, Any]:
    boc = [int(c) for c in cfg["block_out_channels"]]
    ch = boc[0]
    if any(c % ch for c in boc):
        raise EngineError("model_error", f"{what}: block_out_channels {boc} are not multiples of {ch}")
    if int(cfg.get("norm_num_groups", 32)) != 32:
        raise EngineError("model_error", f"{what}: ComfyUI's VAE uses 32 norm groups, the config says "
                                         f"{cfg.get('norm_num_groups')}")
    if cfg.get("use_quant_conv", True) is False or cfg.get("use_post_quant_conv", True) is False:
        raise EngineError("model_error", f"{what}: a KL VAE without quant convs cannot be given a config in ComfyUI")
    z = int(cfg.get("latent_channels", 4))
    if z != 4:
        raise EngineError("model_error", f"{what}: ComfyUI's configured KL VAE has 4 latent channels, the config "
                                         f"says {z}")
    return {"embed_dim": z, "ddconfig": {
        "double_z": True, "z_channels": z, "resolution": 256,
        "in_channels": int(cfg.get("in_channels", 3)), "out_ch": int(cfg.get("out_channels", 3)), "ch": ch,
        "ch_mult": [c // ch for c in boc], "num_res_blocks": int(cfg.get("layers_per_block", 2)),
        "attn_resolutions": [], "dropout": 0.0}}


def _sidecar_vae_config(path: Path) -> dict[str, Any] | None:
    sidecar = path.with_suffix(".json")
    what = f"VAE config {sidecar.name}"
    if not fsutil.present(sidecar, what):
        return None
    data = fsutil.read_json(sidecar, what)  # a small regular file inside the roots, else a typed error
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("params"), dict):
        return data
    if "ddconfig" in data:
        return {"params": data}
    if "block_out_channels" in data:
        return {"params": _ddconfig_from_diffusers(data, what)}
    return None  # e.g. the standalone engine's {"norm_num_groups": ...}: not a comfy config


def _count(sd: Mapping[str, Any], fmt: str) -> int:
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def _inferred_vae_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """A ``config`` for a 4-channel KL VAE whose sizes differ from SD's, from weight shapes
    (LDM or diffusers key layout); None where ComfyUI's own detection should run."""
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
            "quant_conv.weight", "post_quant_conv.weight")
    if any(k not in sd for k in need):
        return None
    if "encoder.down.0.block.0.conv1.weight" in sd:
        level_fmt, block_fmt, attn = "encoder.down.{}.block.0.conv1.weight", "encoder.down.0.block.{}.conv1.weight", "encoder.mid.attn_1.q.weight"
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        level_fmt, block_fmt = "encoder.down_blocks.{}.resnets.0.conv1.weight", "encoder.down_blocks.0.resnets.{}.conv1.weight"
        attn = next((k for k in sd if k.startswith("encoder.mid_block.attentions.0.")), None)
    else:
        return None
    if attn is None or attn not in sd:
        return None  # ComfyUI's KL VAE always has the mid-block attention
    ch = int(sd["encoder.conv_in.weight"].shape[0])
    levels = _count(sd, level_fmt)
    outs = [int(sd[level_fmt.format(i)].shape[0]) for i in range(levels)]
    z = int(sd["decoder.conv_in.weight"].shape[1])
    embed = int(sd["post_quant_conv.weight"].shape[1])
    if not levels or any(c % ch for c in outs) or any(c % 32 for c in outs) or z != 4 or embed != 4:
        return None
    if int(sd["encoder.conv_out.weight"].shape[0]) != 2 * z:
        return None
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256,
                "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
                "out_ch": int(sd["decoder.conv_out.weight"].shape[0]), "ch": ch, "ch_mult": [c // ch for c in outs],
                "num_res_blocks": _count(sd, block_fmt), "attn_resolutions": [], "dropout": 0.0}
    if all(ddconfig[k] == v for k, v in _SD_KL.items()):
        return None
    return {"params": {"embed_dim": embed, "ddconfig": ddconfig}}


# ----------------------------------------------------------------------------- VAE


class ComfyVae(VaeModel):
    """A ``comfy.sd.VAE`` behind the ``VaeModel`` interface: any class ComfyUI builds (image,
    video with 5-D latents, audio). Tensors go to ComfyUI's own ``encode`` / ``decode`` /
    ``*_tiled`` unchanged (its crop, frame folding and temporal tiling apply); only ranks the
    VAE cannot take are refused first, as ``bad_args``. ``info()`` carries every attribute a
    proxy mirrors, the memory estimates as :func:`_memory_model` models."""

    def __init__(self, vae: Any, *, source: str):
        self._vae = vae
        self.source = source
        self.device = torch.device(vae.device)
        self.dtype = vae.vae_dtype
        self._nbytes = module_nbytes(vae.first_stage_model)
        self._info = self._build_info(vae)

    @staticmethod
    def _build_info(vae: Any) -> dict[str, Any]:
        def call(name: str) -> Any:
            fn = getattr(vae, name, None)
            try:
                return _jsonable(fn()) if callable(fn) else None
            except Exception:  # noqa: BLE001 - an optional attribute of some comfy versions
                return None

        down_formula = getattr(vae, "downscale_index_formula", None)
        up_formula = getattr(vae, "upscale_index_formula", None)
        return {
            "engine": "comfy",
            "latent_channels": int(vae.latent_channels),
            "downscale_ratio": _jsonable_ratio(vae.downscale_ratio, down_formula, "encode"),
            "upscale_ratio": _jsonable_ratio(vae.upscale_ratio, up_formula, "decode"),
            "latent_dim": int(getattr(vae, "latent_dim", 2)),
            "output_channels": int(getattr(vae, "output_channels", 3)),
            "downscale_index_formula": _jsonable(down_formula),
            "upscale_index_formula": _jsonable(up_formula),
            "spacial_compression_encode": call("spacial_compression_encode"),
            "spacial_compression_decode": call("spacial_compression_decode"),
            "temporal_compression_decode": call("temporal_compression_decode"),
            "crop_input": bool(getattr(vae, "crop_input", True)),
            "not_video": bool(getattr(vae, "not_video", False)),
            "extra_1d_channel": _jsonable(getattr(vae, "extra_1d_channel", None)),
            "working_dtypes": _jsonable(getattr(vae, "working_dtypes", None)),
            "vae_dtype": _jsonable(vae.vae_dtype),
            "memory_used_encode": _memory_model(getattr(vae, "memory_used_encode", None), encode=True,
                                                dims=int(getattr(vae, "latent_dim", 2)), channels=3),
            "memory_used_decode": _memory_model(getattr(vae, "memory_used_decode", None), encode=False,
                                                dims=int(getattr(vae, "latent_dim", 2)),
                                                channels=int(vae.latent_channels)),
        }

    def nbytes(self) -> int:
        return self._nbytes if self._vae is not None else 0

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def release(self) -> None:
        vae, self._vae = self._vae, None
        if vae is None:
            return
        with _comfy_call("VAE release"):
            del vae
            _drop_dead_models()
        self._nbytes = 0

    def _require(self) -> Any:
        vae = self._vae
        if vae is None:
            raise EngineError("model_error", f"VAE {self.source} has been released")
        return vae

    def _what(self) -> str:
        return f"VAE {Path(self.source).name}"

    def _check_shape(self, vae: Any, tensor: torch.Tensor, what: str, layout: str) -> None:
        """The tensor ranks ComfyUI's VAE takes: ``latent_dim + 2``, and for a video VAE's
        encode also a 4-D batch of frames (one clip); anything else would fail deep in comfy."""
        dims = int(getattr(vae, "latent_dim", 2))
        ranks = {dims + 2}
        if what == "encode" and dims == 3:
            ranks.add(4)  # [T, H, W, C] frames: comfy treats them as one clip (or T images, not_video)
        if what == "decode" and getattr(vae, "extra_1d_channel", None) is not None:
            ranks.add(3)
        if tensor.ndim not in ranks:
            want = " or ".join(f"{r}-D" for r in sorted(ranks))
            raise EngineError("bad_args", f"{self._what()} {what} takes {want} {layout} tensors (latent_dim "
                                          f"{dims}), got shape {list(tensor.shape)}")

    def encode(self, pixels: torch.Tensor, tiled: TiledArgs | None = None) -> torch.Tensor:
        vae = self._require()
        if not isinstance(pixels, torch.Tensor) or pixels.ndim < 3 or not pixels.is_floating_point():
            raise EngineError("bad_args", "VAE encode expects a float tensor [B, H, W, C]")
        self._check_shape(vae, pixels, "encode", "pixel")
        if int(getattr(vae, "latent_dim", 2)) == 2 and pixels.ndim == 4 and pixels.shape[-1] > vae.output_channels:
            pixels = pixels[..., : vae.output_channels]  # what VAEEncode does (drops alpha)
        with _comfy_call(f"{self._what()} encode"):
            if tiled is None:
                out = vae.encode(pixels)
            else:
                out = vae.encode_tiled(pixels, tile_x=tiled.tile_x, tile_y=tiled.tile_y, overlap=tiled.overlap,
                                       tile_t=tiled.tile_t, overlap_t=tiled.overlap_t)
            return out.float().cpu().contiguous()

    # ``decode(..., options={...})`` is ComfyUI's ``decode(samples, vae_options=...)``.
    supports_vae_options = True

    def decode(self, latent: torch.Tensor, tiled: TiledArgs | None = None,
               options: Mapping[str, Any] | None = None) -> torch.Tensor:
        vae = self._require()
        if not isinstance(latent, torch.Tensor) or latent.ndim < 3 or not latent.is_floating_point():
            raise EngineError("bad_args", "VAE decode expects a float latent tensor [B, C, h, w] / [B, C, T, h, w]")
        if latent.shape[1] != vae.latent_channels:
            raise EngineError("bad_args", f"VAE decode expects {vae.latent_channels} latent channels, got {latent.shape[1]}")
        self._check_shape(vae, latent, "decode", "latent")
        if options and tiled is not None:
            raise EngineError("bad_args", "vae_options cannot be combined with a tiled decode (ComfyUI's decode_tiled "
                                          "takes none)")
        with _comfy_call(f"{self._what()} decode"):
            if tiled is None and options:
                try:
                    out = vae.decode(latent, vae_options=dict(options))
                except TypeError as exc:  # the model's decode() takes no such keyword
                    raise EngineError("bad_args", f"{self._what()} does not take vae_options {sorted(options)}: "
                                                  f"{_first_line(exc)}") from exc
            elif tiled is None:
                out = vae.decode(latent)
            else:
                out = vae.decode_tiled(latent, tile_x=tiled.tile_x, tile_y=tiled.tile_y, overlap=tiled.overlap,
                                       tile_t=tiled.tile_t, overlap_t=tiled.overlap_t)
            return out.float().cpu().contiguous()


# ---------------------------------------------------------------------------- CLIP


class ComfyClip(ClipModel):
    """A ``comfy.sd.CLIP`` behind the ``ClipModel`` interface. Thread-safe."""

    def __init__(self, comfy: SimpleNamespace, clip: Any, *, clip_type: str, comfy_clip_type: str, source: str,
                 embedding_directories: list[str], lora_cache_entries: int = DEFAULT_LORA_CACHE_ENTRIES):
        self._comfy = comfy
        self._clip = clip
        self.clip_type = clip_type
        self.source = source
        self.device = torch.device(clip.patcher.load_device)
        self.dtype = _storage_dtype(clip.cond_stage_model)
        self._lora_cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lora_cache_entries = max(0, int(lora_cache_entries))
        self._tokenize_lock = threading.Lock()
        state = clip.cond_stage_model.state_dict()
        self._shapes = {k: tuple(v.shape) for k, v in state.items()}
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        self._patchable = sorted({v for v in key_map.values() if isinstance(v, str) and v in self._shapes})
        self._nbytes = module_nbytes(clip.cond_stage_model)
        with self._tokenize_lock, torch.inference_mode(), _keep_root_logging():
            self._token_keys = list(clip.tokenize("").keys())
        self._info = {
            "engine": "comfy",
            "clip_type": clip_type,
            "comfy_clip_type": comfy_clip_type,
            "model_class": type(clip.cond_stage_model).__name__,
            "tokenizer_keys": list(self._token_keys),
            "layer_idx": clip.layer_idx,
            "embedding_directories": list(embedding_directories),
            "state_dict": [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()],
            "patchable_keys": len(self._patchable),
        }

    def nbytes(self) -> int:
        return self._nbytes if self._clip is not None else 0

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def release(self) -> None:
        clip, self._clip = self._clip, None
        if clip is None:
            return
        with _comfy_call("CLIP release"):
            self._lora_cache.clear()
            del clip
            _drop_dead_models()
        self._nbytes = 0

    def _require(self) -> Any:
        clip = self._clip
        if clip is None:
            raise EngineError("model_error", f"CLIP {self.source} has been released")
        return clip

    # -- ClipModel

    def patchable_keys(self) -> list[str]:
        self._require()
        return list(self._patchable)

    # ``tokenize(..., embedding_directories=[...])`` looks ``embedding:`` names up there.
    supports_embedding_directories = True

    def tokenize(self, text: str, embedding_directories: Sequence[str] | None = None,
                 **options: Any) -> dict[str, list[list[tuple]]]:
        """The CLIP's own ``tokenize`` (weights syntax, ``embedding:`` names, per-encoder keys).

        ``embedding_directories`` (the calling ComfyUI's embedding folders, already checked
        to lie in the model roots) replace the folders found at load time for this call, so
        an ``embedding:`` resolves as in that ComfyUI; a name found nowhere is ComfyUI's own
        warning ("embedding:... does not exist, ignoring"), which reaches the caller."""
        clip = self._require()
        if not isinstance(text, str):
            raise EngineError("bad_args", f"tokenize expects a string, got {type(text).__name__}")
        with self._tokenize_lock, torch.inference_mode(), _keep_root_logging(), \
                _embedding_folders(clip, embedding_directories):
            try:
                return clip.tokenize(text, **options)
            except TypeError as exc:
                raise EngineError("bad_args", f"tokenize: {exc}") from exc

    def _check_tokens(self, tokens: Any) -> dict[str, Any]:
        """The token dict as ComfyUI's tokenizer made it, unchanged apart from the wire's
        number forms (a float id that is an integer becomes an int).

        Whatever shape a stock node gives it passes through: empty chunk lists
        (``CLIPTextEncodeSD3`` with ``empty_padding = none``), ``(token, weight, word_id)``
        items, embedding vectors (tensors) and image dicts (``{"type": "image", "data":
        tensor}``, Qwen-Image edit) as tokens, keys this CLIP does not read. Only what would
        crash ComfyUI's encoder in a confusing way is refused here, as ``bad_args`` naming
        the place; anything else ComfyUI itself rejects comes back as ``model_error``."""
        if not isinstance(tokens, Mapping) or not tokens:
            raise EngineError("bad_args", "tokens must be a non-empty dict {encoder_key: [chunk, ...]}")
        missing = [k for k in self._token_keys if k not in tokens]
        if missing:
            raise EngineError("bad_args", f"tokens lack the {', '.join(map(repr, missing))} encoder's chunks "
                                          f"(this CLIP uses {self._token_keys})")
        out: dict[str, Any] = {}
        for key, chunks in tokens.items():
            if key not in self._token_keys:
                out[key] = chunks  # not an encoder stream of this CLIP: ComfyUI ignores it, so do we
                continue
            if not isinstance(chunks, (list, tuple)):
                raise EngineError("bad_args", f"tokens[{key!r}] must be a list of chunks (it may be empty)")
            fixed = []
            for chunk in chunks:
                if not isinstance(chunk, (list, tuple)):
                    raise EngineError("bad_args", f"tokens[{key!r}]: every chunk must be a list of (token, weight) items")
                fixed.append([self._check_item(key, item) for item in chunk])
            out[key] = fixed
        return out

    @staticmethod
    def _check_item(key: str, item: Any) -> Any:
        if isinstance(item, Mapping):
            return item
        if not isinstance(item, (list, tuple)) or len(item) < 2:
            raise EngineError("bad_args", f"tokens[{key!r}]: expected (token, weight) items, got {item!r}")
        token, weight = item[0], item[1]
        if isinstance(token, bool) or not isinstance(token, (int, float, torch.Tensor, Mapping)):
            raise EngineError("bad_args", f"tokens[{key!r}]: bad token {token!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise EngineError("bad_args", f"tokens[{key!r}]: weight {weight!r} is not a number")
        if isinstance(token, float):
            if not token.is_integer():
                raise EngineError("bad_args", f"tokens[{key!r}]: token id {token!r} is not an integer")
            token = int(token)
        return (token, weight, *item[2:]) if token is not item[0] else tuple(item)

    # ``encode(..., unprojected=True)`` is ``encode_from_tokens(return_pooled="unprojected")``.
    supports_unprojected = True

    def encode(self, tokens: dict[str, list[list[tuple]]], layer: int | None = None,
               loras: Sequence[LoraSpec] = (), unprojected: bool = False) -> dict[str, Any]:
        """``encode_from_tokens(tokens, return_pooled=True, return_dict=True)`` on the loaded
        CLIP, a clone with ``clip_layer(layer)`` when a layer is given, patched with ``loras``.
        ``unprojected`` asks for ``return_pooled="unprojected"`` (GLIGEN's pooled output)."""
        clip = self._require()
        tokens = self._check_tokens(tokens)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise EngineError("bad_args", f"layer must be an integer, got {layer!r}")
        active = [spec for spec in loras if float(spec.strength) != 0.0 and spec.weights]
        with _comfy_call(f"CLIP {Path(self.source).name} encode"):
            target = self._lora_clip(clip, active) if active else clip
            if layer is not None:
                target = target.clone()
                target.clip_layer(int(layer))
            out = target.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected else True,
                                            return_dict=True)
            result: dict[str, Any] = {}
            for key, value in out.items():
                if isinstance(value, torch.Tensor):
                    value = value.float() if value.is_floating_point() else value
                    value = value.cpu().contiguous()
                result[key] = value
        return result

    # -- LoRA

    def _lora_clip(self, clip: Any, specs: Sequence[LoraSpec]) -> Any:
        """A clone of ``clip`` carrying ``specs`` (cached per stack). Caller holds the lock."""
        key = tuple((str(spec.sha256), float(spec.strength)) for spec in specs)
        cached = self._lora_cache.get(key)
        if cached is not None:
            self._lora_cache.move_to_end(key)
            return cached
        patched = clip.clone()
        for spec in specs:
            lora_sd: dict[str, torch.Tensor] = {}
            to_load: dict[str, str] = {}
            unknown = []
            for i, (target, triple) in enumerate(spec.weights.items()):
                shape = self._shapes.get(target)
                if shape is None:
                    unknown.append(target)
                    continue
                up, down, alpha = self._check_lora_pair(spec, target, triple, shape)
                prefix = f"luna_lora_{i}"
                to_load[prefix] = target
                lora_sd[prefix + ".lora_up.weight"] = up
                lora_sd[prefix + ".lora_down.weight"] = down
                if alpha is not None:
                    lora_sd[prefix + ".alpha"] = torch.tensor(alpha, dtype=torch.float64)  # .item() is exact
            # ComfyUI's own loader turns the pairs into the LoRAAdapter patches LoraLoader makes.
            patches = self._comfy.lora.load_lora(lora_sd, to_load)
            accepted = set(patched.add_patches(patches, float(spec.strength)))
            unknown += [k for k in to_load.values() if k not in accepted]
            if unknown:
                logger.warning("LoRA %s: %d of %d keys match no text-encoder weight and are ignored, e.g. %s",
                               spec.sha256[:12], len(unknown), len(spec.weights), unknown[:3])
        if self._lora_cache_entries:
            self._lora_cache[key] = patched
            while len(self._lora_cache) > self._lora_cache_entries:
                self._lora_cache.popitem(last=False)
        return patched

    @staticmethod
    def _check_lora_pair(spec: LoraSpec, target: str, triple: Any, shape: tuple[int, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        try:
            up, down, alpha = triple
        except (TypeError, ValueError):
            raise EngineError("bad_args", f"LoRA {spec.sha256[:12]} {target}: expected (up, down, alpha)") from None
        if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.ndim < 2 or down.ndim < 2:
            raise EngineError("bad_args", f"LoRA {spec.sha256[:12]} {target}: up/down must be matrices")
        rank = down.shape[0]
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        if (up.shape[0] != shape[0] or up.reshape(up.shape[0], -1).shape[1] != rank
                or down.reshape(rank, -1).shape[1] != fan_in):
            raise EngineError("bad_args", f"LoRA {spec.sha256[:12]} {target}: up {tuple(up.shape)} @ down "
                                          f"{tuple(down.shape)} does not match the weight's shape {shape}")
        return up, down, None if alpha is None else float(alpha)


# Checkpoint Tunnel: a ``comfy.sd.CLIP.get_sd()`` state dict -> standalone text-encoder files.
# Observed in ComfyUI v0.3.64: every sub-model of a CLIP's ``cond_stage_model`` keeps its
# weights under ``<name>.transformer.<key of the standalone file>`` (``clip_l.transformer.
# text_model.*``, ``t5xxl.transformer.encoder.*``, ``gemma2_2b.transformer.model.*``, ...) plus
# a ``<name>.logit_scale`` scalar, and tokenizers that carry data add it unprefixed
# (``spiece_model``: Wan's umT5, Lumina2's Gemma). Stripping the prefix gives the files
# ``comfy.sd.load_clip`` reads; this order is the file order passed to it.
_TE_SUBMODELS = ("clip_l", "clip_g", "clip_h", "t5xxl", "umt5xxl", "gemma2_2b", "llama", "qwen25_7b", "qwen25_3b")
_TOKENIZER_KEYS = ("spiece_model",)
_SD3_PARTS = ("clip_l", "clip_g", "t5xxl")
# (cond_stage_model class, tokenizer class) -> (clip_type, the sub-model sets load_clip rebuilds as
# that same class). The tokenizer matters: LTXV and Mochi share MochiTEModel_ but tokenize
# differently, and SD3 / SDXL / Flux share sub-model names. SD3: any non-empty subset, as
# load_clip builds SD3 from 1, 2 or 3 of those files with clip_type sd3 (3 files are SD3 anyway).
# HiDream is absent: its 3-encoder subsets load as SD3 from files, and ComfyUI's HiDream
# checkpoints carry no text encoder.
_SPLIT_CLASSES: dict[tuple[str, str], tuple[str, tuple[tuple[str, ...], ...]]] = {
    ("SD1ClipModel", "SD1Tokenizer"): ("sd1", (("clip_l",),)),
    ("SD2ClipModel", "SD2Tokenizer"): ("sd2", (("clip_h",),)),
    ("SDXLClipModel", "SDXLTokenizer"): ("sdxl", (("clip_l", "clip_g"),)),
    ("SDXLRefinerClipModel", "SDXLTokenizer"): ("sdxl_refiner", (("clip_g",),)),
    ("StableCascadeClipModel", "StableCascadeTokenizer"): ("stable_cascade", (("clip_g",),)),
    ("SD3ClipModel_", "SD3Tokenizer"): ("sd3", tuple(
        tuple(n for i, n in enumerate(_SD3_PARTS) if mask >> i & 1) for mask in range(1, 8))),
    ("FluxClipModel_", "FluxTokenizer"): ("flux", (("clip_l", "t5xxl"),)),
    ("PixArtTEModel_", "PixArtTokenizer"): ("chroma", (("t5xxl",),)),  # = pixart: the same model and tokenizer
    ("MochiTEModel_", "MochiT5Tokenizer"): ("mochi", (("t5xxl",),)),
    ("MochiTEModel_", "LTXVT5Tokenizer"): ("ltxv", (("t5xxl",),)),
    ("WanTEModel", "WanT5Tokenizer"): ("wan", (("umt5xxl",),)),
    ("LuminaTEModel_", "LuminaTokenizer"): ("lumina2", (("gemma2_2b",),)),
    ("HunyuanVideoClipModel_", "HunyuanVideoTokenizer"): ("hunyuan_video", (("clip_l", "llama"),)),
    ("QwenImageTEModel_", "QwenImageTokenizer"): ("qwen_image", (("qwen25_7b",),)),
    ("Omnigen2TEModel_", "Omnigen2Tokenizer"): ("omnigen2", (("qwen25_3b",),)),
}
# Without a class hint (older clients) only combinations one class explains are accepted.
_SPLIT_DEFAULTS = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g",): "sdxl_refiner", ("clip_l", "clip_g"): "sdxl",
                   ("clip_l", "clip_g", "t5xxl"): "sd3"}


def split_clip_parts(sd: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A ``comfy.sd.CLIP.get_sd()`` state dict -> ``[(sub-model, standalone state dict), ...]``
    in load order.

    ``<name>.transformer.<key>`` becomes ``<key>`` (``clip_l.transformer.text_model.*`` ->
    ``text_model.*``, ``t5xxl.transformer.encoder.*`` -> ``encoder.*``), the layout of a
    standalone text-encoder file. Per sub-model scalars outside ``transformer.``
    (``logit_scale``) are not model weights and are dropped. Tokenizer data (``spiece_model``)
    goes into the file of the one sub-model (ComfyUI reads it from that file). Raises
    ``bad_args`` naming the keys that belong to no known sub-model, or tokenizer data beside
    several sub-models."""
    groups: dict[str, dict[str, Any]] = {}
    tokenizer: dict[str, Any] = {}
    others: list[str] = []
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head in _TE_SUBMODELS and rest:
            if rest.startswith("transformer."):
                groups.setdefault(head, {})[rest[len("transformer."):]] = value
            continue
        if key in _TOKENIZER_KEYS:
            tokenizer[key] = value
            continue
        others.append(key)
    if others or not groups:
        sample = ", ".join(sorted(others)[:3]) or "no weights of a known text-encoder sub-model"
        raise EngineError("bad_args", f"this text encoder cannot be split into files ComfyUI loads: it has {sample} "
                                      f"(known sub-models: {', '.join(_TE_SUBMODELS)}); load it with a Luna CLIP "
                                      f"loader from its files instead")
    names = [n for n in _TE_SUBMODELS if n in groups]
    if tokenizer:
        if len(names) != 1:
            raise EngineError("bad_args", f"tokenizer data ({', '.join(tokenizer)}) beside several text encoders "
                                          f"({', '.join(names)}) cannot be split into files ComfyUI loads")
        groups[names[0]].update(tokenizer)
    return [(n, groups[n]) for n in names]


def split_clip_type(names: Sequence[str], model_class: str | None = None, tokenizer_class: str | None = None) -> str:
    """The ``clip_type`` with which ``comfy.sd.load_clip`` rebuilds sub-models ``names`` (as
    split by :func:`split_clip_parts`) as the CLIP they came from: class ``model_class``
    (``type(clip.cond_stage_model).__name__``) with tokenizer ``tokenizer_class``. Without
    the classes only CLIP-L / CLIP-G / CLIP-H sets and SD3's three encoders are accepted.
    Anything else is ``bad_args`` naming the classes and sub-models."""
    names = tuple(names)
    listed = ", ".join(names) or "no sub-models"
    if not model_class and not tokenizer_class:
        clip_type = _SPLIT_DEFAULTS.get(names)
        if clip_type is None:
            raise EngineError("bad_args", f"text encoders {listed} fit several ComfyUI CLIP types; send model_class and "
                                          f"tokenizer_class (the Luna Checkpoint Tunnel does) to say which")
        return clip_type
    entry = _SPLIT_CLASSES.get((str(model_class), str(tokenizer_class)))
    if entry is None:
        known = ", ".join(sorted({m for m, _ in _SPLIT_CLASSES}))
        raise EngineError("bad_args", f"a {model_class} text encoder with a {tokenizer_class} cannot be rebuilt from "
                                      f"files by ComfyUI's load_clip (tunnelled CLIP classes: {known}); load it with a "
                                      f"Luna CLIP loader from its files instead")
    clip_type, allowed = entry
    if names not in allowed:
        raise EngineError("bad_args", f"a {model_class} text encoder with sub-models {listed} is not one ComfyUI builds "
                                      f"from files (expected {' or '.join('+'.join(a) for a in allowed)})")
    return clip_type


def split_clip_state_dict(sd: Mapping[str, Any], model_class: str | None = None, tokenizer_class: str | None = None
                          ) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """``(clip_type, [(sub-model, standalone sd), ...])``: :func:`split_clip_parts` and
    :func:`split_clip_type` together."""
    parts = split_clip_parts(sd)
    return split_clip_type([n for n, _ in parts], model_class, tokenizer_class), parts


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


# --------------------------------------------------------------------------- engine


class ComfyEngine(Engine):
    """Loads models with ComfyUI's ``comfy`` package from the ComfyUI install at ``root``."""

    name = "comfy"

    def __init__(self, settings, root: str | Path | None, *, lora_cache_entries: int = DEFAULT_LORA_CACHE_ENTRIES):
        self.settings = settings
        self.root = Path(root).expanduser().resolve() if root else None
        self.lora_cache_entries = lora_cache_entries
        if self.root is None:
            self._require_importable()

    @staticmethod
    def _require_importable() -> None:
        """Without a root, comfy must already be importable (e.g. running inside ComfyUI)."""
        if "comfy" not in sys.modules and importlib.util.find_spec("comfy") is None:
            raise EngineError("model_error", "engine=comfy but no ComfyUI was found: set comfyui_root or COMFYUI_PATH")

    # -- import

    def prepare(self) -> SimpleNamespace:
        """Import comfy now (idempotent, process-wide). Returns its modules."""
        if self.root is None:
            self._require_importable()
        return _import_comfy(self.root, self.settings)

    def _check_device(self, device: torch.device, comfy: SimpleNamespace | None) -> None:
        from luna_daemon.models.devices import available_devices

        devices = available_devices()
        name = str(device)
        if name not in devices:
            raise EngineError("bad_args", f"device {name!r} is not available; devices on this machine: {', '.join(devices)}")
        if comfy is not None and comfy.cpu_only and device.type != "cpu":
            raise EngineError("bad_args", f"device {name!r} cannot be used: the comfy engine was set up CPU-only "
                                          f"(vae_device and clip_device are 'cpu'); devices it can use: cpu")

    def _embedding_directories(self, comfy: SimpleNamespace) -> list[str]:
        dirs: list[str] = []
        if comfy.folder_paths is not None:
            try:
                dirs += list(comfy.folder_paths.get_folder_paths("embeddings"))
            except Exception:
                logger.debug("folder_paths.get_folder_paths('embeddings') failed", exc_info=True)
        elif self.root is not None:
            dirs.append(str(self.root / "models" / "embeddings"))
        resolve_roots = getattr(self.settings, "resolved_model_roots", None)
        roots = resolve_roots() if callable(resolve_roots) else []
        for root in roots:
            candidate = Path(root) / "embeddings"
            if candidate.is_dir() and str(candidate) not in dirs:
                dirs.append(str(candidate))
        return dirs

    # -- Engine

    @fsutil.errors_as(EngineError)
    def load_vae(self, paths: Sequence[str], device: torch.device, dtype: torch.dtype | None) -> ComfyVae:
        path_list = _paths(paths, "VAE")
        if len(path_list) != 1:
            raise EngineError("bad_args", f"load_vae takes exactly one path, got {len(path_list)}")
        path = path_list[0]
        device = as_device(device)
        self._check_device(device, None)
        comfy = self.prepare()
        self._check_device(device, comfy)
        what = f"VAE {path.name}"
        with _comfy_call(f"loading {what}"), _held_open([path], "VAE") as (checked,):
            try:
                sd, metadata = comfy.utils.load_torch_file(str(checked), safe_load=True, return_metadata=True)
            except Exception as exc:
                raise EngineError("model_error", f"{what}: cannot read the file: {_first_line(exc)}") from exc
            config = _sidecar_vae_config(path) or _inferred_vae_config(sd)
            kwargs: dict[str, Any] = {"sd": sd, "device": device, "dtype": dtype, "metadata": metadata}
            if config is not None:
                kwargs["config"] = config
            try:
                vae = comfy.sd.VAE(**kwargs)
            except NotImplementedError as exc:
                raise EngineError("model_error", f"{what}: {exc}") from exc
            except RuntimeError as exc:
                hint = "" if config is not None else (
                    f"; a KL VAE that is not SD-sized needs a config: put {path.stem}.json next to it with "
                    f'{{"params": {{"embed_dim": 4, "ddconfig": {{...}}}}}}')
                raise EngineError("model_error", f"{what}: ComfyUI cannot build it: {_first_line(exc)}{hint}") from exc
            try:
                vae.throw_exception_if_invalid()
            except Exception as exc:
                raise EngineError("model_error", f"{what}: ComfyUI does not recognise these weights as a VAE "
                                                 f"({_first_line(exc)})") from exc
            self._pin(vae.patcher, device, comfy)
        model = ComfyVae(vae, source=str(path))
        logger.info("comfy VAE loaded from %s (%d latent channels, %.1f MB, %s on %s)", path, model.info()["latent_channels"],
                    model.nbytes() / 1e6, model.dtype, model.device)
        return model

    @fsutil.errors_as(EngineError)
    def load_clip(self, paths: Sequence[str], clip_type: str, device: torch.device,
                  dtype: torch.dtype | None) -> ComfyClip:
        path_list = _paths(paths, "CLIP")
        device = as_device(device)
        self._check_device(device, None)
        comfy = self.prepare()
        self._check_device(device, comfy)
        name = str(clip_type or "sd1").strip().lower()
        member_name = _CLIP_TYPE_ALIASES.get(name, name.upper())
        clip_enum = getattr(comfy.sd.CLIPType, member_name, None)
        if clip_enum is None:
            known = sorted(set(_CLIP_TYPE_ALIASES) | {m.lower() for m in comfy.sd.CLIPType.__members__})
            raise EngineError("bad_args", f"clip_type {clip_type!r} is unknown to ComfyUI; use one of {', '.join(known)}")
        wanted = _CLIP_FILE_COUNTS.get(name)
        if wanted is not None and wanted != len(path_list):
            raise EngineError("bad_args", f"clip_type {name} takes {wanted} file(s), got {len(path_list)}")
        model_options: dict[str, Any] = {"load_device": device, "offload_device": device, "initial_device": device}
        if dtype is not None:
            model_options["dtype"] = dtype
        embeddings = self._embedding_directories(comfy)
        what = f"CLIP {', '.join(p.name for p in path_list)}"
        with _comfy_call(f"loading {what}"), _held_open(path_list, "CLIP") as checked:
            try:
                clip = comfy.sd.load_clip(ckpt_paths=[str(p) for p in checked], embedding_directory=embeddings,
                                          clip_type=clip_enum, model_options=model_options)
            except EngineError:
                raise
            except (NotImplementedError, RuntimeError, ValueError, KeyError) as exc:
                raise EngineError("model_error", f"{what}: ComfyUI cannot load it as {member_name}: "
                                                 f"{_first_line(exc)}") from exc
            model = ComfyClip(comfy, clip, clip_type=name, comfy_clip_type=member_name,
                              source=", ".join(str(p) for p in path_list), embedding_directories=embeddings,
                              lora_cache_entries=self.lora_cache_entries)
        logger.info("comfy CLIP (%s, %s) loaded from %s (%.1f MB, %s on %s)", name, model.info()["model_class"],
                    model.source, model.nbytes() / 1e6, model.dtype, model.device)
        return model

    @staticmethod
    def _pin(patcher: Any, device: torch.device, comfy: SimpleNamespace) -> None:
        """Keep a model on its device: the daemon's registry, not comfy, decides residency."""
        if device.type == "cpu" or not hasattr(patcher, "offload_device"):
            return
        patcher.offload_device = device
        comfy.model_management.load_models_gpu([patcher])

    def close(self) -> None:
        modules = _STATE.get("modules")
        if modules is None:
            return
        with _COMFY_LOCK, _keep_root_logging():
            try:
                modules.model_management.soft_empty_cache()
            except Exception:
                logger.debug("comfy soft_empty_cache failed", exc_info=True)
