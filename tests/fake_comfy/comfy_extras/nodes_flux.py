"""Fake of ``comfy_extras/nodes_flux.py``: the v3 CLIPTextEncodeFlux (CLIP-L prompt, the T5
stream spliced in from a second ``tokenize``, ``guidance`` through ``add_dict``)."""

from comfy_api.latest import ComfyExtension, io


class CLIPTextEncodeFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CLIPTextEncodeFlux", category="advanced/conditioning/flux",
            inputs=[io.Clip.Input("clip"), io.String.Input("clip_l", multiline=True, dynamic_prompts=True),
                    io.String.Input("t5xxl", multiline=True, dynamic_prompts=True),
                    io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1)],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, clip, clip_l, t5xxl, guidance):
        tokens = clip.tokenize(clip_l)
        tokens["t5xxl"] = clip.tokenize(t5xxl)["t5xxl"]
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance}))

    encode = execute


class FluxExtension(ComfyExtension):
    async def get_node_list(self):
        return [CLIPTextEncodeFlux]


async def comfy_entrypoint():
    return FluxExtension()
