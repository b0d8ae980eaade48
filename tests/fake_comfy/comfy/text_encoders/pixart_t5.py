"""Fake of ``comfy.text_encoders.pixart_t5``: the T5-XXL-only encoder of PixArt and Chroma
(``PixArtTEModel_``): tokens ``{"t5xxl": [one chunk, min_length 1]}``, the empty sequence is
padding only (no end token), no pooled output."""

from comfy import sd1_clip
from comfy.text_encoders import sd3_clip


class T5XXLModel(sd3_clip.T5XXLModel):
    def gen_empty_tokens(self, special_tokens, *args, **kwargs):
        special_tokens = {k: v for k, v in special_tokens.items() if k != "end"}
        return sd1_clip.gen_empty_tokens(special_tokens, *args, **kwargs)


class PixArtT5XXL(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=T5XXLModel, model_options=model_options)


class T5XXLTokenizer(sd3_clip.T5XXLTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, min_length=1)


class PixArtTokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, clip_name="t5xxl",
                         tokenizer=T5XXLTokenizer)


def pixart_te(dtype_t5=None, t5xxl_scaled_fp8=None):
    if t5xxl_scaled_fp8 is not None:
        raise NotImplementedError("the fake comfy package does not implement scaled fp8 T5 weights")

    class PixArtTEModel_(PixArtT5XXL):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype if dtype is not None else dtype_t5, model_options=model_options)
    return PixArtTEModel_
