"""Fake of ``comfy.supported_models_base``: only ``ClipTarget``."""


class ClipTarget:
    def __init__(self, tokenizer, clip):
        self.clip = clip
        self.tokenizer = tokenizer
        self.params = {}
