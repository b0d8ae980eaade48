"""Fake of ``comfy/ldm/models/autoencoder.py``: the KL autoencoders.

``AutoencoderKL(embed_dim=..., ddconfig={...})`` has ``quant_conv`` / ``post_quant_conv``
(SD1/SDXL); ``AutoencodingEngine`` built without them is the SD3/Flux variant. Encoding is
deterministic: the regulariser returns the mean of the latent distribution.
"""

import importlib

import torch

import comfy.ops

ops = comfy.ops.disable_weight_init


def instantiate_from_config(config):
    module, _, name = config["target"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**config.get("params", {}))


class DiagonalGaussianRegularizer(torch.nn.Module):
    def __init__(self, sample=False):
        super().__init__()
        self.sample = sample

    def forward(self, z):
        mean, logvar = torch.chunk(z, 2, dim=1)
        if self.sample:
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
            z = mean + std * torch.randn_like(mean)
        else:
            z = mean
        return z, {}


class AutoencodingEngine(torch.nn.Module):
    def __init__(self, *args, encoder_config=None, decoder_config=None, regularizer_config=None, **kwargs):
        super().__init__()
        self.encoder = instantiate_from_config(encoder_config)
        self.decoder = instantiate_from_config(decoder_config)
        self.regularization = instantiate_from_config(regularizer_config)
        self.quant_conv = None
        self.post_quant_conv = None

    def encode(self, x, return_reg_log=False, unregularized=False):
        z = self.encoder(x)
        if self.quant_conv is not None:
            z = self.quant_conv(z)
        if unregularized:
            return z, {}
        z, reg_log = self.regularization(z)
        return (z, reg_log) if return_reg_log else z

    def decode(self, z, **decoder_kwargs):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, **decoder_kwargs)


class AutoencodingEngineLegacy(AutoencodingEngine):
    def __init__(self, embed_dim, **kwargs):
        ddconfig = kwargs.pop("ddconfig")
        super().__init__(
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
            **kwargs,
        )
        factor = 1 + int(ddconfig["double_z"])
        self.quant_conv = ops.Conv2d(factor * ddconfig["z_channels"], factor * embed_dim, 1)
        self.post_quant_conv = ops.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim


class AutoencoderKL(AutoencodingEngineLegacy):
    def __init__(self, **kwargs):
        if "lossconfig" in kwargs:
            kwargs["loss_config"] = kwargs.pop("lossconfig")
        kwargs.pop("loss_config", None)
        super().__init__(regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                         **kwargs)
