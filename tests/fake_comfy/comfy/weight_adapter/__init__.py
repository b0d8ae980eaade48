"""Fake of ``comfy.weight_adapter``: the adapter classes ``comfy.lora.load_lora`` asks, in
order, to recognise a LoRA prefix. Only ``LoRAAdapter`` is implemented; the other classes
exist (so code that imports them works) but recognise nothing."""

import torch

import comfy.model_management


class WeightAdapterBase:
    name = "base"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError


class LoRAAdapter(WeightAdapterBase):
    """``weights = (up, down, alpha, mid, dora_scale, reshape)``; delta = (alpha / rank) * up @ down."""

    name = "lora"

    # (up, down) suffix pairs, tried in this order.
    _NAMES = (
        ("{}.lora_up.weight", "{}.lora_down.weight"),
        ("{}_lora.up.weight", "{}_lora.down.weight"),
        ("{}.lora_B.weight", "{}.lora_A.weight"),
        ("{}.lora.up.weight", "{}.lora.down.weight"),
        ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight"),
        ("{}.lora_B.default.weight", "{}.lora_A.default.weight"),
    )

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if loaded_keys is None:
            loaded_keys = set()
        for up_fmt, down_fmt in cls._NAMES:
            up_key, down_key = up_fmt.format(x), down_fmt.format(x)
            if up_key in lora:
                mid_key = f"{x}.lora_mid.weight"
                reshape_key = f"{x}.reshape_weight"
                mid = lora.get(mid_key)
                reshape = None
                if reshape_key in lora:
                    reshape = lora[reshape_key].tolist()
                    loaded_keys.add(reshape_key)
                if mid is not None:
                    loaded_keys.add(mid_key)
                loaded_keys.add(up_key)
                loaded_keys.add(down_key)
                return cls(loaded_keys, (lora[up_key], lora[down_key], alpha, mid, dora_scale, reshape))
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha, mid, dora_scale, reshape = self.weights
        mat1 = comfy.model_management.cast_to_device(up, weight.device, intermediate_dtype)
        mat2 = comfy.model_management.cast_to_device(down, weight.device, intermediate_dtype)
        scale = 1.0 if alpha is None else alpha / mat2.shape[0]
        if mid is not None:
            raise NotImplementedError("the fake comfy does not implement LoCon mid weights")
        if reshape is not None:
            weight = weight.reshape(reshape)
        delta = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
        if dora_scale is not None:
            raise NotImplementedError("the fake comfy does not implement DoRA")
        weight += function((strength * scale) * delta).type(weight.dtype)
        return weight


class LoHaAdapter(WeightAdapterBase):
    name = "loha"


class LoKrAdapter(WeightAdapterBase):
    name = "lokr"


class GLoRAAdapter(WeightAdapterBase):
    name = "glora"


class OFTAdapter(WeightAdapterBase):
    name = "oft"


class BOFTAdapter(WeightAdapterBase):
    name = "boft"


adapters = [LoRAAdapter, LoHaAdapter, LoKrAdapter, GLoRAAdapter, OFTAdapter, BOFTAdapter]
adapter_maps = {a.name: a for a in adapters}

__all__ = ["WeightAdapterBase", "adapters", "adapter_maps"] + [a.__name__ for a in adapters]
