"""Fake of ``comfy.utils``: ``load_torch_file``, attribute helpers, state-dict conversion,
tiled processing and the progress-bar hook."""

import itertools

import safetensors
import torch

import comfy.model_management  # noqa: F401  (ComfyUI's utils imports it too)
from comfy.cli_args import args

MMAP_TORCH_FILES = args.mmap_torch_files
DISABLE_MMAP = args.disable_mmap

ALWAYS_SAFE_LOAD = False
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    ALWAYS_SAFE_LOAD = True

    class ModelCheckpoint:  # stand-in for the Lightning class real checkpoints reference
        pass

    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    torch.serialization.add_safe_globals([ModelCheckpoint])


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    if device is None:
        device = torch.device("cpu")
    metadata = None
    if str(ckpt).lower().endswith((".safetensors", ".sft")):
        try:
            with safetensors.safe_open(ckpt, framework="pt", device=device.type) as f:
                sd = {}
                for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_tensor(k)
                    if DISABLE_MMAP:
                        tensor = tensor.to(device=device, copy=True)
                    sd[k] = tensor
                if return_metadata:
                    metadata = f.metadata()
        except Exception as e:
            if len(e.args) > 0:
                message = e.args[0]
                if "HeaderTooLarge" in str(message):
                    raise ValueError(f"{message}\n\nFile path: {ckpt}\n\nThe safetensors file is corrupt or invalid.")
                if "MetadataIncompleteBuffer" in str(message):
                    raise ValueError(f"{message}\n\nFile path: {ckpt}\n\nThe safetensors file is corrupt/incomplete.")
            raise
    else:
        extra = {"mmap": True} if MMAP_TORCH_FILES else {}
        if safe_load or ALWAYS_SAFE_LOAD:
            pl_sd = torch.load(ckpt, map_location=device, weights_only=True, **extra)
        else:
            raise RuntimeError("the fake comfy has no restricted unpickler (torch < 2.4)")
        if "state_dict" in pl_sd:
            sd = pl_sd["state_dict"]
        elif len(pl_sd) == 1:
            value = next(iter(pl_sd.values()))
            sd = value if isinstance(value, dict) else pl_sd
        else:
            sd = pl_sd
    return (sd, metadata) if return_metadata else sd


def state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=False):
    out = {} if filter_keys else state_dict
    for rp, new in replace_prefix.items():
        for k in [k for k in list(state_dict.keys()) if k.startswith(rp)]:
            out[new + k[len(rp):]] = state_dict.pop(k)
    return out


def clip_text_transformers_convert(sd, prefix_from, prefix_to):
    """OpenCLIP text-tower names -> Hugging Face ``text_model.*`` names (in place)."""
    renames = {
        "{}positional_embedding": "{}embeddings.position_embedding.weight",
        "{}token_embedding.weight": "{}embeddings.token_embedding.weight",
        "{}ln_final.weight": "{}final_layer_norm.weight",
        "{}ln_final.bias": "{}final_layer_norm.bias",
    }
    for src, dst in renames.items():
        k = src.format(prefix_from)
        if k in sd:
            sd[dst.format(prefix_to)] = sd.pop(k)
    block_renames = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for resblock in itertools.count():
        base = f"{prefix_from}transformer.resblocks.{resblock}"
        if f"{base}.ln_1.weight" not in sd:
            break
        dst_base = f"{prefix_to}encoder.layers.{resblock}"
        for src, dst in block_renames.items():
            for suffix in ("weight", "bias"):
                k = f"{base}.{src}.{suffix}"
                if k in sd:
                    sd[f"{dst_base}.{dst}.{suffix}"] = sd.pop(k)
        for suffix in ("weight", "bias"):
            k = f"{base}.attn.in_proj_{suffix}"
            if k in sd:
                packed = sd.pop(k)
                width = packed.shape[0] // 3
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    sd[f"{dst_base}.self_attn.{name}.{suffix}"] = packed[width * i:width * (i + 1)]
    k = f"{prefix_from}text_projection"
    if k in sd:
        sd["{}text_projection.weight".format(prefix_to.replace("text_model.", ""))] = sd.pop(k).transpose(0, 1).contiguous()
    return sd


def set_attr(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    prev = getattr(obj, attrs[-1])
    setattr(obj, attrs[-1], value)
    return prev


def set_attr_param(obj, attr, value):
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    getattr(obj, attrs[-1]).data.copy_(value)


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def string_to_seed(data):
    crc = 0xFFFFFFFF
    for byte in data.encode("utf-8"):
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------------ progress bars

PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK = None


def set_progress_bar_enabled(enabled):
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


# ------------------------------------------------------------------------ tiled processing


def _tile_origins(size, tile, overlap):
    """Start offsets covering ``size`` with tiles of ``tile`` overlapping by ``overlap``."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(length, feather_lo, feather_hi, device):
    """1-D blending weights: linear ramps over ``feather_*`` samples at each end, else 1."""
    idx = torch.arange(length, device=device, dtype=torch.float32)
    w = torch.ones(length, device=device)
    if feather_lo > 0:
        w = torch.minimum(w, (idx + 1) / (feather_lo + 1))
    if feather_hi > 0:
        w = torch.minimum(w, (length - idx) / (feather_hi + 1))
    return w


def get_tiled_scale_steps(width, height, tile_x, tile_y, overlap):
    rows = len(_tile_origins(height, tile_y, overlap))
    cols = len(_tile_origins(width, tile_x, overlap))
    return rows * cols


def tiled_scale_multidim(samples, function, tile=(64, 64), overlap=8, upscale_amount=4, out_channels=3,
                         output_device="cpu", downscale=False, index_formulas=None, pbar=None):
    """Run ``function`` over overlapping tiles of ``samples`` [B, C, *spatial] and blend the
    outputs with feathered weights. ``upscale_amount`` per dimension is a factor or (video
    time axis) a callable from an input extent to an output extent; ``index_formulas`` place
    a tile's output (a factor; default the upscale amounts); ``downscale`` divides instead."""
    dims = len(tile)
    if not isinstance(upscale_amount, (tuple, list)):
        upscale_amount = [upscale_amount] * dims
    if not isinstance(overlap, (tuple, list)):
        overlap = [overlap] * dims
    if index_formulas is None:
        index_formulas = upscale_amount
    if not isinstance(index_formulas, (tuple, list)):
        index_formulas = [index_formulas] * dims

    def extent(d, value):
        up = upscale_amount[d]
        if callable(up):
            return round(up(value))
        return round(value / up if downscale else value * up)

    def position(d, value):
        f = index_formulas[d]
        if callable(f):
            return round(f(value))
        return round(value / f if downscale else value * f)

    spatial = samples.shape[2:]
    out_shape = [samples.shape[0], out_channels] + [extent(d, spatial[d]) for d in range(dims)]
    output = torch.empty(out_shape, device=output_device)
    origins = [_tile_origins(spatial[d], tile[d], overlap[d]) for d in range(dims)]
    for b in range(samples.shape[0]):
        item = samples[b:b + 1]
        if all(spatial[d] <= tile[d] for d in range(dims)):
            output[b:b + 1] = function(item).to(output_device)
            if pbar is not None:
                pbar.update(1)
            continue
        acc = torch.zeros([1, out_channels] + out_shape[2:], device=output_device)
        weight = torch.zeros([1, 1] + out_shape[2:], device=output_device)
        for corner in itertools.product(*origins):
            piece = item
            for d in range(dims):
                piece = piece.narrow(d + 2, corner[d], min(tile[d], spatial[d] - corner[d]))
            result = function(piece).to(output_device)
            for d in range(dims):  # a causal time axis can place a tile's end past the output's
                start = position(d, corner[d])
                result = result.narrow(d + 2, 0, max(0, min(result.shape[d + 2], out_shape[d + 2] - start)))
            mask = torch.ones([1, 1] + list(result.shape[2:]), device=output_device)
            for d in range(dims):
                length = result.shape[d + 2]
                feather = position(d, overlap[d])
                lo = feather if corner[d] > 0 else 0
                hi = feather if corner[d] + piece.shape[d + 2] < spatial[d] else 0
                shape = [1] * (dims + 2)
                shape[d + 2] = length
                mask = mask * _ramp(length, lo, hi, output_device).reshape(shape)
            dst_acc, dst_w = acc, weight
            for d in range(dims):
                start = position(d, corner[d])
                dst_acc = dst_acc.narrow(d + 2, start, result.shape[d + 2])
                dst_w = dst_w.narrow(d + 2, start, result.shape[d + 2])
            dst_acc += result * mask
            dst_w += mask
            if pbar is not None:
                pbar.update(1)
        output[b:b + 1] = acc / weight.clamp(min=1e-12)
    return output


def tiled_scale(samples, function, tile_x=64, tile_y=64, overlap=8, upscale_amount=4, out_channels=3,
                output_device="cpu", pbar=None):
    return tiled_scale_multidim(samples, function, (tile_y, tile_x), overlap=overlap, upscale_amount=upscale_amount,
                                out_channels=out_channels, output_device=output_device, pbar=pbar)


def common_upscale(samples, width, height, upscale_method, crop):
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect = old_w / old_h
        new_aspect = width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    mode = "bilinear" if upscale_method == "bilinear" else "nearest-exact"
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=mode)
