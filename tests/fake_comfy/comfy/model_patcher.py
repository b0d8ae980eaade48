"""Fake of ``comfy.model_patcher.ModelPatcher``.

What it reproduces (see the facts file, section d):

* ``clone()`` shares the ``nn.Module``, the weight ``backup`` dict and the object-patch backup;
  it copies the per-key patch lists and keeps the same ``patches_uuid``.
* ``add_patches`` keeps only keys present in the module's state dict, appends
  ``(strength_patch, patch, strength_model, offset, function)`` and sets a new uuid.
* Loading (``partially_load`` -> ``load``) writes the patched weights INTO the shared module
  (fp32 maths, cast back to the stored dtype) after backing the originals up, and records
  ``current_weight_patches_uuid`` on the module. If the module carries another clone's uuid,
  the originals are restored from the backup first. Nothing unpatches after use.
* No locks: two clones used from two threads interfere, as in ComfyUI.
"""

import collections
import logging
import uuid

import torch

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.utils

BackupEntry = collections.namedtuple("BackupEntry", ["weight", "inplace_update"])


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.is_clip = False
        self.hook_mode = None
        self.forced_hooks = None
        for attr, default in (("current_weight_patches_uuid", None), ("model_loaded_weight_memory", 0),
                              ("model_lowvram", False), ("device", offload_device)):
            if not hasattr(self.model, attr):
                setattr(self.model, attr, default)

    # -------------------------------------------------------------- identity / cloning

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = comfy.model_management.module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def current_loaded_device(self):
        return self.model.device

    def model_dtype(self):
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = {"transformer_options": dict(self.model_options.get("transformer_options", {}))}
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        n.is_clip = self.is_clip
        n.hook_mode = self.hook_mode
        n.forced_hooks = self.forced_hooks
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    # -------------------------------------------------------------------- patches

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        model_keys = set(self.model.state_dict().keys())
        accepted = set()
        for k, patch in patches.items():
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                if len(k) > 2:
                    function = k[2]
            if key not in model_keys:
                continue
            accepted.add(k)
            self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(accepted)

    def get_key_patches(self, filter_prefix=None):
        sd = self.model.state_dict()
        out = {}
        for k, weight in sd.items():
            if filter_prefix is not None and not k.startswith(filter_prefix):
                continue
            out[k] = [(weight,)] + list(self.patches.get(k, []))
        return out

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        if filter_prefix is not None:
            sd = {k: v for k, v in sd.items() if k.startswith(filter_prefix)}
        return sd

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def model_patches_to(self, device):
        return None

    # ------------------------------------------------------------------- weights

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight = comfy.utils.get_attr(self.model, key)
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup:
            self.backup[key] = BackupEntry(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        target_device = device_to if device_to is not None else weight.device
        temp = comfy.model_management.cast_to_device(weight, target_device, torch.float32, copy=True)
        out = comfy.lora.calculate_weight(self.patches[key], temp, key)
        out = comfy.float.stochastic_rounding(out, weight.dtype, seed=comfy.utils.string_to_seed(key))
        if inplace_update:
            comfy.utils.copy_to_param(self.model, key, out)
        else:
            comfy.utils.set_attr_param(self.model, key, out)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        for key in list(self.patches.keys()):
            self.patch_weight_to_device(key, device_to=device_to)
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to
        self.model.model_loaded_weight_memory = self.model_size()
        self.model.model_lowvram = False
        self.model.current_weight_patches_uuid = self.patches_uuid

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for name, obj in self.object_patches.items():
            old = comfy.utils.set_attr(self.model, name, obj)
            if name not in self.object_patches_backup:
                self.object_patches_backup[name] = old
        if load_weights:
            self.load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights,
                      full_load=True)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for key, entry in list(self.backup.items()):
                if entry.inplace_update:
                    comfy.utils.copy_to_param(self.model, key, entry.weight)
                else:
                    comfy.utils.set_attr_param(self.model, key, entry.weight)
            self.backup.clear()  # shared with every clone: cleared in place
            self.model.current_weight_patches_uuid = None
            self.model.model_loaded_weight_memory = 0
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
        for name, obj in list(self.object_patches_backup.items()):
            comfy.utils.set_attr(self.model, name, obj)
        self.object_patches_backup.clear()

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        current = self.model.current_weight_patches_uuid
        if current is not None and (current != self.patches_uuid or force_patch_weights):
            logging.debug(f"ModelPatcher: live patches {current} differ from {self.patches_uuid}; restoring weights")
            self.unpatch_model(self.offload_device, unpatch_weights=True)
        if self.model.model_loaded_weight_memory > 0 and self.model.current_weight_patches_uuid == self.patches_uuid:
            return 0
        self.patch_model(device_to, load_weights=True, force_patch_weights=force_patch_weights)
        return self.model_size()

    def detach(self, unpatch_all=True):
        self.model_patches_to(self.offload_device)
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model
