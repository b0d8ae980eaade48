"""Fake of ``comfy.model_management``: device choice at import, the global loaded-model list.

Import-time behaviour (as in ComfyUI): ``comfy.cli_args.args`` is read now; the torch device
is evaluated now to measure its memory, so on a CPU-only torch without ``args.cpu`` the
import raises ``AssertionError: Torch not compiled with CUDA enabled`` (torch's own error).
Device, VRAM state and dtype choices are logged through the root logger.

Nothing here takes a lock except the interrupt flag: ``current_loaded_models`` and the
patchers are unsynchronised, exactly like ComfyUI's.
"""

import enum
import gc
import logging
import sys
import threading
import weakref

import psutil
import torch

from comfy.cli_args import args


class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class CPUState(enum.Enum):
    GPU = 0
    CPU = 1
    MPS = 2


vram_state = VRAMState.NORMAL_VRAM
set_vram_to = VRAMState.NORMAL_VRAM
cpu_state = CPUState.GPU

_mps = getattr(torch.backends, "mps", None)
if _mps is not None and _mps.is_available():
    cpu_state = CPUState.MPS
if args.cpu:
    cpu_state = CPUState.CPU

OOM_EXCEPTION = torch.cuda.OutOfMemoryError


def is_intel_xpu():
    return False


def get_torch_device():
    if cpu_state == CPUState.MPS:
        return torch.device("mps")
    if cpu_state == CPUState.CPU:
        return torch.device("cpu")
    # The main GPU is whatever torch considers current (main.py sets CUDA_VISIBLE_DEVICES).
    return torch.device(torch.cuda.current_device())


def get_total_memory(dev=None, torch_total_too=False):
    if dev is None:
        dev = get_torch_device()
    if hasattr(dev, "type") and dev.type in ("cpu", "mps"):
        total = psutil.virtual_memory().total
        torch_total = total
    else:
        _free, total = torch.cuda.mem_get_info(dev)
        torch_total = torch.cuda.memory_stats(dev).get("reserved_bytes.all.current", 0)
    return (total, torch_total) if torch_total_too else total


total_vram = get_total_memory(get_torch_device()) / (1024 * 1024)
total_ram = psutil.virtual_memory().total / (1024 * 1024)
logging.info(f"Total VRAM {total_vram:0.0f} MB, total RAM {total_ram:0.0f} MB")

EXTRA_RESERVED_VRAM = 400 * 1024 * 1024
if sys.platform == "win32":
    EXTRA_RESERVED_VRAM = 600 * 1024 * 1024
if total_vram > 15 * 1024:
    EXTRA_RESERVED_VRAM += 100 * 1024 * 1024
if args.reserve_vram is not None:
    EXTRA_RESERVED_VRAM = int(args.reserve_vram * 1024 * 1024 * 1024)

DISABLE_SMART_MEMORY = bool(args.disable_smart_memory)

if args.lowvram:
    set_vram_to = VRAMState.LOW_VRAM
elif args.novram:
    set_vram_to = VRAMState.NO_VRAM
elif args.highvram or args.gpu_only:
    vram_state = VRAMState.HIGH_VRAM

if set_vram_to in (VRAMState.LOW_VRAM, VRAMState.NO_VRAM):
    vram_state = set_vram_to
if cpu_state != CPUState.GPU:
    vram_state = VRAMState.DISABLED
if cpu_state == CPUState.MPS:
    vram_state = VRAMState.SHARED

logging.info(f"Set vram state to: {vram_state.name}")


def get_torch_device_name(device):
    if hasattr(device, "type") and device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return "{}".format(getattr(device, "type", device))


logging.info(f"Device: {get_torch_device_name(get_torch_device())}")


# ----------------------------------------------------------------------------- helpers


def is_device_type(device, type):
    return hasattr(device, "type") and device.type == type


def is_device_cpu(device):
    return is_device_type(device, "cpu")


def is_device_mps(device):
    return is_device_type(device, "mps")


def is_device_cuda(device):
    return is_device_type(device, "cuda")


def cpu_mode():
    return cpu_state == CPUState.CPU


def mps_mode():
    return cpu_state == CPUState.MPS


def dtype_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def module_size(module):
    total = 0
    for tensor in module.state_dict().values():
        total += tensor.nelement() * tensor.element_size()
    return total


def extra_reserved_memory():
    return EXTRA_RESERVED_VRAM


def minimum_inference_memory():
    return (1024 * 1024 * 1024) * 0.8 + extra_reserved_memory()


def get_free_memory(dev=None, torch_free_too=False):
    if dev is None:
        dev = get_torch_device()
    if hasattr(dev, "type") and dev.type in ("cpu", "mps"):
        free_total = psutil.virtual_memory().available
        free_torch = free_total
    else:
        stats = torch.cuda.memory_stats(dev)
        active = stats.get("active_bytes.all.current", 0)
        reserved = stats.get("reserved_bytes.all.current", 0)
        free_cuda, _ = torch.cuda.mem_get_info(dev)
        free_torch = reserved - active
        free_total = free_cuda + free_torch
    return (free_total, free_torch) if torch_free_too else free_total


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    if device is not None and (is_device_cpu(device) or is_device_mps(device)):
        return False
    if cpu_mode():
        return False
    return torch.cuda.is_available()


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    if device is not None and (is_device_cpu(device) or is_device_mps(device)):
        return False
    if cpu_mode():
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def supports_cast(device, dtype):
    return dtype in (torch.float32, torch.float16, torch.bfloat16) or not is_device_mps(device)


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def intermediate_device():
    if args.gpu_only:
        return get_torch_device()
    return torch.device("cpu")


def unet_offload_device():
    if vram_state == VRAMState.HIGH_VRAM:
        return get_torch_device()
    return torch.device("cpu")


def vae_device():
    if args.cpu_vae:
        return torch.device("cpu")
    return get_torch_device()


def vae_offload_device():
    if args.gpu_only:
        return get_torch_device()
    return torch.device("cpu")


def vae_dtype(device=None, allowed_dtypes=[]):
    if args.fp16_vae:
        return torch.float16
    if args.bf16_vae:
        return torch.bfloat16
    if args.fp32_vae:
        return torch.float32
    for d in allowed_dtypes:
        if d == torch.float16 and should_use_fp16(device):
            return d
        if d == torch.bfloat16 and should_use_bf16(device):
            return d
    return torch.float32


def text_encoder_device():
    if args.gpu_only:
        return get_torch_device()
    if vram_state in (VRAMState.HIGH_VRAM, VRAMState.NORMAL_VRAM) and should_use_fp16(prioritize_performance=False):
        return get_torch_device()
    return torch.device("cpu")


def text_encoder_offload_device():
    if args.gpu_only:
        return get_torch_device()
    return torch.device("cpu")


def text_encoder_initial_device(load_device, offload_device, model_size=0):
    if load_device == offload_device or model_size <= 1024 * 1024 * 1024:
        return offload_device
    if is_device_mps(load_device):
        return load_device
    if get_free_memory(load_device) > model_size * 1.2 + EXTRA_RESERVED_VRAM:
        return load_device
    return offload_device


def text_encoder_dtype(device=None):
    if args.fp8_e4m3fn_text_enc:
        return torch.float8_e4m3fn
    if args.fp8_e5m2_text_enc:
        return torch.float8_e5m2
    if args.fp16_text_enc:
        return torch.float16
    if args.bf16_text_enc:
        return torch.bfloat16
    if args.fp32_text_enc:
        return torch.float32
    # fp16 storage by default, even on the CPU (computation is cast to fp32).
    return torch.float16


def soft_empty_cache(force=False):
    if cpu_state == CPUState.MPS:
        torch.mps.empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


# ------------------------------------------------------------------------ loaded models


class LoadedModel:
    """A ModelPatcher currently loaded on its device; holds it through weak references."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        # When a clone's patcher dies, the entry falls back to the patcher it was cloned from.
        self._parents = []
        parent = model.parent
        while parent is not None:
            self._parents.append(weakref.ref(parent))
            parent = parent.parent
        self.device = model.load_device
        self.real_model = None
        self.currently_used = True

    @property
    def model(self):
        m = self._model()
        while m is None and self._parents:
            self._model = self._parents.pop(0)
            m = self._model()
        return m

    def model_memory(self):
        return self.model.model_size()

    def model_loaded_memory(self):
        return self.model.loaded_size()

    def model_offloaded_memory(self):
        return self.model.model_size() - self.model.loaded_size()

    def model_memory_required(self, device):
        if device == self.model.current_loaded_device():
            return self.model_offloaded_memory()
        return self.model_memory()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        patcher = self.model
        patcher.model_patches_to(self.device)
        patcher.partially_load(self.device, 0, force_patch_weights=force_patch_weights)
        self.real_model = weakref.ref(patcher.model)
        return patcher.model

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        patcher = self.model
        if patcher is not None:
            patcher.detach(unpatch_weights)
        self.real_model = None
        return True

    def is_dead(self):
        return self.real_model is not None and self.real_model() is not None and self.model is None

    def __eq__(self, other):
        return isinstance(other, LoadedModel) and self.model is other.model

    def __hash__(self):
        return id(self.model)


current_loaded_models = []


def loaded_models(only_currently_used=False):
    output = []
    for m in current_loaded_models:
        if only_currently_used and not m.currently_used:
            continue
        if m.model is not None:
            output.append(m.model)
    return output


def cleanup_models_gc():
    for m in current_loaded_models:
        if m.is_dead():
            logging.warning(f"Potential memory leak detected with model {type(m.real_model()).__name__}, doing a full garbage collect")
            gc.collect()
            soft_empty_cache()
            break


def cleanup_models():
    keep = [m for m in current_loaded_models if m.model is not None]
    current_loaded_models[:] = keep


def free_memory(memory_required, device, keep_loaded=[]):
    cleanup_models_gc()
    candidates = []
    for i, m in enumerate(current_loaded_models):
        if m.model is None or m.device != device or m in keep_loaded:
            continue
        candidates.append((-m.model_offloaded_memory(), sys.getrefcount(m.model), -m.model_memory(), i))
    candidates.sort()
    unloaded = []
    for *_rest, i in candidates:
        if not DISABLE_SMART_MEMORY and not is_device_cpu(device) and get_free_memory(device) > memory_required:
            break
        if current_loaded_models[i].model_unload():
            unloaded.append(i)
    for i in sorted(unloaded, reverse=True):
        current_loaded_models.pop(i)
    if unloaded:
        soft_empty_cache()
    return [i for i in unloaded]


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    cleanup_models_gc()
    extra_mem = max(minimum_inference_memory(), memory_required + extra_reserved_memory())

    to_load = []
    for patcher in models:
        entry = LoadedModel(patcher)
        if entry in current_loaded_models:
            entry = current_loaded_models[current_loaded_models.index(entry)]
            entry.currently_used = True
        to_load.append(entry)

    # A clone of a loaded model (same nn.Module) replaces it: drop the old entry and detach
    # it WITHOUT unpatching; partially_load decides from the patch uuid what to redo.
    for entry in to_load:
        for i in reversed(range(len(current_loaded_models))):
            old = current_loaded_models[i]
            if old.model is not None and entry.model.is_clone(old.model):
                current_loaded_models.pop(i)
                old.model.detach(unpatch_all=False)

    needed = {}
    for entry in to_load:
        needed[entry.device] = needed.get(entry.device, 0) + entry.model_memory_required(entry.device)
    for device, size in needed.items():
        if not is_device_cpu(device):
            free_memory(size * 1.1 + extra_mem, device)

    for entry in to_load:
        entry.model_load(0, force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, entry)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    free_memory(1e30, get_torch_device())


def unload_model_clones(model, unload_weights_only=True, force_unload=True):
    for i in reversed(range(len(current_loaded_models))):
        m = current_loaded_models[i]
        if m.model is not None and model.is_clone(m.model):
            current_loaded_models.pop(i).model_unload()


# ------------------------------------------------------------------------- interrupts


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()
