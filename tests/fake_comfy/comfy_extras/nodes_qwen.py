"""Fake of ``comfy_extras/nodes_qwen.py``: the v3 TextEncodeQwenImageEdit.

The optional image is scaled (area) to about 1024×1024 pixels keeping its aspect ratio, and
its RGB channels go to ``clip.tokenize(prompt, images=[image])``; with a VAE the scaled image
is also encoded and appended to the conditioning as ``reference_latents``. (ComfyUI appends
through ``node_helpers.conditioning_set_values``; the fake does the same inline.)
"""

import math

import comfy.utils
from comfy_api.latest import ComfyExtension, io


def _append_values(conditioning, values):
    out = []
    for cond, extra in conditioning:
        extra = extra.copy()
        for key, value in values.items():
            extra[key] = extra.get(key, []) + value if key in extra else value
        out.append([cond, extra])
    return out


class TextEncodeQwenImageEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TextEncodeQwenImageEdit", category="advanced/conditioning",
            inputs=[io.Clip.Input("clip"), io.String.Input("prompt", multiline=True, dynamic_prompts=True),
                    io.Vae.Input("vae", optional=True), io.Image.Input("image", optional=True)],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, clip, prompt, vae=None, image=None):
        ref_latent = None
        images = []
        if image is not None:
            samples = image.movedim(-1, 1)
            scale_by = math.sqrt(1024 * 1024 / (samples.shape[3] * samples.shape[2]))
            width, height = round(samples.shape[3] * scale_by), round(samples.shape[2] * scale_by)
            image = comfy.utils.common_upscale(samples, width, height, "area", "disabled").movedim(1, -1)
            images = [image[:, :, :, :3]]
            if vae is not None:
                ref_latent = vae.encode(image[:, :, :, :3])
        tokens = clip.tokenize(prompt, images=images)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        if ref_latent is not None:
            conditioning = _append_values(conditioning, {"reference_latents": [ref_latent]})
        return io.NodeOutput(conditioning)


class QwenExtension(ComfyExtension):
    async def get_node_list(self):
        return [TextEncodeQwenImageEdit]


async def comfy_entrypoint():
    return QwenExtension()
