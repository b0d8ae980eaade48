"""Fake of ``comfy.ldm.lightricks.vae.causal_video_autoencoder``: the LTXV VAE: 128 latent
channels, 32x spatial, 8x causal temporal compression (see ../../tiny_autoencoder.py).
ComfyUI picks the version from the width of ``decoder.up_blocks.0.res_blocks.0.conv1.conv.weight``
(512: 0, 1024: 1, plus ``encoder.down_blocks.1.conv.conv.bias``: 2); the fake keeps that
tensor's first dimension and nothing else of its size."""

from comfy.ldm.tiny_autoencoder import TinyAutoencoder

SIGNATURE = "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight"


class VideoVAE(TinyAutoencoder):
    def __init__(self, version=0, config=None):
        width = 512 if version == 0 else 1024
        super().__init__(z_channels=128, spatial=32, temporal=8, conv_in_wrapped=True,
                         signatures={SIGNATURE: (width, 1, 1, 1, 1)})
        self.version = version
