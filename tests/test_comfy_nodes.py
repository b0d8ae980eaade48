"""Contract tests of the ComfyUI proxies and Luna nodes against the fake ComfyUI (tests/fake_comfy).

A real daemon runs in this process with engine = comfy on the fake ComfyUI root; the "ComfyUI"
side is the same process: the fake's stock nodes (nodes.py, comfy_extras) are run once on a
Luna proxy and once on the native object ComfyUI itself would have built, inside
``torch.inference_mode()`` like ComfyUI's prompt worker, and the results must match
(max |diff| <= 1e-5, fp32, CPU; in practice bit-identical).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_models

from luna_daemon.client import DaemonClient, DaemonError, DaemonUnavailable
from luna_daemon.comfy_nodes import connection, proxies
from luna_daemon.comfy_nodes import nodes as luna_nodes
from luna_daemon.comfy_nodes.proxies import DaemonCLIP, DaemonUnsupported, DaemonVAE
from luna_daemon.daemon import Daemon
from luna_daemon.settings import Settings

FAKE_ROOT = comfy_models.FAKE_COMFY_ROOT
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
CPU = torch.device("cpu")
LONG_PROMPT = " ".join(["a photo of a red cat riding a horse at night"] * 12)
PROMPTS = ["a photo of a cat", "a (masterpiece:1.2) photo of a ((cat)) in \\(parens\\)",
           "embedding:myemb a photo of a cat", LONG_PROMPT, ""]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and float((a - b).abs().max()) <= TOL)


def same_cond(got: list, ref: list) -> None:
    """Two CONDITIONING lists are equal: tensors within TOL, the same extra keys and values."""
    assert len(got) == len(ref) == 1
    (cond, extra), (ref_cond, ref_extra) = got[0], ref[0]
    assert close(cond, ref_cond), float((cond - ref_cond).abs().max())
    assert sorted(extra) == sorted(ref_extra)
    for key, value in ref_extra.items():
        if isinstance(value, torch.Tensor):
            assert close(extra[key], value), key
        else:
            assert extra[key] == value, key


def same_tokens(a, b) -> bool:
    """Token structures are equal, tuples stay tuples, tensors (embeddings) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tokens(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tokens(x, y) for x, y in zip(a, b))
    return a == b


from luna_daemon.netutil import free_port  # noqa: E402


class SpyClient(DaemonClient):
    """A DaemonClient that records (op, whether bytes were uploaded)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[str, bool]] = []

    def call(self, op, args=None, *, timeout=None, check=None):
        self.calls.append((op, isinstance(args, dict) and "data" in args))
        return super().call(op, args, timeout=timeout, check=check)

    def count(self, op: str, uploads: bool | None = None) -> int:
        return sum(1 for o, d in self.calls if o == op and (uploads is None or d == uploads))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _isolate():
    """Leave no fake ``comfy`` importable and no Luna connection for later test modules."""
    with comfy_models.fake_comfy_isolated():
        yield
        connection.reset()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A ComfyUI-style models folder with tiny files."""
    root = tmp_path_factory.mktemp("comfy_models")
    comfy_models.write_clip_l(root / "text_encoders" / "clip_l.safetensors", seed=3)
    comfy_models.write_clip_g(root / "text_encoders" / "clip_g.safetensors", seed=4)
    comfy_models.write_vae(root / "vae" / "tiny_vae.safetensors", seed=1)
    comfy_models.write_lora(root / "loras" / "lora_a.safetensors", seed=5, alpha=2.0)
    comfy_models.write_lora(root / "loras" / "lora_b.safetensors", seed=6, alpha=None, layers=(1,))
    comfy_models.write_lora(root / "loras" / "lora_xl.safetensors", seed=7, encoders=("lora_te1", "lora_te2"),
                            layers=(0, 1, 30))
    comfy_models.write_embedding(root / "embeddings" / "myemb.safetensors", vectors=2)
    return root


def _settings(home: Path, models: Path, **overrides) -> Settings:
    return comfy_models.comfy_engine_settings(home, models, **overrides)


@pytest.fixture(scope="module")
def native(models):
    """The fake ComfyUI (as the ComfyUI process sees it) with the test folders registered."""
    comfy = comfy_models.import_fake_comfy()
    import folder_paths
    import nodes
    from comfy_extras import nodes_clip_sdxl

    for kind in ("text_encoders", "vae", "loras", "embeddings"):
        folder_paths.add_model_folder_path(kind, str(models / kind))
    return type("Native", (), {"comfy": comfy, "nodes": nodes, "sdxl": nodes_clip_sdxl, "folder_paths": folder_paths})


@pytest.fixture(scope="module")
def daemon(models, native, tmp_path_factory):
    d = Daemon(_settings(tmp_path_factory.mktemp("home"), models))
    d.start()
    yield d
    d.stop(10)


@pytest.fixture(scope="module")
def spy(daemon):
    client = SpyClient(*daemon.address, token=daemon.token, timeout=60)
    yield client
    client.close()


@pytest.fixture()
def conn(daemon, spy):
    """The process-wide Luna connection, pointed at the test daemon."""
    c = connection.configure(daemon.settings, spy)
    yield c


@pytest.fixture(scope="module")
def native_vae(native, models):
    config = json.loads((models / "vae" / "tiny_vae.json").read_text())
    with torch.inference_mode():
        sd = native.comfy.utils.load_torch_file(str(models / "vae" / "tiny_vae.safetensors"))
        return native.comfy.sd.VAE(sd=sd, config=config)


@pytest.fixture(scope="module")
def native_clip(native):
    with torch.inference_mode():
        return native.nodes.CLIPLoader().load_clip("clip_l.safetensors", type="stable_diffusion")[0]


@pytest.fixture(scope="module")
def native_sdxl(native):
    with torch.inference_mode():
        return native.nodes.DualCLIPLoader().load_clip("clip_l.safetensors", "clip_g.safetensors", "sdxl")[0]


def run(fn, *args, **kwargs):
    """Run like ComfyUI's prompt worker: inside inference mode."""
    with torch.inference_mode():
        return fn(*args, **kwargs)


def text_encode(native, clip, text):
    return run(native.nodes.CLIPTextEncode().encode, clip, text)[0]


def lora(native, clip, name, strength, model=None):
    return run(native.nodes.LoraLoader().load_lora, model, clip, name, 1.0, strength)[1]


@pytest.fixture()
def vae(conn) -> DaemonVAE:
    return run(luna_nodes.LunaVAELoader().load_vae, "tiny_vae.safetensors")[0]


@pytest.fixture()
def clip(conn) -> DaemonCLIP:
    return run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "sd1")[0]


@pytest.fixture()
def sdxl(conn) -> DaemonCLIP:
    return run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "sdxl", "clip_g.safetensors")[0]


# ----------------------------------------------------------------------- custom-node entry


_ENTRY_PROBE = textwrap.dedent("""
    import importlib.util, json, logging, sys, threading
    records = []
    class H(logging.Handler):
        def emit(self, r): records.append(r.getMessage())
    logging.getLogger().addHandler(H())
    if {block!r}:  # pretend a dependency is not installed
        import importlib.util as u
        real = u.find_spec
        u.find_spec = lambda name, *a, **k: None if name == {block!r} else real(name, *a, **k)
    import socket
    opened = []
    real_socket = socket.socket.connect
    socket.socket.connect = lambda self, *a: opened.append(a) or real_socket(self, *a)
    spec = importlib.util.spec_from_file_location("custom_nodes_x_luna", {init!r}, submodule_search_locations=[{repo!r}])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    print(json.dumps({{
        "classes": sorted(mod.NODE_CLASS_MAPPINGS),
        "names": mod.NODE_DISPLAY_NAME_MAPPINGS,
        "threads": threading.active_count(),
        "sockets": len(opened),
        "client_imported": "luna_daemon.client" in sys.modules,
        "torch_imported": "torch" in sys.modules,
        "comfy_imported": "comfy" in sys.modules,
        "logs": records,
    }}))
""")


def _probe_entry(block: str = "", folder: Path = REPO, pythonpath: str = "") -> dict:
    """Import ``folder/__init__.py`` as ComfyUI imports a custom node, in a fresh process."""
    code = _ENTRY_PROBE.format(block=block, init=str(folder / "__init__.py"), repo=str(folder))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(REPO.parent), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_root_init_exports_mappings_and_starts_nothing():
    out = _probe_entry()
    assert out["classes"] == ["LunaCLIPLoader", "LunaCheckpointTunnel", "LunaDaemonStatus", "LunaDualCLIPLoader",
                              "LunaQuadrupleCLIPLoader", "LunaTripleCLIPLoader", "LunaVAELoader"]
    assert out["names"] == {"LunaVAELoader": "Luna VAE Loader (daemon)", "LunaCLIPLoader": "Luna CLIP Loader (daemon)",
                            "LunaDualCLIPLoader": "Luna Dual CLIP Loader (daemon)",
                            "LunaTripleCLIPLoader": "Luna Triple CLIP Loader (daemon)",
                            "LunaQuadrupleCLIPLoader": "Luna Quadruple CLIP Loader (daemon)",
                            "LunaCheckpointTunnel": "Luna Checkpoint Tunnel", "LunaDaemonStatus": "Luna Daemon Status"}
    assert out["threads"] == 1 and out["sockets"] == 0
    assert not out["client_imported"] and not out["torch_imported"] and not out["comfy_imported"]


@pytest.mark.parametrize("package", ["safetensors", "orjson"])
def test_root_init_with_a_missing_dependency_logs_and_exports_nothing(package):
    out = _probe_entry(block=package)
    assert out["classes"] == [] and out["names"] == {}
    assert any("Luna Daemon nodes are disabled" in line and package in line for line in out["logs"]), out["logs"]


def test_root_init_through_a_symlinked_checkout_does_not_warn(tmp_path):
    """custom_nodes/luna-daemon -> the checkout: the luna_daemon package is the checkout's own
    (paths compared after resolving symlinks); a really different package is still named."""
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    link = custom_nodes / "luna-daemon"
    link.symlink_to(REPO, target_is_directory=True)
    out = _probe_entry(folder=link, pythonpath=str(REPO))  # luna_daemon imported by its real path
    assert len(out["classes"]) == 7
    assert not any("using the luna_daemon package installed at" in line for line in out["logs"]), out["logs"]
    elsewhere = custom_nodes / "old-copy"
    elsewhere.mkdir()
    (elsewhere / "__init__.py").write_bytes((REPO / "__init__.py").read_bytes())
    out = _probe_entry(folder=elsewhere, pythonpath=str(REPO))
    assert any("using the luna_daemon package installed at" in line and str(REPO) in line for line in out["logs"])


def test_root_init_under_another_package_name_reuses_luna_daemon():
    """pytest imports a rootdir __init__.py as a package; that must not load a second luna_daemon."""
    import importlib.util

    import luna_daemon.comfy_nodes as ours

    spec = importlib.util.spec_from_file_location("lunaroot_probe", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.NODE_CLASS_MAPPINGS == ours.NODE_CLASS_MAPPINGS
    assert not any(name.startswith("lunaroot_probe.") for name in sys.modules)


def test_node_definitions_follow_the_v1_contract(native):
    for cls in luna_nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        assert cls.CATEGORY == "Luna" and callable(getattr(cls, cls.FUNCTION))
    vae_in = luna_nodes.LunaVAELoader.INPUT_TYPES()
    assert "tiny_vae.safetensors" in vae_in["required"]["vae_name"][0]
    clip_in = luna_nodes.LunaCLIPLoader.INPUT_TYPES()
    assert "clip_g.safetensors" in clip_in["required"]["clip_name1"][0]
    assert clip_in["optional"]["clip_name2"][0][0] == "None"
    assert {"sd1", "sdxl", "sd3", "flux"} <= set(clip_in["required"]["type"][0])
    assert luna_nodes.LunaVAELoader.RETURN_TYPES == ("VAE",) and luna_nodes.LunaCLIPLoader.RETURN_TYPES == ("CLIP",)
    assert luna_nodes.LunaCheckpointTunnel.RETURN_TYPES == ("MODEL", "CLIP", "VAE")
    assert luna_nodes.LunaDaemonStatus.RETURN_TYPES == ("STRING", "BOOLEAN")
    changed = luna_nodes.LunaDaemonStatus.IS_CHANGED()
    assert math.isnan(changed)  # NaN != NaN: ComfyUI re-runs the node every time
    assert luna_nodes.LunaVAELoader.VALIDATE_INPUTS("tiny_vae.safetensors") is True
    assert "not in ComfyUI's vae folders" in luna_nodes.LunaVAELoader.VALIDATE_INPUTS("missing.safetensors")
    assert luna_nodes.LunaCLIPLoader.VALIDATE_INPUTS("clip_l.safetensors", "None") is True
    assert isinstance(luna_nodes.LunaCLIPLoader.VALIDATE_INPUTS("clip_l.safetensors", "nope.sft"), str)


# -------------------------------------------------------------------------------- VAE


def test_vae_stock_nodes_match_native(vae, native_vae, native):
    nodes = native.nodes
    assert isinstance(vae, DaemonVAE)
    pixels = torch.rand(2, 68, 100, 4, generator=torch.Generator().manual_seed(0))  # RGBA, not a multiple of 8
    keep = pixels.clone()
    with torch.inference_mode():
        pixels_inf = pixels.clone()  # an inference tensor, as ComfyUI hands it over
    latent = run(nodes.VAEEncode().encode, vae, pixels_inf)[0]
    ref_latent = run(nodes.VAEEncode().encode, native_vae, pixels_inf)[0]
    assert latent["samples"].shape == (2, 4, 8, 12) and close(latent["samples"], ref_latent["samples"])
    image = run(nodes.VAEDecode().decode, vae, ref_latent)[0]
    ref_image = run(nodes.VAEDecode().decode, native_vae, ref_latent)[0]
    assert image.shape == (2, 64, 96, 3) and close(image, ref_image)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # Tiled: the node's own clamping (overlap 48 > 64/4 -> 16) and compression calls, latent tiles.
    for tile, overlap in ((64, 16), (64, 48), (128, 32)):
        got = run(nodes.VAEDecodeTiled().decode, vae, ref_latent, tile, overlap, 64, 8)[0]
        ref = run(nodes.VAEDecodeTiled().decode, native_vae, ref_latent, tile, overlap, 64, 8)[0]
        assert close(got, ref), (tile, overlap)
    assert float((got - ref_image).abs().max()) > 1e-3  # really the three-pass tiled path
    for tile, overlap in ((64, 16), (128, 32)):
        got = run(nodes.VAEEncodeTiled().encode, vae, pixels_inf, tile, overlap, 64, 8)[0]["samples"]
        ref = run(nodes.VAEEncodeTiled().encode, native_vae, pixels_inf, tile, overlap, 64, 8)[0]["samples"]
        assert close(got, ref), (tile, overlap)
    assert torch.equal(pixels_inf, keep)  # the inference tensor was never written


def test_comfyui_cancel_abandons_the_daemon_call(vae, native, spy):
    # ComfyUI's cancel only sets a flag in the ComfyUI process; a proxy waiting on the
    # daemon polls it, like a sampler, instead of waiting for the answer.
    mm = native.comfy.model_management
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    decodes = spy.count("vae_decode")
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(native.nodes.VAEDecode().decode, vae, latent)
    finally:
        mm.interrupt_current_processing(False)
    assert spy.count("vae_decode") == decodes + 1  # the request was sent, then abandoned
    # The next prompt works (a fresh connection; the abandoned one was closed).
    assert run(native.nodes.VAEDecode().decode, vae, latent)[0].shape == (1, 64, 64, 3)


def test_vae_attributes_match_native(vae, native_vae):
    for name in ("latent_channels", "latent_dim", "output_channels", "downscale_ratio", "upscale_ratio",
                 "downscale_index_formula", "upscale_index_formula", "crop_input", "vae_dtype"):
        assert getattr(vae, name) == getattr(native_vae, name), name
    assert vae.spacial_compression_decode() == native_vae.spacial_compression_decode() == 8
    assert vae.spacial_compression_encode() == native_vae.spacial_compression_encode() == 8
    assert vae.temporal_compression_decode() is None and native_vae.temporal_compression_decode() is None
    assert vae.device == vae.output_device == CPU and vae.daemon_device == "cpu"
    assert vae.throw_exception_if_invalid() is None
    px = torch.rand(1, 68, 100, 3)
    assert torch.equal(vae.vae_encode_crop_pixels(px), native_vae.vae_encode_crop_pixels(px))
    latent = vae.encode_tiled(px, tile_x=64, tile_y=64, overlap=16)  # keyword names as ComfyUI's
    assert vae.decode_tiled(latent, tile_x=4, tile_y=4, overlap=1, tile_t=None, overlap_t=None).shape == (1, 64, 96, 3)


def test_video_ratio_lambdas_are_rebuilt_from_index_formulas():
    remote = type("R", (), {"info": {"latent_channels": 16, "latent_dim": 3, "downscale_index_formula": [4, 8, 8],
                                     "upscale_index_formula": [4, 8, 8], "temporal_compression_decode": 4,
                                     "downscale_ratio": [{"temporal": "encode", "factor": 4}, 8, 8],
                                     "upscale_ratio": [{"temporal": "decode", "factor": 4}, 8, 8]},
                            "what": "VAE video", "daemon_device": "cpu", "model_id": "vae-x"})()
    v = DaemonVAE(remote)
    assert v.downscale_index_formula == (4, 8, 8) and v.spacial_compression_encode() == 8
    assert v.downscale_ratio[0](81) == 21 and v.upscale_ratio[0](21) == 81 and v.temporal_compression_decode() == 4
    # Video VAEs run through the proxy: tests/test_comfy_families_vae.py.


def test_vae_unsupported_calls_say_so(vae):
    latent = torch.zeros(1, 4, 4, 4)
    with pytest.raises(DaemonUnsupported, match="vae_options"):  # options travel only as JSON scalars
        vae.decode(latent, vae_options={"num_chunks": [2]})
    with pytest.raises(DaemonUnsupported, match="Luna Daemon"):
        vae.get_sd()
    with pytest.raises(AttributeError, match="runs in the Luna Daemon"):
        vae.first_stage_model  # noqa: B018
    assert not hasattr(vae, "patcher")
    with pytest.raises(DaemonUnsupported, match="3-D to 5-D"):
        vae.encode(torch.zeros(8, 3))
    with pytest.raises(DaemonError, match="4-D pixel"):  # the daemon checks the rank against its VAE
        vae.encode(torch.zeros(8, 8, 3))


# ------------------------------------------------------------------------------- CLIP


def test_clip_text_encode_matches_native(clip, native_clip, native):
    assert isinstance(clip, DaemonCLIP) and clip.layer_idx is None
    for text in PROMPTS:
        tokens = run(clip.tokenize, text)
        assert same_tokens(tokens, run(native_clip.tokenize, text)), text
        same_cond(text_encode(native, clip, text), text_encode(native, native_clip, text))
    weighted = run(clip.tokenize, "a (masterpiece:1.2) photo")["l"][0]
    assert isinstance(weighted[1], tuple) and any(w == pytest.approx(1.2) for _, w in weighted)
    emb = [t for t, _ in run(clip.tokenize, "embedding:myemb a cat")["l"][0] if isinstance(t, torch.Tensor)]
    assert len(emb) == 2 and emb[0].shape == (32,)
    long = text_encode(native, clip, LONG_PROMPT)[0][0]
    assert long.shape[1] == 77 * len(run(clip.tokenize, LONG_PROMPT)["l"]) > 77
    with_ids = run(clip.tokenize, "a photo", return_word_ids=True)
    assert same_tokens(with_ids, run(native_clip.tokenize, "a photo", return_word_ids=True))


def test_clip_encode_variants_match_native(clip, native_clip, sdxl, native_sdxl):
    tokens = run(clip.tokenize, "a (photo:1.3) of a cat")
    cond = run(clip.encode_from_tokens, tokens)
    ref = run(native_clip.encode_from_tokens, tokens)
    assert close(cond, ref)
    got_c, got_p = run(clip.encode_from_tokens, tokens, return_pooled=True)
    ref_c, ref_p = run(native_clip.encode_from_tokens, tokens, return_pooled=True)
    assert close(got_c, ref_c) and close(got_p, ref_p)
    got = run(clip.encode_from_tokens, tokens, return_dict=True)
    assert sorted(got) == sorted(run(native_clip.encode_from_tokens, tokens, return_dict=True))
    assert close(run(clip.encode, "a cat"), run(native_clip.encode, "a cat"))
    # unprojected pooled output (GLIGEN), where the projection is not the identity: SDXL's G
    xt = run(sdxl.tokenize, "a cat")
    _, up = run(sdxl.encode_from_tokens, xt, return_pooled="unprojected")
    _, ref_up = run(native_sdxl.encode_from_tokens, xt, return_pooled="unprojected")
    _, proj = run(sdxl.encode_from_tokens, xt, return_pooled=True)
    assert close(up, ref_up) and not torch.equal(up, proj)
    sched = run(sdxl.encode_from_tokens_scheduled, xt, unprojected=True, add_dict={"guidance": 3.5})
    same_cond(sched, run(native_sdxl.encode_from_tokens_scheduled, xt, unprojected=True, add_dict={"guidance": 3.5}))


def test_clip_set_last_layer_then_encode_matches_native(clip, native_clip, native):
    penultimate = run(native.nodes.CLIPSetLastLayer().set_last_layer, clip, -2)[0]
    ref = run(native.nodes.CLIPSetLastLayer().set_last_layer, native_clip, -2)[0]
    assert isinstance(penultimate, DaemonCLIP) and penultimate is not clip and penultimate.layer_idx == -2
    assert clip.layer_idx is None  # the clone took the layer, the original did not
    for text in PROMPTS[:3]:
        same_cond(text_encode(native, penultimate, text), text_encode(native, ref, text))
    base = text_encode(native, clip, PROMPTS[0])[0][0]
    assert not torch.equal(text_encode(native, penultimate, PROMPTS[0])[0][0], base)
    same_cond(text_encode(native, clip, PROMPTS[0]), text_encode(native, native_clip, PROMPTS[0]))


def test_tokenizer_options_are_per_clone(clip, native_clip):
    padded, ref = clip.clone(), native_clip.clone()
    padded.set_tokenizer_option("clip_l_min_padding", 5)
    ref.set_tokenizer_option("clip_l_min_padding", 5)
    tokens = run(padded.tokenize, "a cat")
    assert len(tokens["l"][0]) == 82 and same_tokens(tokens, run(ref.tokenize, "a cat"))
    assert clip.tokenizer_options == {} and len(run(clip.tokenize, "a cat")["l"][0]) == 77
    # Per-call options are merged over the object's, as ComfyUI does.
    both = run(padded.tokenize, "a cat", tokenizer_options={"clip_l_min_padding": 2})
    assert len(both["l"][0]) == 79 and same_tokens(both, run(ref.tokenize, "a cat",
                                                            tokenizer_options={"clip_l_min_padding": 2}))


def test_clip_text_encode_sdxl_matches_native(sdxl, native_sdxl, native):
    args = (1024, 768, 16, 8, 1024, 768, "a photo of a cat", LONG_PROMPT)
    got = run(native.sdxl.CLIPTextEncodeSDXL.execute, sdxl, *args).args[0]
    ref = run(native.sdxl.CLIPTextEncodeSDXL.execute, native_sdxl, *args).args[0]
    same_cond(got, ref)
    assert got[0][1]["width"] == 1024 and got[0][1]["crop_w"] == 16 and got[0][0].shape[2] == 64
    got = run(native.sdxl.CLIPTextEncodeSDXLRefiner.execute, sdxl, 6.0, 1024, 1024, "a cat").args[0]
    same_cond(got, run(native.sdxl.CLIPTextEncodeSDXLRefiner.execute, native_sdxl, 6.0, 1024, 1024, "a cat").args[0])


def test_cond_stage_model_keys_feed_comfys_lora_key_map(clip, native_clip, native):
    sd = clip.cond_stage_model.state_dict()
    ref = native_clip.cond_stage_model.state_dict()
    assert list(sd) == list(ref)
    assert all(t.device.type == "meta" and t.shape == ref[k].shape and t.dtype == ref[k].dtype for k, t in sd.items())
    assert native.comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) == \
        native.comfy.lora.model_lora_keys_clip(native_clip.cond_stage_model, {})
    with pytest.raises(AttributeError, match="lives in the Luna Daemon"):
        clip.cond_stage_model.transformer  # noqa: B018


# ------------------------------------------------------------------------------- LoRA


def test_lora_loader_matches_native(clip, native_clip, native, spy, caplog):
    text = "a (photo:1.2) of a cat"
    base = text_encode(native, clip, text)
    with caplog.at_level(logging.WARNING):
        patched = lora(native, clip, "lora_a.safetensors", 0.8)
    assert not [r for r in caplog.records if "NOT LOADED" in r.getMessage()]
    ref = lora(native, native_clip, "lora_a.safetensors", 0.8)
    assert isinstance(patched, DaemonCLIP) and patched is not clip
    assert len(patched.loras) == 1 and patched.loras[0]["strength"] == 0.8
    got = text_encode(native, patched, text)
    same_cond(got, text_encode(native, ref, text))
    assert float((got[0][0] - base[0][0]).abs().max()) > 1e-3  # the LoRA changes the output

    # strength 0 = base; stacked loaders + CLIPSetLastLayer = native chain
    same_cond(text_encode(native, lora(native, clip, "lora_a.safetensors", 0.0), text), base)
    chained = run(native.nodes.CLIPSetLastLayer().set_last_layer, lora(native, patched, "lora_b.safetensors", -0.5),
                  -2)[0]
    ref_chained = run(native.nodes.CLIPSetLastLayer().set_last_layer,
                      lora(native, ref, "lora_b.safetensors", -0.5), -2)[0]
    assert len(chained.loras) == 2 and len(patched.loras) == 1
    same_cond(text_encode(native, chained, text), text_encode(native, ref_chained, text))

    # the original proxy is unchanged by the loaders that worked on clones
    assert clip.loras == [] and clip.layer_idx is None
    same_cond(text_encode(native, clip, text), base)
    same_cond(text_encode(native, clip, text), text_encode(native, native_clip, text))

    # The blob is uploaded only when the daemon lacks it (same LoRA again: lora_has only).
    puts = spy.count("lora_put")
    again = lora(native, clip, "lora_a.safetensors", 0.3)
    assert again.loras[0]["lora"] == patched.loras[0]["lora"]  # content-addressed: same patches, same id
    assert spy.count("lora_put") == puts
    same_cond(text_encode(native, again, text), text_encode(native, lora(native, native_clip, "lora_a.safetensors",
                                                                            0.3), text))


def test_add_patches_returns_the_accepted_keys(clip, native_clip, native, models):
    lora_sd = native.comfy.utils.load_torch_file(str(models / "loras" / "lora_a.safetensors"), safe_load=True)
    key_map = native.comfy.lora.model_lora_keys_clip(native_clip.cond_stage_model, {})
    loaded = native.comfy.lora.load_lora(lora_sd, key_map)
    unet_only = {"diffusion_model.input_blocks.0.0.weight": next(iter(loaded.values()))}
    mine, ref = clip.clone(), native_clip.clone()
    accepted = run(mine.add_patches, {**loaded, **unet_only}, 1.0)
    assert sorted(accepted) == sorted(run(ref.add_patches, {**loaded, **unet_only}, 1.0)) == sorted(loaded)
    assert mine.loras[0]["strength"] == 1.0 and clip.loras == []
    assert run(clip.clone().add_patches, unet_only, 1.0) == []
    for text in PROMPTS[1:3]:
        same_cond(text_encode(native, mine, text), text_encode(native, ref, text))


def test_diff_patches_are_exact(clip, native_clip, native):
    keys = clip.cond_stage_model.state_dict()
    g = torch.Generator().manual_seed(11)
    targets = ["clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight",
               "clip_l.transformer.text_model.encoder.layers.0.layer_norm1.weight"]
    patches = {k: ("diff", (torch.randn(keys[k].shape, generator=g).half() * 0.1,)) for k in targets}
    mine, ref = clip.clone(), native_clip.clone()
    assert sorted(run(mine.add_patches, patches, 0.7)) == sorted(run(ref.add_patches, patches, 0.7)) == sorted(targets)
    for text in PROMPTS[:2]:
        same_cond(text_encode(native, mine, text), text_encode(native, ref, text))
    assert not torch.equal(text_encode(native, mine, PROMPTS[0])[0][0], text_encode(native, clip, PROMPTS[0])[0][0])


def test_unsupported_patches_raise_clear_errors(clip, native):
    wa = native.comfy.weight_adapter
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    up, down = torch.randn(32, 4), torch.randn(4, 32)
    cases = {
        "DoRA": {key: wa.LoRAAdapter(set(), (up, down, 1.0, None, torch.ones(32), None))},
        "LoCon": {key: wa.LoRAAdapter(set(), (up, down, 1.0, torch.ones(4, 4), None, None))},
        "loha": {key: wa.LoHaAdapter(set(), (up, down))},
        "'set'": {key: ("set", (torch.zeros(32, 32),))},
        ".weight tensors only": {key[:-len("weight")] + "bias": ("diff", (torch.zeros(32),))},
    }
    for what, patches in cases.items():
        target = clip.clone()
        with pytest.raises(DaemonUnsupported) as err:
            run(target.add_patches, patches, 1.0)
        assert what in str(err.value) and "Luna Daemon" in str(err.value), what
        assert target.loras == []
    with pytest.raises(DaemonUnsupported, match="strength_model"):
        run(clip.clone().add_patches, {key: wa.LoRAAdapter(set(), (up, down, None, None, None, None))}, 1.0, 0.5)
    with pytest.raises(ValueError, match="does not match"):
        run(clip.clone().add_patches, {key: wa.LoRAAdapter(set(), (up[:, :3], down, None, None, None, None))}, 1.0)


def test_internals_and_hooks_raise_clear_errors(clip):
    with pytest.raises(AttributeError, match="no ModelPatcher"):
        clip.patcher  # noqa: B018
    for fn in (clip.load_model, clip.get_sd, clip.get_key_patches):
        with pytest.raises(DaemonUnsupported, match="Luna Daemon"):
            fn()
    c = clip.clone()
    with pytest.raises(DaemonUnsupported, match="hooks"):
        c.apply_hooks_to_conds = object()
    with pytest.raises(DaemonUnsupported, match="hooks"):
        c.use_clip_schedule = True
    c.apply_hooks_to_conds = None  # the default is fine
    assert c.use_clip_schedule is False
    with pytest.raises(AttributeError, match="tokenizer"):
        clip.tokenizer  # noqa: B018


def test_sdxl_lora_matches_native(sdxl, native_sdxl, native):
    args = (1024, 1024, 0, 0, 1024, 1024, "a photo of a cat", "a cat")
    mine, ref = lora(native, sdxl, "lora_xl.safetensors", 0.9), lora(native, native_sdxl, "lora_xl.safetensors", 0.9)
    got = run(native.sdxl.CLIPTextEncodeSDXL.execute, mine, *args).args[0]
    same_cond(got, run(native.sdxl.CLIPTextEncodeSDXL.execute, ref, *args).args[0])
    base = run(native.sdxl.CLIPTextEncodeSDXL.execute, sdxl, *args).args[0]
    assert not torch.equal(got[0][0], base[0][0])


def test_parallel_workflows_with_different_loras_do_not_interfere(clip, native):
    """Two prompt workers (threads) on clones of one daemon CLIP, each with its own LoRA stack."""
    stacks = {
        "a": lora(native, clip, "lora_a.safetensors", 1.0),
        "b": run(native.nodes.CLIPSetLastLayer().set_last_layer, lora(native, clip, "lora_b.safetensors", 0.7), -1)[0],
        "ab": lora(native, lora(native, clip, "lora_a.safetensors", -0.6), "lora_b.safetensors", 0.4),
        "base": clip,
    }
    texts = ["a photo of a cat", "a (dog:1.2) at night", LONG_PROMPT]
    solo = {(name, t): text_encode(native, c, t)[0][0] for name, c in stacks.items() for t in texts}
    for name in ("a", "b", "ab"):
        assert not torch.equal(solo[(name, texts[0])], solo[("base", texts[0])]), name
    barrier = threading.Barrier(len(stacks))
    failures: list[str] = []

    def worker(name: str) -> None:
        barrier.wait()
        for rep in range(5):
            t = texts[rep % len(texts)]
            if not torch.equal(text_encode(native, stacks[name], t)[0][0], solo[(name, t)]):
                failures.append(f"{name} {rep}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in stacks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not failures, failures


def test_proxy_recovers_after_the_daemon_lost_its_model_and_lora(clip, vae, native, conn, daemon, spy):
    """As after a daemon restart: the model is unloaded and the LoRA cache is empty."""
    patched = lora(native, clip, "lora_b.safetensors", 0.5)
    expected = text_encode(native, patched, "a cat")
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    image = run(vae.decode, latent)
    old_ids = (clip.model_id, vae.model_id)
    conn.client.call("unload", {"all": True})
    daemon.lora_cache.clear()
    same_cond(text_encode(native, patched, "a cat"), expected)  # re-registered and re-sent transparently
    assert close(run(vae.decode, latent), image)
    assert (clip.model_id, vae.model_id) == old_ids  # the same file gets the same id again
    # Only the LoRA cache lost (evicted): the blob is sent again, the model is not reloaded.
    daemon.lora_cache.clear()
    calls = len(spy.calls)
    same_cond(text_encode(native, patched, "a cat"), expected)
    assert [op for op, _ in spy.calls[calls:]] == ["clip_tokenize", "clip_encode", "lora_has", "lora_put",
                                                    "clip_encode"]


# ---------------------------------------------------------------------- checkpoint tunnel


def test_checkpoint_tunnel_replaces_clip_and_vae(native, native_clip, native_vae, daemon, conn, spy):
    model = object()
    uploads_before = (spy.count("vae_load_sd", uploads=True), spy.count("clip_load_sd", uploads=True))
    out_model, t_clip, t_vae = run(luna_nodes.LunaCheckpointTunnel().tunnel, model, native_clip, native_vae)
    assert out_model is model and isinstance(t_clip, DaemonCLIP) and isinstance(t_vae, DaemonVAE)
    for text in PROMPTS[:3]:
        same_cond(text_encode(native, t_clip, text), text_encode(native, native_clip, text))
    latent = {"samples": torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(4))}
    assert close(run(native.nodes.VAEDecode().decode, t_vae, latent)[0],
                 run(native.nodes.VAEDecode().decode, native_vae, latent)[0])
    # LoRA after the tunnel works like on the native CLIP.
    same_cond(text_encode(native, lora(native, t_clip, "lora_a.safetensors", 0.6), "a cat"),
              text_encode(native, lora(native, native_clip, "lora_a.safetensors", 0.6), "a cat"))
    # The same objects again: cached, nothing re-sent (one ping checks the daemon is there).
    calls = len(spy.calls)
    again = run(luna_nodes.LunaCheckpointTunnel().tunnel, model, native_clip, native_vae)
    assert again[2] is t_vae and again[1].model_id == t_clip.model_id and spy.calls[calls:] == [("ping", False)]

    # A second ComfyUI (own client, own objects loaded from the same files) shares the copy.
    with torch.inference_mode():
        other_clip = native.nodes.CLIPLoader().load_clip("clip_l.safetensors", type="stable_diffusion")[0]
        other_vae = native.comfy.sd.VAE(sd=native_vae.get_sd(), config=native_vae_config())
    second = SpyClient(*daemon.address, token=daemon.token, timeout=60)
    try:
        second_conn = connection.Connection(daemon.settings, second)
        c2, v2 = proxies.tunnel_clip(second_conn, other_clip), proxies.tunnel_vae(second_conn, other_vae)
        assert c2.model_id == t_clip.model_id and v2.model_id == t_vae.model_id
        assert second.count("clip_load_sd", uploads=True) == 0 and second.count("vae_load_sd", uploads=True) == 0
    finally:
        second.close()
    uploads = (spy.count("vae_load_sd", uploads=True), spy.count("clip_load_sd", uploads=True))
    assert uploads[0] - uploads_before[0] <= 1 and uploads[1] - uploads_before[1] <= 1


def native_vae_config() -> dict:
    return comfy_models.vae_config()


def test_checkpoint_tunnel_for_sdxl_and_passthrough(native, native_sdxl, conn):
    _, t_clip, none_vae = run(luna_nodes.LunaCheckpointTunnel().tunnel, None, native_sdxl, None)
    assert none_vae is None and t_clip._remote.info["model_class"] == "SDXLClipModel"
    args = (1024, 768, 0, 0, 1024, 768, "a photo of a cat", "a dog")
    same_cond(run(native.sdxl.CLIPTextEncodeSDXL.execute, t_clip, *args).args[0],
              run(native.sdxl.CLIPTextEncodeSDXL.execute, native_sdxl, *args).args[0])
    assert run(luna_nodes.LunaCheckpointTunnel().tunnel, None, t_clip, None)[1] is t_clip  # proxies pass through


def test_checkpoint_tunnel_uses_original_weights_of_a_patched_module(native, conn):
    """ComfyUI leaves LoRA weights patched into the shared module after an encode; the tunnel
    must register the original weights (from the patcher's backup)."""
    with torch.inference_mode():
        fresh = native.nodes.CLIPLoader().load_clip("clip_l.safetensors", type="stable_diffusion")[0]
    base = text_encode(native, fresh, "a cat")
    text_encode(native, lora(native, fresh, "lora_a.safetensors", 1.0), "a cat")  # module now patched in place
    with pytest.raises(DaemonUnsupported, match="after the tunnel"):
        proxies.tunnel_clip(conn, lora(native, fresh, "lora_a.safetensors", 1.0))
    t_clip = run(luna_nodes.LunaCheckpointTunnel().tunnel, None, fresh, None)[1]
    same_cond(text_encode(native, t_clip, "a cat"), base)


def test_checkpoint_loader_simple_through_the_tunnel(native, models, conn):
    """A real (SD1-layout) checkpoint from CheckpointLoaderSimple: SD-sized VAE, CLIP-L."""
    from safetensors.torch import save_file

    ckpt_dir = models / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    sd_cfg = {**comfy_models.VAE_DDCONFIG, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    tensors = {f"first_stage_model.{k}": v.half() for k, v in comfy_models.vae_ldm_state_dict(21, sd_cfg).items()}
    tensors.update({f"cond_stage_model.transformer.{k}": v.half() for k, v in
                    comfy_models.clip_text_state_dict(layers=2, seed=22, projection=False).items()})
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    save_file(tensors, str(ckpt_dir / "tiny_sd1.safetensors"))
    native.folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir))
    model, ck_clip, ck_vae = run(native.nodes.CheckpointLoaderSimple().load_checkpoint, "tiny_sd1.safetensors")
    out_model, t_clip, t_vae = run(luna_nodes.LunaCheckpointTunnel().tunnel, model, ck_clip, ck_vae)
    assert out_model is model
    for text in PROMPTS[1:3]:
        same_cond(text_encode(native, t_clip, text), text_encode(native, ck_clip, text))
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))}
    assert close(run(native.nodes.VAEDecode().decode, t_vae, latent)[0],
                 run(native.nodes.VAEDecode().decode, ck_vae, latent)[0])


# ---------------------------------------------------------------------- daemon down / status


@pytest.fixture()
def down_settings(tmp_path, models):
    return _settings(tmp_path / "home", models, port=free_port())


def test_daemon_down_loader_error_names_how_to_start_it(down_settings, native):
    with torch.inference_mode():
        fresh_clip = native.nodes.CLIPLoader().load_clip("clip_l.safetensors", type="stable_diffusion")[0]
    connection.configure(down_settings)
    try:
        for call in (lambda: luna_nodes.LunaVAELoader().load_vae("tiny_vae.safetensors"),
                     lambda: luna_nodes.LunaCLIPLoader().load_clip("clip_l.safetensors", "sd1"),
                     lambda: luna_nodes.LunaCheckpointTunnel().tunnel(None, fresh_clip, None)):
            with pytest.raises(DaemonUnavailable) as err:
                run(call)
            text = str(err.value)
            assert connection.START_HINT in text and str(down_settings.port) in text
            assert "start_tray_daemon.bat / .sh" in text and "luna-daemon serve" in text
        summary, running = run(luna_nodes.LunaDaemonStatus().status)["result"]
        assert running is False and connection.START_HINT in summary
    finally:
        connection.reset()


def test_daemon_down_during_a_proxy_call(models, native, tmp_path):
    d = Daemon(_settings(tmp_path / "home2", models))
    d.start()
    client = DaemonClient(*d.address, token=d.token, timeout=30)
    conn = connection.Connection(d.settings, client)
    try:
        clip = proxies.load_clip(conn, [str(models / "text_encoders" / "clip_l.safetensors")], "sd1")
        vae = proxies.load_vae(conn, str(models / "vae" / "tiny_vae.safetensors"))
        run(clip.tokenize, "a cat")
        d.stop(10)
        for call in (lambda: clip.tokenize("a cat"), lambda: vae.decode(torch.zeros(1, 4, 4, 4))):
            with pytest.raises(DaemonUnavailable, match="luna-daemon serve"):
                run(call)
    finally:
        client.close()
        d.stop(10)


def test_status_node_reports_a_running_daemon(conn, clip):
    out = run(luna_nodes.LunaDaemonStatus().status)
    summary, running = out["result"]
    assert running is True and out["ui"]["text"] == [summary]
    assert "running at" in summary and "engine comfy" in summary and "clip_l.safetensors" in summary


def test_comfy_fallback_local_loads_natively_with_a_warning(tmp_path, models, native, native_clip, native_vae, caplog):
    connection.configure(_settings(tmp_path / "home", models, port=free_port(), comfy_fallback="local"))
    try:
        with caplog.at_level(logging.WARNING, logger="luna_daemon.comfy"):
            vae = run(luna_nodes.LunaVAELoader().load_vae, "tiny_vae.safetensors")[0]
            clip = run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "sd1")[0]
            passthrough = run(luna_nodes.LunaCheckpointTunnel().tunnel, "m", native_clip, native_vae)
        assert isinstance(vae, native.comfy.sd.VAE) and isinstance(clip, native.comfy.sd.CLIP)
        assert passthrough == ("m", native_clip, native_vae)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("comfy_fallback = local" in w for w in warnings) == 3
        same_cond(text_encode(native, clip, PROMPTS[1]), text_encode(native, native_clip, PROMPTS[1]))
        latent = {"samples": torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(3))}
        assert close(run(native.nodes.VAEDecode().decode, vae, latent)[0],
                     run(native.nodes.VAEDecode().decode, native_vae, latent)[0])
    finally:
        connection.reset()


def test_forbidden_path_hint_names_the_setting_that_helps(conn, tmp_path, models, native):
    outside = comfy_models.write_vae(tmp_path / "elsewhere" / "v.safetensors")
    # This daemon already has comfyui_root = this ComfyUI's folder: only model_roots helps.
    with pytest.raises(DaemonError) as err:
        proxies.load_vae(conn, str(outside))
    message = err.value.message
    assert err.value.code == "forbidden_path" and "set comfyui_root" not in message, message
    assert f'add "{outside.parent}" to model_roots' in message and conn.settings.config_file in message
    # A daemon without comfyui_root: setting it to this ComfyUI's folder is the advice.
    d = Daemon(_settings(tmp_path / "home", models, comfyui_root="", engine="standalone"))
    d.start()
    client = DaemonClient(*d.address, token=d.token, timeout=30)
    try:
        with pytest.raises(DaemonError) as err:
            proxies.load_vae(connection.Connection(d.settings, client), str(outside))
        assert f'set comfyui_root = "{native.folder_paths.base_path}"' in err.value.message, err.value.message
        assert str(outside.parent) in err.value.message
    finally:
        client.close()
        d.stop(10)


def _write_config(home: Path, models: Path, **extra) -> dict:
    """A config.toml in ``home`` (LUNA_HOME) for a daemon process on free ports."""
    values = {"port": free_port(), "monitor_port": free_port(), "lock_port": free_port(), "engine": "comfy",
              "comfyui_root": str(FAKE_ROOT), "model_roots": [str(models)], **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]  # JSON strings/lists/bools are TOML too
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.toml").write_text("\n".join(lines) + "\n")
    return values


def _comfyui_env(monkeypatch, home: Path) -> None:
    """This process as a ComfyUI whose Luna settings live in ``home``; no display."""
    for key in [k for k in os.environ if k.startswith("LUNA_")] + ["DISPLAY", "WAYLAND_DISPLAY", "COMFYUI_PATH"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LUNA_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _stop_daemon_process(proc, settings) -> None:
    """Ask the daemon to stop (it unloads and exits); kill it if it does not within 30 s."""
    try:
        with contextlib.suppress(DaemonError, DaemonUnavailable), DaemonClient.from_settings(settings, timeout=10) as c:
            c.call("shutdown")  # (already gone: the wait below returns at once)
    finally:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def daemon_process(models, native, tmp_path_factory):
    """A real ``luna-daemon serve`` process (engine = comfy on the fake ComfyUI root): unlike
    the in-process daemon it does not share this ComfyUI's ``comfy.cli_args``."""
    home = tmp_path_factory.mktemp("process_home")
    _write_config(home, models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_") and k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(LUNA_HOME=str(home), HF_HUB_OFFLINE="1")
    settings = Settings.load(env={"LUNA_HOME": str(home)})
    with open(home / "serve.out", "wb") as out:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve", "--no-monitor"], env=env,
                                cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    client = DaemonClient.from_settings(settings, timeout=60)
    try:
        deadline = time.monotonic() + 120
        while not connection.Connection(settings, client).is_running():
            assert proc.poll() is None and time.monotonic() < deadline, (home / "serve.out").read_text()[-3000:]
            time.sleep(0.2)
        yield type("Proc", (), {"settings": settings, "client": client, "proc": proc})
    finally:
        client.close()
        _stop_daemon_process(proc, settings)


def test_comfyui_precision_flags_reach_the_daemon(daemon_process, native, models, monkeypatch):
    """ComfyUI started with --fp16-vae / --fp32-text-enc: the loaders send the dtypes this
    ComfyUI's model_management picks, so the daemon (its own process, no such flags) computes
    what the native loaders do; a dtype chosen on the node still wins."""
    monkeypatch.setattr(native.comfy.cli_args.args, "fp16_vae", True)
    monkeypatch.setattr(native.comfy.cli_args.args, "fp32_text_enc", True)
    conn = connection.configure(daemon_process.settings, daemon_process.client)
    try:
        config = json.loads((models / "vae" / "tiny_vae.json").read_text())
        with torch.inference_mode():
            sd = native.comfy.utils.load_torch_file(str(models / "vae" / "tiny_vae.safetensors"))
            ref_vae = native.comfy.sd.VAE(sd=sd, config=config)
            ref_clip = native.nodes.CLIPLoader().load_clip("clip_l.safetensors", type="stable_diffusion")[0]
        vae = run(luna_nodes.LunaVAELoader().load_vae, "tiny_vae.safetensors")[0]
        assert ref_vae.vae_dtype == vae.vae_dtype == torch.float16
        latent = {"samples": torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(11))}
        want = run(native.nodes.VAEDecode().decode, ref_vae, latent)[0]
        assert close(run(native.nodes.VAEDecode().decode, vae, latent)[0], want)
        tunnelled = run(proxies.tunnel_vae, conn, ref_vae)  # the checkpoint path sends the VAE's dtype too
        assert close(run(native.nodes.VAEDecode().decode, tunnelled, latent)[0], want)
        clip = run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "sd1")[0]
        weights = clip.cond_stage_model.state_dict()
        assert weights["clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float32
        same_cond(text_encode(native, clip, PROMPTS[1]), text_encode(native, ref_clip, PROMPTS[1]))
        explicit = run(luna_nodes.LunaVAELoader().load_vae, "tiny_vae.safetensors", dtype="fp32")[0]
        assert explicit.vae_dtype == torch.float32
    finally:
        connection.reset()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the started process from /proc")
def test_start_daemon_if_missing_starts_comfyuis_python_and_waits(tmp_path, models, native, monkeypatch, caplog):
    """start_daemon_if_missing: the daemon is started with this interpreter (not a launcher
    venv), detached, and the first call waits for it with progress lines, then succeeds."""
    home = tmp_path / "home"
    _write_config(home, models, engine="auto", start_daemon_if_missing=True)
    _comfyui_env(monkeypatch, home)
    monkeypatch.setattr(connection, "PROGRESS_EVERY_S", 0.2)  # a start takes seconds: several lines
    settings = Settings.load()
    command = connection.launch_command(settings)
    assert command[:4] == [sys.executable, "-m", "luna_daemon", "serve"], command  # no display: serve
    conn = connection.configure(settings)
    proc = None
    try:
        with caplog.at_level(logging.INFO, logger="luna_daemon.comfy"):
            vae = run(luna_nodes.LunaVAELoader().load_vae, "tiny_vae.safetensors")[0]
            proc = conn.launched
            run(luna_nodes.LunaVAELoader().load_vae, "tiny_vae.safetensors")  # running now: no second start
        assert isinstance(vae, DaemonVAE) and proc is not None and conn.launched is proc
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[0].decode() == sys.executable and b"serve" in argv
        assert os.getsid(proc.pid) == proc.pid  # its own session: outlives this ComfyUI
        assert os.path.realpath(f"/proc/{proc.pid}/fd/0") == os.devnull
        assert conn.client.call("status")["engine"] == "comfy"  # ComfyUI's packages: the comfy engine
        messages = [r.getMessage() for r in caplog.records if r.name == "luna_daemon.comfy"]
        assert sum("was not running" in m for m in messages) == 1, messages
        assert any(m.startswith("waiting for Luna Daemon") for m in messages), messages
        assert any(m.startswith("Luna Daemon is up") for m in messages), messages
    finally:
        connection.reset()
        if proc is not None:
            _stop_daemon_process(proc, settings)


# ------------------------------------------------------------------------------ benchmark


def test_proxy_overhead_benchmark_smoke():
    from luna_daemon.comfy_nodes.bench import proxy_overhead_benchmark

    report = proxy_overhead_benchmark(repeats=3, decode_size=64, comfyui_root=str(FAKE_ROOT))
    assert report["lines"] and all(isinstance(line, str) for line in report["lines"])
    assert {"clip_encode", "vae_decode", "flux_encode", "video_vae_decode"} <= set(report["results"])  # the fake's small T5
    for result in report["results"].values():
        assert result["proxy_ms"] > 0 and result["in_process_ms"] > 0 and result["max_abs_diff"] <= 1e-5
    assert report["ok"]


# ------------------------------------------- zero-config folders, ComfyUI's warnings (issue 12)


@contextlib.contextmanager
def comfyui_only_folders(native, base: Path, *kinds: str):
    """``base/<kind>`` folders that only this ComfyUI knows (as extra_model_paths.yaml adds
    them); removed from folder_paths afterwards."""
    added = []
    for kind in kinds:
        folder = base / kind
        folder.mkdir(parents=True, exist_ok=True)
        native.folder_paths.add_model_folder_path(kind, str(folder))
        added.append((native.folder_paths.map_legacy(kind), str(folder)))
    try:
        yield {kind: base / kind for kind in kinds}
    finally:
        for kind, folder in added:
            native.folder_paths.folder_names_and_paths[kind][0].remove(folder)
            native.folder_paths.filename_list_cache.pop(kind, None)


def test_comfyui_only_folders_and_embeddings_work_without_config(daemon_process, native, tmp_path):
    """A VAE and an embedding in folders only this ComfyUI knows: the nodes register this
    ComfyUI's folders on first use, so the VAE loads (no forbidden_path), the embedding
    gives the native cond, and status / ps name where each root came from."""
    settings = daemon_process.settings
    with comfyui_only_folders(native, tmp_path / "extra", "vae", "embeddings") as extra:
        comfy_models.write_vae(extra["vae"] / "extra_vae.safetensors", seed=21)
        comfy_models.write_embedding(extra["embeddings"] / "onlycomfy.safetensors", vectors=3, seed=22)
        conn = connection.configure(settings, daemon_process.client)
        try:
            vae = run(luna_nodes.LunaVAELoader().load_vae, "extra_vae.safetensors")[0]
            assert isinstance(vae, DaemonVAE)
            clip = run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "sd1")[0]
            prompt = "embedding:onlycomfy a photo of a cat"
            tokens = run(clip.tokenize, prompt)["l"][0]
            assert sum(isinstance(t, torch.Tensor) for t, *_ in tokens) == 3  # the embedding's vectors
            # ComfyUI's CLIPLoader copies the embedding folders at load: a CLIP loaded now sees the new one.
            ref = run(native.nodes.CLIPLoader().load_clip, "clip_l.safetensors", type="stable_diffusion")[0]
            same_cond(text_encode(native, clip, prompt), text_encode(native, ref, prompt))

            status = conn.call("status")
            mine = {r["path"]: r for r in status["roots"] if r["source"] != "settings"}
            for kind, folder in extra.items():
                row = mine[os.path.realpath(folder)]
                assert kind in row["kinds"] and f"pid {os.getpid()}" in row["source"], row
                assert native.folder_paths.base_path in row["source"], row
            assert any(r["source"] == "settings" for r in status["roots"])
            env = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_")}
            env["LUNA_HOME"] = str(Path(settings.config_dir).parent)
            out = subprocess.run([sys.executable, "-m", "luna_daemon", "ps"], env=env, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            assert os.path.realpath(extra["vae"]) in out.stdout and f"pid {os.getpid()})" in out.stdout, out.stdout
        finally:
            connection.reset()


def test_comfyuis_warnings_reach_the_daemon_log_and_this_comfyui(daemon_process, native, caplog):
    """ComfyUI's own "embedding:... does not exist" warning, logged inside the daemon,
    lands in luna-daemon.log and comes back to this ComfyUI, which logs it at WARNING."""
    connection.configure(daemon_process.settings, daemon_process.client)
    try:
        clip = run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "sd1")[0]
        with caplog.at_level(logging.WARNING, logger="luna_daemon.client"):
            run(clip.tokenize, "embedding:no_such_embedding a cat")
        here = [r.getMessage() for r in caplog.records if r.name == "luna_daemon.client" and r.levelno == logging.WARNING]
        assert any("embedding:no_such_embedding does not exist" in m and "clip_tokenize" in m for m in here), here
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="luna_daemon.client"):
            run(clip.tokenize, "a cat")  # nothing went wrong: nothing comes back
        assert not [r for r in caplog.records if r.name == "luna_daemon.client"]
    finally:
        connection.reset()
    log_file = Path(daemon_process.settings.log_file)
    deadline = time.monotonic() + 10
    while "embedding:no_such_embedding does not exist" not in log_file.read_text():
        assert time.monotonic() < deadline, log_file.read_text()[-3000:]
        time.sleep(0.1)


def test_register_roots_refuses_broad_missing_and_too_many(tmp_path, models, caplog):
    from luna_daemon.models.registry import MAX_CLIENT_ROOTS

    d = Daemon(_settings(tmp_path / "home", models, comfyui_root="", engine="standalone"))
    d.start()
    client = DaemonClient(*d.address, token=d.token, timeout=30)
    try:
        home = str(Path.home())
        with caplog.at_level(logging.WARNING, logger="luna_daemon.client"):
            answer = client.call("register_roots", {"folders": {"vae": ["/", home, str(tmp_path / "missing")],
                                                                "loras": [str(models / "loras")]}})
        assert answer["added"] == [] and len(answer["refused"]) == 3, answer  # models/loras: inside a root already
        reasons = " ".join(r["reason"] for r in answer["refused"])
        assert "filesystem root" in reasons and "home folder" in reasons and "not an existing folder" in reasons
        sent_back = [r.getMessage() for r in caplog.records if r.name == "luna_daemon.client"]
        assert len(sent_back) == 3 and all("not added as a model root" in m for m in sent_back), sent_back
        folders = []
        for i in range(MAX_CLIENT_ROOTS + 6):
            folders.append(tmp_path / "many" / f"f{i}")
            folders[-1].mkdir(parents=True)
        first = client.call("register_roots", {"folders": {"vae": [str(f) for f in folders[:40]]}})
        second = client.call("register_roots", {"folders": {"vae": [str(f) for f in folders[40:]]}})
        assert len(first["added"]) == 40 and len(second["added"]) == MAX_CLIENT_ROOTS - 40
        assert len(second["refused"]) == 6 and "already keeps" in second["refused"][0]["reason"]
        assert len([r for r in client.call("ps")["roots"] if r["source"] != "settings"]) == MAX_CLIENT_ROOTS
        from luna_daemon.web import views  # the dashboard's Models page lists them too

        shown = views.status(type("Host", (), {"daemon": d, "settings": d.settings})())["roots"]
        assert {r["path"] for r in shown} >= {os.path.realpath(f) for f in folders[:MAX_CLIENT_ROOTS]}
        assert all("via" in r["source"] for r in shown if r["source"] != "settings")
        for bad in ({"folders": {"nope": ["/x"]}}, {"folders": {"vae": "/x"}}, {"folders": []},
                    {"folders": {"vae": [str(f) for f in folders[:65]]}}):
            with pytest.raises(DaemonError) as err:
                client.call("register_roots", bad)
            assert err.value.code == "bad_args", err.value
        with pytest.raises(DaemonError) as err:
            DaemonClient(*d.address, token="wrong", timeout=10).call("register_roots", {"folders": {}})
        assert err.value.code == "unauthorized"
        assert client.call("ping")["pong"] is True
    finally:
        client.close()
        d.stop(10)
