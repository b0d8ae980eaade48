"""Fake of ``comfy.text_encoders.flux``: Flux's CLIP-L + T5-XXL pair.

Tokens ``{"l": CLIP-L chunks, "t5xxl": one T5 chunk padded to 256}``; ``cond`` is T5's output,
``pooled_output`` CLIP-L's unprojected pooled output; a file goes to CLIP-L when it has the
layer-1 key, else to T5. (CLIPTextEncodeFlux adds ``guidance`` through ``add_dict``.)
"""

import torch

from comfy import sd1_clip
from comfy.text_encoders import sd3_clip


class T5XXLTokenizer(sd3_clip.T5XXLTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, min_length=256)


class FluxTokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.clip_l = sd1_clip.SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                           embedding_size=sd1_clip._tiny_hidden_size("sd1_clip_config.json"))
        self.t5xxl = T5XXLTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
                "t5xxl": self.t5xxl.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.clip_l.untokenize(token_weight_pair)

    def state_dict(self):
        return {}


class FluxClipModel(torch.nn.Module):
    def __init__(self, dtype_t5=None, device="cpu", dtype=None, model_options={}):
        super().__init__()
        dtype_t5 = sd3_clip.pick_weight_dtype(dtype_t5, dtype, device)
        self.clip_l = sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                           model_options=model_options)
        self.t5xxl = sd3_clip.T5XXLModel(device=device, dtype=dtype_t5, model_options=model_options)
        self.dtypes = {dtype, dtype_t5}

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)
        self.t5xxl.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()
        self.t5xxl.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        t5_out, _t5_pooled = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"])[:2]
        _l_out, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])[:2]
        return t5_out, l_pooled

    def load_sd(self, sd):
        if "text_model.encoder.layers.1.mlp.fc1.weight" in sd:
            return self.clip_l.load_sd(sd)
        return self.t5xxl.load_sd(sd)


def flux_clip(dtype_t5=None, t5xxl_scaled_fp8=None):
    if t5xxl_scaled_fp8 is not None:
        raise NotImplementedError("the fake comfy package does not implement scaled fp8 T5 weights")

    class FluxClipModel_(FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(dtype_t5=dtype_t5, device=device, dtype=dtype, model_options=model_options)
    return FluxClipModel_
