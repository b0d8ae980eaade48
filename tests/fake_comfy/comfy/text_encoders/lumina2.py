"""Fake of ``comfy.text_encoders.lumina2``: Lumina 2's Gemma 2 2B text encoder (``CLIPLoader``
type ``lumina2``; ComfyUI picks it from the file's keys whatever the type).

Facts implemented (ComfyUI 0.3.64): tokens key ``"gemma2_2b"``; SentencePiece tokenizer read
from the file's ``spiece_model`` with ``add_bos=True, add_eos=False``: start token 2, no end
token, pad 0, ``min_length`` 1, one chunk; the encoder's penultimate hidden state
(``layer="hidden", layer_idx=-2``, no final norm on it), attention masks on and returned as the
``attention_mask`` extra (int64), no pooled output; sub-model ``gemma2_2b``; classes
``LuminaTEModel_`` / ``LuminaTokenizer``. ``CLIPTextEncodeLumina2`` (comfy_extras/nodes_lumina2.py)
puts its system prompt before the user prompt.
"""

import comfy.text_encoders.llama
from comfy import sd1_clip

from .spiece_tokenizer import SPieceTokenizer


class Gemma2BTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        tokenizer = tokenizer_data.get("spiece_model", None)
        super().__init__(tokenizer, pad_with_end=False,
                         embedding_size=comfy.text_encoders.llama.GEMMA2_2B_TINY["hidden_size"],
                         embedding_key="gemma2_2b", tokenizer_class=SPieceTokenizer, has_end_token=False,
                         pad_to_max_length=False, max_length=99999999, min_length=1,
                         tokenizer_args={"add_bos": True, "add_eos": False}, tokenizer_data=tokenizer_data)

    def state_dict(self):
        return {"spiece_model": self.tokenizer.serialize_model()}


class LuminaTokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, name="gemma2_2b",
                         tokenizer=Gemma2BTokenizer)


class Gemma2_2BModel(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", layer="hidden", layer_idx=-2, dtype=None, attention_mask=True, model_options={}):
        super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                         special_tokens={"start": 2, "pad": 0}, layer_norm_hidden_state=False,
                         model_class=comfy.text_encoders.llama.Gemma2_2B, enable_attention_masks=attention_mask,
                         return_attention_masks=attention_mask, model_options=model_options)


class LuminaModel(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, name="gemma2_2b", clip_model=Gemma2_2BModel):
        super().__init__(device=device, dtype=dtype, name=name, clip_model=clip_model, model_options=model_options)


def te(dtype_llama=None, llama_scaled_fp8=None, model_type="gemma2_2b"):
    if model_type != "gemma2_2b":
        raise NotImplementedError(f"the fake comfy has no {model_type} text encoder")

    class LuminaTEModel_(LuminaModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            if llama_scaled_fp8 is not None and "scaled_fp8" not in model_options:
                model_options = {**model_options, "scaled_fp8": llama_scaled_fp8}
            if dtype_llama is not None:
                dtype = dtype_llama
            super().__init__(device=device, dtype=dtype, model_options=model_options)
    return LuminaTEModel_
