"""Fake of ``comfy_extras/nodes_hidream.py``: the v3 QuadrupleCLIPLoader (four files, no
clip_type: the file count makes it HiDream). The fake's ``comfy.sd`` does not build HiDream's
encoder (it needs Llama 3.1 8B), so loading raises its NotImplementedError."""

import comfy.sd
import folder_paths
from comfy_api.latest import ComfyExtension, io


class QuadrupleCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list("text_encoders")
        return io.Schema(node_id="QuadrupleCLIPLoader", category="advanced/loaders",
                         inputs=[io.Combo.Input(f"clip_name{i}", options=files) for i in (1, 2, 3, 4)],
                         outputs=[io.Clip.Output()])

    @classmethod
    def execute(cls, clip_name1, clip_name2, clip_name3, clip_name4):
        names = (clip_name1, clip_name2, clip_name3, clip_name4)
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in names]
        return io.NodeOutput(comfy.sd.load_clip(ckpt_paths=paths,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings")))


class HiDreamExtension(ComfyExtension):
    async def get_node_list(self):
        return [QuadrupleCLIPLoader]


async def comfy_entrypoint():
    return HiDreamExtension()
