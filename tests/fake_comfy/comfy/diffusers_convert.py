"""Fake of ``comfy.diffusers_convert``: diffusers-layout VAE keys -> LDM/ComfyUI keys."""

import re

_ATTN_RENAMES = {
    "group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}


def convert_vae_state_dict(vae_state_dict):
    up_levels = {int(m.group(1)) for k in vae_state_dict for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m}
    n_up = max(up_levels) + 1 if up_levels else 0
    out = {}
    for key, value in vae_state_dict.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
        if m:
            inner = _ATTN_RENAMES.get(m.group(2), m.group(2))
            new = f"{m.group(1)}.mid.attn_1.{inner}.{m.group(3)}"
            if m.group(3) == "weight" and value.ndim == 2:
                value = value.reshape(value.shape[0], value.shape[1], 1, 1)
        out[new] = value
    return out
