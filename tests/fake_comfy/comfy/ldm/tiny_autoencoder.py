"""Fake-only (no such module in ComfyUI): the tiny autoencoder behind the fake's video and
large-ratio image VAE families (Wan 2.1 / 2.2, HunyuanVideo, LTXV, HunyuanImage 2.1).

Real ComfyUI builds each family's own network; the fake keeps what callers can observe --
latent channels, spatial and temporal compression, causal frame counts (``T`` frames ->
``floor((T + k - 1) / k)`` latents -> ``latents * k - (k - 1)`` frames), the signature keys
ComfyUI detects the family by -- on a small real computation: spatial average pooling, a
strided (causal in time) convolution, and back through a 3x3(x3) mixing convolution and
the transposed strided one. ``signatures`` are
extra parameters at the dotted state-dict names the detection reads; they scale the
decoder's hidden features so the file's values matter.
"""

import torch
import torch.nn.functional as F
from torch import nn


class _Param(nn.Module):
    pass


def _put(root, dotted, shape):
    """Register a parameter at ``dotted`` (e.g. ``decoder.middle.0.residual.0.gamma``)."""
    *path, leaf = dotted.split(".")
    node = root
    for part in path:
        child = node._modules.get(part)
        if child is None:
            child = _Param()
            node.add_module(part, child)
        node = child
    param = nn.Parameter(torch.zeros(shape))
    node.register_parameter(leaf, param)
    return param


class _Conv(nn.Module):
    """A convolution held under ``.conv`` (the ``conv_in.conv.weight`` layout of causal 3-D convs)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class TinyAutoencoder(nn.Module):
    def __init__(self, *, z_channels, spatial, temporal=1, dims=3, hidden=8, kl=False, out_channels=3,
                 decoder_in="conv_in", conv_in_wrapped=False, signatures=None):
        super().__init__()
        if spatial % 2:
            raise ValueError("spatial compression must be even")
        self.dims, self.z, self.spatial, self.temporal, self.kl = dims, z_channels, spatial, temporal, kl
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        conv_t = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        kernel = (temporal, 2, 2) if dims == 3 else (2, 2)
        self.encoder = nn.Module()
        self.encoder.conv_in = conv(3, hidden, kernel, stride=kernel)
        self.encoder.conv_out = conv(hidden, z_channels * (2 if kl else 1), 1)
        self.decoder = nn.Module()
        conv_in = conv(z_channels, hidden, 1)
        self._decoder_in = decoder_in
        self.decoder.add_module(decoder_in, _Conv(conv_in) if conv_in_wrapped else conv_in)
        # A 3x3(x3) mixing layer: the decoder sees its neighbours, so tiles have seams as in
        # real VAEs and a tiled decode differs from a whole one.
        self.decoder.mid = conv(hidden, hidden, 3, padding=1)
        self.decoder.conv_out = conv_t(hidden, out_channels, kernel, stride=kernel)
        if kl:
            self.quant_conv = conv(2 * z_channels, 2 * z_channels, 1)
            self.post_quant_conv = conv(z_channels, z_channels, 1)
        self._signatures = [(name, _put(self, name, shape)) for name, shape in (signatures or {}).items()]

    def _pool(self):
        return (1, self.spatial // 2, self.spatial // 2) if self.dims == 3 else (self.spatial // 2,) * 2

    def encode(self, x):
        if self.dims == 3:
            # Causal in time: the first frame alone makes the first latent frame.
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.temporal - 1, -1, -1), x], dim=2)
            x = F.avg_pool3d(x, self._pool())
        else:
            x = F.avg_pool2d(x, self._pool())
        h = self.encoder.conv_out(F.silu(self.encoder.conv_in(x)))
        if self.kl:
            h = self.quant_conv(h)
            h = h[:, : self.z]  # the Gaussian's mode
        return h

    def decode(self, z, **kwargs):
        if kwargs:
            raise TypeError(f"decode() got unexpected keyword arguments {sorted(kwargs)}")
        if self.kl:
            z = self.post_quant_conv(z)
        h = getattr(self.decoder, self._decoder_in)(z)
        for _, param in self._signatures:
            h = h * (1.0 + 0.1 * torch.tanh(param.float().mean()).to(h.dtype))
        h = h + self.decoder.mid(F.silu(h))
        x = self.decoder.conv_out(F.silu(h))
        if self.dims == 3:
            x = F.interpolate(x, scale_factor=self._pool(), mode="nearest")
            x = x[:, :, self.temporal - 1:]  # latents * k - (k - 1) frames
        else:
            x = F.interpolate(x, scale_factor=self._pool(), mode="nearest")
        return x
