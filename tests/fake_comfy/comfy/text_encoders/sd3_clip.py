"""Fake of ``comfy.text_encoders.sd3_clip``: the T5-XXL text encoder and SD3's CLIP-L +
CLIP-G + T5-XXL triple, any subset of the three.

Facts implemented (as observed in ComfyUI 0.3.64):

* T5-XXL tokens: no start token, end token 1 after the text, padding 0 up to ``min_length``
  (77 for SD3, 256 for Flux, 1 for PixArt/Chroma), one chunk however long the prompt
  (``max_length`` 99999999); weights parsed like CLIP's; tokens key ``"t5xxl"``.
* ``t5_xxl_detect(sd)``: ``{"dtype_t5": <dtype of encoder.final_layer_norm.weight>}`` (plus
  ``t5xxl_scaled_fp8`` when the file has a ``scaled_fp8`` key).
* SD3 tokens: ``{"g", "l", "t5xxl"}``. Encoding: L and G cut to the shorter token count,
  concatenated on the feature axis (G alone is left-padded by L's width), zero-padded to
  T5's width (4096) and put before the T5 tokens; pooled = L pooled ++ G pooled (zeros for a
  missing encoder). An empty stream (``[]``, what CLIPTextEncodeSD3 sends with
  ``empty_padding = none``) is encoded as the empty sequence of length 0 (T5: one token);
  all of L, G empty and no T5: zeros ``[1, 77, 4096]``.
* With ``t5_attention_mask`` the T5 attention mask (int64 ``[1, T]``) is an extra
  ``attention_mask`` key.

Simplifications: the T5 vocabulary is a byte-level stand-in (ids = UTF-8 bytes + 3, 0 pad,
1 end, 2 unknown; words split on spaces); CLIP-L / CLIP-G are the fake's tiny ones, so the
zero pooled parts have their (tiny) projection sizes, not 768 / 1280.
"""

import logging
import os

import torch

import comfy.model_management
import comfy.text_encoders.t5
from comfy import sd1_clip, sdxl_clip

_HERE = os.path.dirname(os.path.realpath(__file__))
T5_WIDTH = 4096


class ByteT5Tokenizer:
    """A stand-in for ``transformers.T5TokenizerFast`` with T5's special ids."""

    PAD, END, UNK = 0, 1, 2

    @classmethod
    def from_pretrained(cls, path=None, **kwargs):
        return cls()

    def __call__(self, text):
        return {"input_ids": [b + 3 for b in text.encode("utf-8")] + [self.END]}

    def get_vocab(self):
        vocab = {"<pad>": self.PAD, "</s>": self.END, "<unk>": self.UNK}
        vocab.update({f"<0x{b:02X}>": b + 3 for b in range(256)})
        return vocab


def pick_weight_dtype(dtype, fallback_dtype, device=None):
    """A family's own weight dtype unless it is wider than the fallback or the device
    cannot run it."""
    mm = comfy.model_management
    if dtype is None or mm.dtype_size(dtype) > mm.dtype_size(fallback_dtype):
        dtype = fallback_dtype
    if not mm.supports_cast(device, dtype):
        dtype = fallback_dtype
    return dtype


class T5XXLModel(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False, model_options={}):
        model_options = {**model_options, "model_name": "t5xxl"}
        super().__init__(device=device, layer=layer, layer_idx=layer_idx,
                         textmodel_json_config=os.path.join(_HERE, "t5_config_xxl.json"), dtype=dtype,
                         special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                         enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                         model_options=model_options)


def t5_xxl_detect(state_dict, prefix=""):
    out = {}
    key = f"{prefix}encoder.final_layer_norm.weight"
    if key in state_dict:
        out["dtype_t5"] = state_dict[key].dtype
    if f"{prefix}scaled_fp8" in state_dict:
        out["t5xxl_scaled_fp8"] = state_dict[f"{prefix}scaled_fp8"].dtype
    return out


class T5XXLTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}, min_length=77, max_length=99999999):
        super().__init__(None, embedding_directory=embedding_directory, pad_with_end=False, embedding_size=T5_WIDTH,
                         embedding_key="t5xxl", tokenizer_class=ByteT5Tokenizer, has_start_token=False,
                         pad_to_max_length=False, max_length=max_length, min_length=min_length,
                         tokenizer_data=tokenizer_data)


class SD3Tokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.clip_l = sd1_clip.SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                           embedding_size=sd1_clip._tiny_hidden_size("sd1_clip_config.json"))
        self.clip_g = sdxl_clip.SDXLClipGTokenizer(embedding_directory=embedding_directory,
                                                   tokenizer_data=tokenizer_data)
        self.t5xxl = T5XXLTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs),
                "l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
                "t5xxl": self.t5xxl.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.clip_g.untokenize(token_weight_pair)

    def state_dict(self):
        return {}


def _pooled_size(config_name):
    import json

    with open(os.path.join(os.path.dirname(_HERE), config_name)) as f:
        return json.load(f)["projection_dim"]


class SD3ClipModel(torch.nn.Module):
    def __init__(self, clip_l=True, clip_g=True, t5=True, dtype_t5=None, t5_attention_mask=False, device="cpu",
                 dtype=None, model_options={}):
        super().__init__()
        self.dtypes = set()
        self.clip_l = self.clip_g = self.t5xxl = None
        if clip_l:
            self.clip_l = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                               layer_norm_hidden_state=False, return_projected_pooled=False,
                                               model_options=model_options)
            self.dtypes.add(dtype)
        if clip_g:
            self.clip_g = sdxl_clip.SDXLClipG(device=device, dtype=dtype, model_options=model_options)
            self.dtypes.add(dtype)
        self.t5_attention_mask = t5_attention_mask
        if t5:
            dtype_t5 = pick_weight_dtype(dtype_t5, dtype, device)
            self.t5xxl = T5XXLModel(device=device, dtype=dtype_t5, model_options=model_options,
                                    attention_mask=t5_attention_mask)
            self.dtypes.add(dtype_t5)
        logging.debug(f"Created SD3 text encoder with: clip_l {clip_l}, clip_g {clip_g}, t5xxl {t5}:{dtype_t5}")

    def _parts(self):
        return [m for m in (self.clip_l, self.clip_g, self.t5xxl) if m is not None]

    def set_clip_options(self, options):
        for m in self._parts():
            m.set_clip_options(options)

    def reset_clip_options(self):
        for m in self._parts():
            m.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        pairs_l, pairs_g, pairs_t5 = token_weight_pairs["l"], token_weight_pairs["g"], token_weight_pairs["t5xxl"]
        device = comfy.model_management.intermediate_device()
        l_size, g_size = _pooled_size("sd1_clip_config.json"), _pooled_size("clip_config_bigg.json")
        lg_out = pooled = out = None
        extra = {}
        if len(pairs_l) > 0 or len(pairs_g) > 0:
            if self.clip_l is not None:
                lg_out, l_pooled = self.clip_l.encode_token_weights(pairs_l)
            else:
                l_pooled = torch.zeros((1, l_size), device=device)
            if self.clip_g is not None:
                g_out, g_pooled = self.clip_g.encode_token_weights(pairs_g)
                if lg_out is not None:
                    cut = min(lg_out.shape[1], g_out.shape[1])
                    lg_out = torch.cat([lg_out[:, :cut], g_out[:, :cut]], dim=-1)
                else:
                    lg_out = torch.nn.functional.pad(g_out, (l_size, 0))
            else:
                g_pooled = torch.zeros((1, g_size), device=device)
            if lg_out is not None:
                lg_out = torch.nn.functional.pad(lg_out, (0, T5_WIDTH - lg_out.shape[-1]))
                out = lg_out
            pooled = torch.cat((l_pooled, g_pooled), dim=-1)
        if self.t5xxl is not None:
            t5_output = self.t5xxl.encode_token_weights(pairs_t5)
            t5_out = t5_output[0]
            if self.t5_attention_mask:
                extra["attention_mask"] = t5_output[2]["attention_mask"]
            out = torch.cat([lg_out, t5_out], dim=-2) if lg_out is not None else t5_out
        if out is None:
            out = torch.zeros((1, 77, T5_WIDTH), device=device)
        if pooled is None:
            pooled = torch.zeros((1, l_size + g_size), device=device)
        return out, pooled, extra

    def load_sd(self, sd):
        if "text_model.encoder.layers.30.mlp.fc1.weight" in sd:
            return self.clip_g.load_sd(sd)
        if "text_model.encoder.layers.1.mlp.fc1.weight" in sd:
            return self.clip_l.load_sd(sd)
        return self.t5xxl.load_sd(sd)


def sd3_clip(clip_l=True, clip_g=True, t5=True, dtype_t5=None, t5xxl_scaled_fp8=None, t5_attention_mask=False):
    if t5xxl_scaled_fp8 is not None:
        raise NotImplementedError("the fake comfy package does not implement scaled fp8 T5 weights")

    class SD3ClipModel_(SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(clip_l=clip_l, clip_g=clip_g, t5=t5, dtype_t5=dtype_t5,
                             t5_attention_mask=t5_attention_mask, device=device, dtype=dtype,
                             model_options=model_options)
    return SD3ClipModel_
