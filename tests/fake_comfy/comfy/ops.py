"""Fake of ``comfy.ops``: layers that skip weight initialisation (``disable_weight_init``) and
layers that cast their weights to the input's dtype/device at call time (``manual_cast``).
ComfyUI's text encoders use ``manual_cast``: fp16-stored weights, fp32 computation."""

import torch
import torch.nn.functional as F


def cast_bias_weight(module, input):
    weight = module.weight.to(device=input.device, dtype=input.dtype)
    bias = None
    if getattr(module, "bias", None) is not None:
        bias = module.bias.to(device=input.device, dtype=input.dtype)
    return weight, bias


class disable_weight_init:
    class Linear(torch.nn.Linear):
        comfy_cast_weights = False

        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.comfy_cast_weights:
                weight, bias = cast_bias_weight(self, input)
                return F.linear(input, weight, bias)
            return super().forward(input)

    class Conv2d(torch.nn.Conv2d):
        comfy_cast_weights = False

        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.comfy_cast_weights:
                weight, bias = cast_bias_weight(self, input)
                return self._conv_forward(input, weight, bias)
            return super().forward(input)

    class GroupNorm(torch.nn.GroupNorm):
        comfy_cast_weights = False

        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.comfy_cast_weights:
                weight, bias = cast_bias_weight(self, input)
                return F.group_norm(input, self.num_groups, weight, bias, self.eps)
            return super().forward(input)

    class LayerNorm(torch.nn.LayerNorm):
        comfy_cast_weights = False

        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.comfy_cast_weights:
                weight, bias = cast_bias_weight(self, input)
                return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)
            return super().forward(input)

    class Embedding(torch.nn.Embedding):
        comfy_cast_weights = False

        def reset_parameters(self):
            return None

        def forward(self, input, out_dtype=None):
            if self.comfy_cast_weights or out_dtype is not None:
                dtype = out_dtype if out_dtype is not None else self.weight.dtype
                weight = self.weight.to(device=input.device, dtype=dtype)
                return F.embedding(input, weight)
            return super().forward(input)

    @classmethod
    def conv_nd(cls, dims, *args, **kwargs):
        if dims == 2:
            return cls.Conv2d(*args, **kwargs)
        raise ValueError(f"unsupported dimensions: {dims}")


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class Conv2d(disable_weight_init.Conv2d):
        comfy_cast_weights = True

    class GroupNorm(disable_weight_init.GroupNorm):
        comfy_cast_weights = True

    class LayerNorm(disable_weight_init.LayerNorm):
        comfy_cast_weights = True

    class Embedding(disable_weight_init.Embedding):
        comfy_cast_weights = True
