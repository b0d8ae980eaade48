"""Every VAE family of ComfyUI v0.3.64 through the Luna proxy, against the fake ComfyUI.

Per family (image VAEs with 4 / 16 / 64 latent channels, and the video VAEs Wan 2.1, Wan 2.2,
HunyuanVideo and LTXV with 5-D latents and causal temporal compression), a tiny random model
in the layout the fake's detection reads is loaded twice: by the daemon (engine = comfy on
tests/fake_comfy, real sockets) behind ``DaemonVAE``, and natively with ``comfy.sd.VAE`` in
this process. The stock nodes (VAEEncode, VAEDecode, VAEDecodeTiled, VAEEncodeTiled) run on
both inside ``torch.inference_mode()``, and their outputs must match (max |diff| <= 1e-5,
fp32). The proxy's attributes must equal the native VAE's: they come from the daemon's
loaded VAE, never from defaults on this side.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_models

from luna_daemon.client import DaemonClient, DaemonError
from luna_daemon.comfy_nodes import connection
from luna_daemon.comfy_nodes import nodes as luna_nodes
from luna_daemon.comfy_nodes.bench import _random_like
from luna_daemon.comfy_nodes.proxies import DaemonUnsupported, DaemonVAE
from luna_daemon.daemon import Daemon

TOL = 1e-5
FAKE_ROOT = comfy_models.FAKE_COMFY_ROOT

# name -> (fake module, class, kwargs (ComfyUI's own ddconfig names), pixels [frames, H, W],
#          expected (latent_channels, latent_dim, spatial, temporal))
VIDEO = {
    "wan2.1": ("comfy.ldm.wan.vae", "WanVAE", {"dim": 96, "z_dim": 16}, (9, 32, 48), (16, 3, 8, 4)),
    "wan2.2": ("comfy.ldm.wan.vae2_2", "WanVAE", {"dim": 160, "z_dim": 48}, (9, 32, 48), (48, 3, 16, 4)),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.causal_kl", "HunyuanVideoVAE", {}, (9, 32, 40), (16, 3, 8, 4)),
    "ltxv": ("comfy.ldm.lightricks.vae.causal_video_autoencoder", "VideoVAE", {"version": 0}, (17, 64, 64),
             (128, 3, 32, 8)),
}
IMAGE = {
    "hunyuan_image2.1": ("comfy.ldm.hunyuan_video.vae", "HunyuanImageVAE", {}, (2, 64, 96), (64, 2, 32, None)),
}
# Flux / SD3: ComfyUI's hard-coded SD-sized KL VAE with 16 latent channels and no quant convs
# (a ``config`` would give it quant convs and 4 channels), so this one is full size.
FLUX_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
FAMILIES = [*VIDEO, *IMAGE, "flux_sd3"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32 and a.device == b.device, (a.shape, b.shape)
    return float((a - b).abs().max())


def run(fn, *args, **kwargs):
    with torch.inference_mode():  # like ComfyUI's prompt worker
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _isolate():
    with comfy_models.fake_comfy_isolated():
        yield
        connection.reset()


@pytest.fixture(scope="module")
def native():
    comfy = comfy_models.import_fake_comfy()
    import nodes

    return type("Native", (), {"comfy": comfy, "nodes": nodes})


@pytest.fixture(scope="module")
def models(native, tmp_path_factory) -> Path:
    """One file per family, seeded random weights in the key layout detection reads."""
    root = tmp_path_factory.mktemp("vae_models")
    (root / "vae").mkdir()
    for i, (name, (module, cls, kwargs, _, _)) in enumerate({**VIDEO, **IMAGE}.items()):
        model = getattr(importlib.import_module(module), cls)(**kwargs)
        save_file(_random_like(model.state_dict(), seed=10 + i), str(root / "vae" / f"{name}.safetensors"))
    flux = comfy_models.vae_ldm_state_dict(seed=3, ddconfig=FLUX_DDCONFIG, embed_dim=16)
    flux = {k: v.half() for k, v in flux.items() if not k.startswith(("quant_conv.", "post_quant_conv."))}
    save_file(flux, str(root / "vae" / "flux_sd3.safetensors"))
    return root


@pytest.fixture(scope="module")
def daemon(models, native, tmp_path_factory):
    d = Daemon(comfy_models.comfy_engine_settings(tmp_path_factory.mktemp("home"), models))
    d.start()
    yield d
    d.stop(10)


@pytest.fixture(scope="module")
def conn(daemon, native, models):
    import folder_paths

    folder_paths.add_model_folder_path("vae", str(models / "vae"))
    client = DaemonClient(*daemon.address, token=daemon.token, timeout=120)
    yield connection.configure(daemon.settings, client)
    client.close()


@pytest.fixture(scope="module")
def pairs(conn, native, models):
    """family -> (proxy from Luna's VAE loader node, native comfy.sd.VAE of the same file)."""
    out = {}
    for name in FAMILIES:
        proxy = run(luna_nodes.LunaVAELoader().load_vae, f"{name}.safetensors")[0]
        sd = native.comfy.utils.load_torch_file(str(models / "vae" / f"{name}.safetensors"))
        out[name] = (proxy, run(native.comfy.sd.VAE, sd=sd))
    return out


def pixels_for(name: str) -> torch.Tensor:
    spec = VIDEO.get(name) or IMAGE.get(name)
    frames, h, w = spec[3] if spec else (2, 32, 48)  # flux_sd3: full size, so small images
    # +3 px each way: the VAE's own centre crop must run (on the daemon's side).
    return torch.rand(frames, h + 3, w + 3, 4, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", FAMILIES)
def test_attributes_come_from_the_daemons_vae(pairs, name):
    proxy, ref = pairs[name]
    assert isinstance(proxy, DaemonVAE)
    for attr in ("latent_channels", "latent_dim", "output_channels", "downscale_index_formula",
                 "upscale_index_formula", "crop_input", "not_video", "extra_1d_channel", "vae_dtype",
                 "working_dtypes"):
        assert getattr(proxy, attr) == getattr(ref, attr), attr
    for fn in ("spacial_compression_encode", "spacial_compression_decode", "temporal_compression_decode"):
        assert getattr(proxy, fn)() == getattr(ref, fn)(), fn
    expected = (VIDEO.get(name) or IMAGE.get(name) or (None,) * 4 + ((16, 2, 8, None),))[4]
    assert (proxy.latent_channels, proxy.latent_dim, proxy.spacial_compression_decode(),
            proxy.temporal_compression_decode()) == expected
    if ref.latent_dim == 3:  # (lambda_t, s, s): the lambdas rebuilt from the index formulas
        for frames in (1, 2, 5, 8, 9, 17, 81, 121):
            assert proxy.downscale_ratio[0](frames) == ref.downscale_ratio[0](frames), frames
            assert proxy.upscale_ratio[0](frames) == ref.upscale_ratio[0](frames), frames
        assert proxy.downscale_ratio[1:] == ref.downscale_ratio[1:] and proxy.upscale_ratio[1:] == ref.upscale_ratio[1:]
        shapes = [(1, 3, 17, 256, 256), (1, 3, 81, 480, 832), (2, 3, 5, 64, 64)]
        latent_shapes = [(1, proxy.latent_channels, 5, 32, 32), (1, proxy.latent_channels, 21, 60, 104)]
    else:
        assert proxy.downscale_ratio == ref.downscale_ratio and proxy.upscale_ratio == ref.upscale_ratio
        shapes = [(1, 3, 512, 512), (2, 3, 1024, 768)]
        latent_shapes = [(1, proxy.latent_channels, 64, 64), (4, proxy.latent_channels, 128, 96)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in shapes:
            assert proxy.memory_used_encode(shape, dtype) == pytest.approx(ref.memory_used_encode(shape, dtype)), shape
        for shape in latent_shapes:
            assert proxy.memory_used_decode(shape, dtype) == pytest.approx(ref.memory_used_decode(shape, dtype)), shape
    px = pixels_for(name)
    assert torch.equal(proxy.vae_encode_crop_pixels(px), ref.vae_encode_crop_pixels(px))


@pytest.mark.parametrize("name", FAMILIES)
def test_stock_nodes_on_the_proxy_match_native(pairs, native, name):
    proxy, ref = pairs[name]
    nodes = native.nodes
    with torch.inference_mode():
        pixels = pixels_for(name).clone()  # an inference tensor, as ComfyUI hands it over
    keep = pixels.clone()
    latent = run(nodes.VAEEncode().encode, proxy, pixels)[0]
    ref_latent = run(nodes.VAEEncode().encode, ref, pixels)[0]
    frames, h, w = pixels.shape[:3]
    s = ref.spacial_compression_encode()
    if ref.latent_dim == 3:  # a batch of frames is one clip: [1, C, T', h, w]
        t = ref.downscale_ratio[0](frames)
        assert ref_latent["samples"].shape == (1, ref.latent_channels, t, h // s, w // s)
    else:
        assert ref_latent["samples"].shape == (frames, ref.latent_channels, h // s, w // s)
    assert max_diff(latent["samples"], ref_latent["samples"]) <= TOL

    image = run(nodes.VAEDecode().decode, proxy, ref_latent)[0]
    ref_image = run(nodes.VAEDecode().decode, ref, ref_latent)[0]
    out_frames = ref.upscale_ratio[0](ref_latent["samples"].shape[2]) if ref.latent_dim == 3 else frames
    assert ref_image.shape == (out_frames, h // s * s, w // s * s, 3)  # VAEDecode folds 5-D to frames
    assert max_diff(image, ref_image) <= TOL
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0

    # Tiled decode: the node's clamping, temporal_compression_decode, spatial compression and
    # the tile_t / overlap_t it derives from temporal_size / temporal_overlap.
    tile = max(64, 4 * s)  # VAEDecodeTiled's minimum tile_size is 64
    tiled = {}
    # Image VAEs ignore the temporal sizes (tile_t / overlap_t become None in the node).
    for t_size, t_overlap in ((64, 8), (16, 8), (8, 4)) if ref.latent_dim == 3 else ((64, 8),):
        got = run(nodes.VAEDecodeTiled().decode, proxy, ref_latent, tile, tile // 4, t_size, t_overlap)[0]
        want = run(nodes.VAEDecodeTiled().decode, ref, ref_latent, tile, tile // 4, t_size, t_overlap)[0]
        assert max_diff(got, want) <= TOL, (t_size, t_overlap)
        tiled[t_size] = got
    if ref.latent_dim == 3:
        # temporal_size 8 -> tiles of 2 latent frames: really a different (tiled in time) computation
        assert float((tiled[8] - tiled[64]).abs().max()) > 1e-4

    for t_size, t_overlap in ((64, 8), (8, 4)) if ref.latent_dim == 3 else ((64, 8),):
        got = run(nodes.VAEEncodeTiled().encode, proxy, pixels, tile, s, t_size, t_overlap)[0]["samples"]
        want = run(nodes.VAEEncodeTiled().encode, ref, pixels, tile, s, t_size, t_overlap)[0]["samples"]
        assert max_diff(got, want) <= TOL, (t_size, t_overlap)
    assert torch.equal(pixels, keep)  # the inference tensor was never written


def test_a_latent_of_the_wrong_rank_is_a_typed_error(pairs):
    video, _ = pairs["wan2.1"]
    image, _ = pairs["hunyuan_image2.1"]
    with pytest.raises(DaemonError) as info:
        run(video.decode, torch.zeros(1, 16, 4, 4))
    assert info.value.code == "bad_args" and "5-D" in info.value.message
    with pytest.raises(DaemonError) as info:
        run(image.decode, torch.zeros(1, 64, 2, 2, 2))
    assert info.value.code == "bad_args" and "4-D" in info.value.message
    with pytest.raises(DaemonError) as info:
        run(video.decode, torch.zeros(1, 8, 2, 4, 4))
    assert info.value.code == "bad_args" and "16 latent channels" in info.value.message
    # The daemon keeps serving.
    assert run(video.decode, torch.zeros(1, 16, 2, 4, 4)).shape == (1, 5, 32, 32, 3)


def test_vae_options_travel_and_are_refused_by_a_vae_that_takes_none(pairs):
    proxy, ref = pairs["wan2.1"]
    latent = torch.zeros(1, 16, 2, 4, 4)
    with pytest.raises(TypeError):  # native: the model's decode() takes no such keyword
        run(ref.decode, latent, vae_options={"num_chunks": 2})
    with pytest.raises(DaemonError) as info:
        run(proxy.decode, latent, vae_options={"num_chunks": 2})
    assert info.value.code == "bad_args" and "num_chunks" in info.value.message
    with pytest.raises(DaemonUnsupported, match="cannot be sent"):
        proxy.decode(latent, vae_options={"nested": {"a": 1}})


def test_tiled_calls_of_a_video_vae_without_spatial_sizes_say_so(pairs):
    proxy, _ = pairs["wan2.1"]
    with pytest.raises(DaemonUnsupported, match="tile_x, tile_y and overlap"):
        proxy.decode_tiled(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(DaemonUnsupported, match="tile_x, tile_y and overlap"):
        proxy.encode_tiled(torch.zeros(5, 32, 32, 3), tile_t=8)


@pytest.fixture()
def standalone(make_settings):
    d = Daemon(make_settings())  # conftest's: engine = standalone, its tiny models
    d.start()
    c = DaemonClient(*d.address, token=d.token, timeout=60)
    yield c
    c.close()
    d.stop(10)


def test_wire_checks_of_video_calls_on_the_standalone_engine(standalone, model_dir):
    """The wire now carries 3-D to 5-D tensors, temporal tile sizes and vae_options: an
    engine without them (standalone, image VAEs) answers bad_args, never internal."""
    client = standalone
    model = client.vae_load(str(model_dir / "vae_folder"))["model"]
    cases = [
        ("vae_decode", {"latent": torch.zeros(1, 4, 2, 4, 4)}, "[B, C, h, w]"),
        ("vae_encode", {"pixels": torch.zeros(2, 1, 32, 32, 3)}, "[B, H, W, C]"),
        ("vae_decode", {"latent": torch.zeros(1, 4, 4, 4), "vae_options": {"num_chunks": 2}}, "vae_options"),
        ("vae_decode", {"latent": torch.zeros(1, 4, 4, 4), "vae_options": {"a": [1]}}, "vae_options"),
        ("vae_decode", {"latent": torch.zeros(1, 4, 4, 4), "tiled": {"tile_t": 0}}, "tile_t"),
        ("vae_decode", {"latent": torch.zeros(1, 4, 4, 4), "tiled": {"overlap_t": "x"}}, "overlap_t"),
        ("vae_decode", {"latent": torch.zeros(1, 4, 4, 4, 4, 4)}, "3-D or 4-D or 5-D"),
    ]
    for op, args, words in cases:
        with pytest.raises(DaemonError) as info:
            client.call(op, {"model": model, **args})
        assert info.value.code == "bad_args" and words in info.value.message, (op, info.value.message)
    # Image VAEs ignore the temporal sizes, as ComfyUI's do.
    out = client.call("vae_decode", {"model": model, "latent": torch.zeros(1, 4, 4, 4),
                                     "tiled": {"tile_x": 4, "tile_y": 4, "overlap": 1, "tile_t": 2, "overlap_t": 1}})
    assert out["image"].ndim == 4
