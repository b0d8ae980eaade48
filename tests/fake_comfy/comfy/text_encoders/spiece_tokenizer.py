"""Fake of ``comfy.text_encoders.spiece_tokenizer``: ``SPieceTokenizer``'s contract with a
byte-level stand-in for a SentencePiece model (the project's venv has no ``sentencepiece``).

Facts implemented (ComfyUI 0.3.64): built from a model given as a uint8 tensor, ``bytes`` or
a file path (anything else, ``None`` included: ``ValueError("invalid tokenizer")``, which a
Wan / Lumina2 file without ``spiece_model`` gets), ``add_bos`` / ``add_eos`` keyword options, ``__call__`` ->
``{"input_ids": [...]}``, ``get_vocab()``, ``serialize_model()`` -> the model as a
``torch.ByteTensor``, which is what a Wan / Lumina2 CLIP's ``get_sd()`` carries as
``spiece_model`` and its loader reads back from the text-encoder file.

Simplification: the "model" is a small JSON document ``{"format": "luna-fake-spiece", "bos",
"eos", "offset"}``; ids are UTF-8 bytes + ``offset``.
"""

import json
import os

import torch

FORMAT = "luna-fake-spiece"


def make_model(bos=2, eos=1, offset=3):
    """The bytes of a stand-in SentencePiece model (what a text-encoder file stores)."""
    return json.dumps({"format": FORMAT, "bos": bos, "eos": eos, "offset": offset}, sort_keys=True).encode()


class SPieceTokenizer:
    @staticmethod
    def from_pretrained(path, **kwargs):
        return SPieceTokenizer(path, **kwargs)

    def __init__(self, tokenizer_path, add_bos=False, add_eos=True):
        self.add_bos = add_bos
        self.add_eos = add_eos
        if torch.is_tensor(tokenizer_path):
            tokenizer_path = tokenizer_path.numpy().tobytes()
        if isinstance(tokenizer_path, bytes):
            proto = tokenizer_path
        else:
            if not os.path.isfile(tokenizer_path):
                raise ValueError("invalid tokenizer")
            with open(tokenizer_path, "rb") as f:
                proto = f.read()
        try:
            model = json.loads(proto.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError / JSONDecodeError
            model = None
        if not isinstance(model, dict) or model.get("format") != FORMAT:
            raise RuntimeError("Internal: could not parse ModelProto from the serialized model")
        self._proto = proto
        self.bos, self.eos, self.offset = int(model["bos"]), int(model["eos"]), int(model["offset"])

    def get_vocab(self):
        out = {"<pad>": 0, "</s>": self.eos, "<s>": self.bos}
        out.update({f"<0x{b:02X}>": b + self.offset for b in range(256)})
        return out

    def __call__(self, string):
        ids = [b + self.offset for b in string.encode("utf-8")]
        return {"input_ids": ([self.bos] if self.add_bos else []) + ids + ([self.eos] if self.add_eos else [])}

    def serialize_model(self):
        return torch.ByteTensor(list(self._proto))
