"""Fake of ``comfy.lora_convert``: the special formats (BFL Flux control, Wan-Fun, USO) are
not modelled; every other LoRA passes through unchanged, as in ComfyUI."""


def convert_lora(sd):
    return sd
