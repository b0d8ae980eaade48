"""Fake-only module: the HunyuanVideo VAE. ComfyUI builds it as its KL ``AutoencoderKL``
with a 3-D (``conv3d``, ``time_compress = 4``) ddconfig: 16 latent channels, 8x spatial,
4x causal temporal compression, quant convs, ``decoder.conv_in.conv.weight`` (see
../tiny_autoencoder.py)."""

from comfy.ldm.tiny_autoencoder import TinyAutoencoder


class HunyuanVideoVAE(TinyAutoencoder):
    def __init__(self, z_channels=16):
        super().__init__(z_channels=z_channels, spatial=8, temporal=4, kl=True, conv_in_wrapped=True)
