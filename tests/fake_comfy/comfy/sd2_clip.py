"""Fake of ``comfy.sd2_clip``: SD2's OpenCLIP-H text encoder (penultimate layer, pads with 0).
The fake's H is tiny: hidden 32, 24 layers (so the layer-22 detection key exists)."""

import os

from comfy import sd1_clip

_HERE = os.path.dirname(os.path.realpath(__file__))


class SD2ClipHModel(sd1_clip.SDClipModel):
    def __init__(self, arch="ViT-H-14", device="cpu", max_length=77, freeze=True, layer="penultimate", layer_idx=None,
                 dtype=None, model_options={}):
        if layer == "penultimate":
            layer = "hidden"
            layer_idx = -2
        super().__init__(device=device, freeze=freeze, layer=layer, layer_idx=layer_idx,
                         textmodel_json_config=os.path.join(_HERE, "sd2_clip_config.json"), dtype=dtype,
                         special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True,
                         model_options=model_options)


class SD2ClipHTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, tokenizer_path=None, embedding_directory=None, tokenizer_data={}):
        super().__init__(tokenizer_path, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=sd1_clip._tiny_hidden_size("sd2_clip_config.json"), embedding_key="clip_h",
                         tokenizer_data=tokenizer_data)


class SD2Tokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, clip_name="h",
                         tokenizer=SD2ClipHTokenizer)


class SD2ClipModel(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_name="h",
                         clip_model=SD2ClipHModel, **kwargs)
