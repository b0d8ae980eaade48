"""Fake of ``comfy_extras/nodes_sd3.py``: the v3 TripleCLIPLoader and CLIPTextEncodeSD3.

TripleCLIPLoader passes three files to ``comfy.sd.load_clip`` with no clip_type (the file count
makes it SD3). CLIPTextEncodeSD3 tokenizes each prompt on its own and splices the streams:
with ``empty_padding = "none"`` an empty prompt gives an empty stream (``[]``); ``l`` / ``g``
of different chunk counts are padded with the chunks of ``tokenize("")``.
"""

import comfy.sd
import folder_paths
from comfy_api.latest import ComfyExtension, io


class TripleCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list("text_encoders")
        return io.Schema(node_id="TripleCLIPLoader", category="advanced/loaders",
                         inputs=[io.Combo.Input(f"clip_name{i}", options=files) for i in (1, 2, 3)],
                         outputs=[io.Clip.Output()])

    @classmethod
    def execute(cls, clip_name1, clip_name2, clip_name3):
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2, clip_name3)]
        return io.NodeOutput(comfy.sd.load_clip(ckpt_paths=paths,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings")))

    load_clip = execute


class CLIPTextEncodeSD3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CLIPTextEncodeSD3", category="advanced/conditioning",
            inputs=[io.Clip.Input("clip"), io.String.Input("clip_l", multiline=True, dynamic_prompts=True),
                    io.String.Input("clip_g", multiline=True, dynamic_prompts=True),
                    io.String.Input("t5xxl", multiline=True, dynamic_prompts=True),
                    io.Combo.Input("empty_padding", options=["none", "empty_prompt"])],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, clip, clip_l, clip_g, t5xxl, empty_padding):
        no_padding = empty_padding == "none"
        tokens = clip.tokenize(clip_g)
        if len(clip_g) == 0 and no_padding:
            tokens["g"] = []
        tokens["l"] = [] if len(clip_l) == 0 and no_padding else clip.tokenize(clip_l)["l"]
        tokens["t5xxl"] = [] if len(t5xxl) == 0 and no_padding else clip.tokenize(t5xxl)["t5xxl"]
        if len(tokens["l"]) != len(tokens["g"]):
            empty = clip.tokenize("")
            while len(tokens["l"]) < len(tokens["g"]):
                tokens["l"] += empty["l"]
            while len(tokens["l"]) > len(tokens["g"]):
                tokens["g"] += empty["g"]
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))

    encode = execute


class SD3Extension(ComfyExtension):
    async def get_node_list(self):
        return [TripleCLIPLoader, CLIPTextEncodeSD3]


async def comfy_entrypoint():
    return SD3Extension()
