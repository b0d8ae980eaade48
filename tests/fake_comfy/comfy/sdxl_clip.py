"""Fake of ``comfy.sdxl_clip``: SDXL's CLIP-L + CLIP-G pair (and the G-only refiner).

Both encoders default to the penultimate layer without the final layer norm; CLIP-G pads
with 0 and gives the projected pooled output; ``cond`` is L and G concatenated on the last
dimension, cut to the shorter token count. ``load_sd`` routes a file to G when it has the
layer-30 key. (The fake's G is tiny: hidden 32 but, like the real one, 32 layers.)
"""

import os

import torch

from comfy import sd1_clip

_HERE = os.path.dirname(os.path.realpath(__file__))


class SDXLClipG(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", max_length=77, freeze=True, layer="penultimate", layer_idx=None, dtype=None,
                 model_options={}):
        if layer == "penultimate":
            layer = "hidden"
            layer_idx = -2
        super().__init__(device=device, freeze=freeze, layer=layer, layer_idx=layer_idx,
                         textmodel_json_config=os.path.join(_HERE, "clip_config_bigg.json"), dtype=dtype,
                         special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                         return_projected_pooled=True, model_options=model_options)

    def load_sd(self, sd):
        return super().load_sd(sd)


class SDXLClipGTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, tokenizer_path=None, embedding_directory=None, tokenizer_data={}):
        super().__init__(tokenizer_path, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=sd1_clip._tiny_hidden_size("clip_config_bigg.json"), embedding_key="clip_g",
                         tokenizer_data=tokenizer_data)


class SDXLTokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.clip_l = sd1_clip.SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                           embedding_size=sd1_clip._tiny_hidden_size("sd1_clip_config.json"))
        self.clip_g = SDXLClipGTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {
            "g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs),
            "l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
        }

    def untokenize(self, token_weight_pair):
        return self.clip_g.untokenize(token_weight_pair)

    def state_dict(self):
        return {}


class SDXLClipModel(torch.nn.Module):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__()
        clip_l_class = model_options.get("clip_l_class", sd1_clip.SDClipModel)
        self.clip_l = clip_l_class(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                   layer_norm_hidden_state=False, model_options=model_options)
        self.clip_g = SDXLClipG(device=device, dtype=dtype, model_options=model_options)
        self.dtypes = {dtype}

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)
        self.clip_g.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_g.reset_clip_options()
        self.clip_l.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"])
        l_out, _l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
        cut_to = min(l_out.shape[1], g_out.shape[1])
        return torch.cat([l_out[:, :cut_to], g_out[:, :cut_to]], dim=-1), g_pooled

    def load_sd(self, sd):
        if "text_model.encoder.layers.30.mlp.fc1.weight" in sd:
            return self.clip_g.load_sd(sd)
        return self.clip_l.load_sd(sd)


class SDXLRefinerClipModel(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, clip_name="g", clip_model=SDXLClipG, model_options=model_options)
