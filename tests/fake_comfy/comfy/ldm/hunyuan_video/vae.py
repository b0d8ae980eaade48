"""Fake of ``comfy.ldm.hunyuan_video.vae``: the HunyuanImage 2.1 image VAE: 64 latent
channels, 32x spatial (see ../tiny_autoencoder.py). ComfyUI builds it as an
``AutoencodingEngine`` of this module's Encoder / Decoder; the fake's single module
holds both halves under the same ``encoder.`` / ``decoder.`` prefixes."""

from comfy.ldm.tiny_autoencoder import TinyAutoencoder


class HunyuanImageVAE(TinyAutoencoder):
    def __init__(self, z_channels=64):
        super().__init__(z_channels=z_channels, spatial=32, dims=2)
