"""Fake of ``comfy.ldm.wan.vae2_2``: the Wan 2.2 VAE: 48 latent channels, 16x spatial, 4x
causal temporal compression (see ../tiny_autoencoder.py)."""

from comfy.ldm.tiny_autoencoder import TinyAutoencoder

SIGNATURES = {"decoder.middle.0.residual.0.gamma": (8, 1, 1, 1),
              "decoder.upsamples.0.upsamples.0.residual.2.weight": (8, 1, 1, 1, 1)}


class WanVAE(TinyAutoencoder):
    def __init__(self, dim=160, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0):
        super().__init__(z_channels=z_dim, spatial=16, temporal=4, decoder_in="conv1", signatures=SIGNATURES)
