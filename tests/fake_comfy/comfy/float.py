"""Fake of ``comfy.float``: casting a patched fp32 weight back to its storage dtype.

ComfyUI rounds fp8 targets stochastically (seeded per key); fp16/bf16/fp32 get a plain cast.
The fake does a plain cast for every dtype (fp8 rounding is not modelled)."""


def stochastic_rounding(value, dtype, seed=0):
    return value.to(dtype=dtype)
