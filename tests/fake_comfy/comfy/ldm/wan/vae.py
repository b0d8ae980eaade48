"""Fake of ``comfy.ldm.wan.vae``: the Wan 2.1 VAE (also Qwen-Image's): 16 latent channels,
8x spatial, 4x causal temporal compression (see ../tiny_autoencoder.py)."""

from comfy.ldm.tiny_autoencoder import TinyAutoencoder

SIGNATURES = {"decoder.middle.0.residual.0.gamma": (8, 1, 1, 1)}


class WanVAE(TinyAutoencoder):
    def __init__(self, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0):
        super().__init__(z_channels=z_dim, spatial=8, temporal=4, decoder_in="conv1", signatures=SIGNATURES)
