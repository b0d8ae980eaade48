"""Fake of ``comfy.text_encoders.qwen_image``: Qwen-Image's Qwen2.5-VL 7B text encoder.

Facts implemented (ComfyUI 0.3.64):

* tokens ``{"qwen25_7b": [one chunk]}``: no start / end token, weights off
  (``disable_weights``), at least 1 token, pad 151643; the prompt goes into a chat template
  (``<|im_start|>system ...<|im_end|> <|im_start|>user {} <|im_end|> <|im_start|>assistant``),
  another one when ``images`` are given (with ``<|vision_start|><|image_pad|><|vision_end|>``),
  or ``llama_template``; a prompt starting with ``<|im_start|>`` is used as it is.
* ``tokenize(text, images=[IMAGE, ...])`` replaces the n-th ``<|image_pad|>`` (151655) token
  by ``({"type": "image", "data": images[n], "original_type": "image"}, weight)``.
* encoding: the last layer without a final-norm option, attention mask on (returned as the
  ``attention_mask`` extra); the output starts at the second ``<|im_start|>`` (the template's
  system part is cut off), the mask likewise, and a mask of all ones is dropped.

Simplifications: a byte-level tokenizer (ids = UTF-8 bytes) that knows Qwen's special tokens
by their real ids; words split on spaces (newlines vanish); the image stand-in of ``llama``.
"""

import numbers
import re

import torch

import comfy.text_encoders.llama
from comfy import sd1_clip

SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
           "<|vision_end|>": 151653, "<|image_pad|>": 151655}
IM_START, IMAGE_PAD = SPECIAL["<|im_start|>"], SPECIAL["<|image_pad|>"]


class ByteQwenTokenizer:
    """A stand-in for ``transformers.Qwen2Tokenizer``: bytes as ids, special tokens whole."""

    _split = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")

    @classmethod
    def from_pretrained(cls, path=None, **kwargs):
        return cls()

    def __call__(self, text):
        ids = []
        for part in self._split.split(text):
            ids.extend([SPECIAL[part]] if part in SPECIAL else list(part.encode("utf-8")))
        return {"input_ids": ids}

    def get_vocab(self):
        vocab = {f"<0x{b:02X}>": b for b in range(256)}
        vocab.update(SPECIAL)
        return vocab


class Qwen25_7BVLITokenizer(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(None, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=comfy.text_encoders.llama.QWEN25_7B_TINY["hidden_size"],
                         embedding_key="qwen25_7b", tokenizer_class=ByteQwenTokenizer, has_start_token=False,
                         has_end_token=False, pad_to_max_length=False, max_length=99999999, min_length=1,
                         pad_token=SPECIAL["<|endoftext|>"], tokenizer_data=tokenizer_data)


class QwenImageTokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, name="qwen25_7b",
                         tokenizer=Qwen25_7BVLITokenizer)
        self.llama_template = ("<|im_start|>system Describe the image.<|im_end|> <|im_start|>user {}<|im_end|> "
                               "<|im_start|>assistant ")
        self.llama_template_images = ("<|im_start|>system Describe the input image, then apply the instruction."
                                      "<|im_end|> <|im_start|>user <|vision_start|><|image_pad|><|vision_end|>{}"
                                      "<|im_end|> <|im_start|>assistant ")

    def tokenize_with_weights(self, text, return_word_ids=False, llama_template=None, images=[], **kwargs):
        if text.startswith("<|im_start|>"):
            llama_text = text
        elif llama_template is not None:
            llama_text = llama_template.format(text)
        else:
            llama_text = (self.llama_template_images if len(images) > 0 else self.llama_template).format(text)
        tokens = super().tokenize_with_weights(llama_text, return_word_ids=return_word_ids, disable_weights=True,
                                               **kwargs)
        used = 0
        for chunk in tokens["qwen25_7b"]:
            for i, item in enumerate(chunk):
                if item[0] == IMAGE_PAD and used < len(images):
                    chunk[i] = ({"type": "image", "data": images[used], "original_type": "image"},) + item[1:]
                    used += 1
        return tokens


class Qwen25_7BVLIModel(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True, model_options={}):
        super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                         special_tokens={"pad": SPECIAL["<|endoftext|>"]}, layer_norm_hidden_state=False,
                         model_class=comfy.text_encoders.llama.Qwen25_7BVLI, enable_attention_masks=attention_mask,
                         return_attention_masks=attention_mask, model_options=model_options)


class QwenImageTEModel(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, name="qwen25_7b", clip_model=Qwen25_7BVLIModel,
                         model_options=model_options)

    def encode_token_weights(self, token_weight_pairs):
        out, pooled, extra = super().encode_token_weights(token_weight_pairs)
        pairs = token_weight_pairs["qwen25_7b"][0]
        starts = 0
        template_end = 0
        for i, item in enumerate(pairs):
            token = item[0]
            if isinstance(token, numbers.Integral) and token == IM_START and starts < 2:
                template_end = i
                starts += 1
        out = out[:, template_end:]
        extra["attention_mask"] = extra["attention_mask"][:, template_end:]
        if extra["attention_mask"].sum() == torch.numel(extra["attention_mask"]):
            extra.pop("attention_mask")
        return out, pooled, extra


def te(dtype_llama=None, llama_scaled_fp8=None):
    if llama_scaled_fp8 is not None:
        raise NotImplementedError("the fake comfy package does not implement scaled fp8 Qwen weights")

    class QwenImageTEModel_(QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype_llama if dtype_llama is not None else dtype,
                             model_options=model_options)
    return QwenImageTEModel_
