"""Text-encoder families through the Luna nodes, against the fake ComfyUI (tests/fake_comfy).

Contract per family: the stock node run on the Luna proxy equals the stock node run on the
native object ComfyUI builds (max |diff| <= 1e-5, fp32, CPU; in practice bit-identical), with
small random models in the real key layouts (the T5-XXL has the real d_model 4096 and 24
blocks, ComfyUI's detection looks at both, but a tiny feed-forward and attention).

Families: SD3 (Luna Triple CLIP Loader = TripleCLIPLoader, CLIPTextEncodeSD3 with empty
streams), Flux (Luna Dual CLIP Loader, CLIPTextEncodeFlux), Chroma (T5-XXL only, no pooled
output), Qwen-Image, Wan (umT5-XXL), Lumina2 (Gemma 2, CLIPTextEncodeLumina2); the loaders'
type lists and arities; token dicts passing through unchanged; bad tokens as typed errors; the
``instance`` input; the Checkpoint Tunnel for each family's CLIP (split into the standalone
files ``load_clip`` reads, rebuilt as the same class) and its typed refusals.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_models
from safetensors.torch import save_file

from luna_daemon.client import DaemonClient, DaemonError
from luna_daemon.comfy_nodes import bench, connection
from luna_daemon.comfy_nodes import nodes as luna_nodes
from luna_daemon.daemon import Daemon

FAKE_ROOT = comfy_models.FAKE_COMFY_ROOT
TOL = 1e-5


def run(fn, *args, **kwargs):
    """Run like ComfyUI's prompt worker: inside inference mode."""
    with torch.inference_mode():
        return fn(*args, **kwargs)


def same_cond(got: list, ref: list) -> None:
    """Two CONDITIONING lists are equal: tensors within TOL (same shape, dtype), same extras."""
    assert len(got) == len(ref)
    for (cond, extra), (ref_cond, ref_extra) in zip(got, ref):
        assert cond.shape == ref_cond.shape and cond.dtype == ref_cond.dtype, (cond.shape, ref_cond.shape)
        assert float((cond - ref_cond).abs().max()) <= TOL
        assert sorted(extra) == sorted(ref_extra)
        for key, value in ref_extra.items():
            if isinstance(value, torch.Tensor):
                assert extra[key].shape == value.shape and extra[key].dtype == value.dtype, key
                assert float((extra[key].float() - value.float()).abs().max()) <= TOL, key
            else:
                assert extra[key] == value, key


def same_outcome(proxy_fn, native_fn, *args, **kwargs):
    """Run both; equal CONDITIONING, or the proxy raises a typed model_error carrying the
    native exception's message. Returns the proxy's result (None after an error)."""
    try:
        want = run(native_fn, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever ComfyUI raises natively
        with pytest.raises(DaemonError) as err:
            run(proxy_fn, *args, **kwargs)
        assert err.value.code == "model_error" and str(exc) in err.value.message, (exc, err.value)
        return None
    got = run(proxy_fn, *args, **kwargs)
    same_cond(got, want)
    return got


def same_tokens(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tokens(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tokens(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _isolate():
    with comfy_models.fake_comfy_isolated():
        yield
        connection.reset()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("te_models")
    te = root / "text_encoders"
    comfy_models.write_clip_l(te / "clip_l.safetensors", seed=3)
    comfy_models.write_clip_g(te / "clip_g.safetensors", seed=4)
    config = bench.t5_config(FAKE_ROOT)
    save_file(bench.t5_state_dict(config, seed=11), str(te / "t5xxl.safetensors"))
    (root / "embeddings").mkdir()
    return root


@pytest.fixture(scope="module")
def native(models):
    comfy = comfy_models.import_fake_comfy()
    import folder_paths
    import nodes
    from comfy_extras import nodes_flux, nodes_hidream, nodes_sd3

    for kind in ("text_encoders", "embeddings"):
        folder_paths.add_model_folder_path(kind, str(models / kind))
    return type("Native", (), {"comfy": comfy, "nodes": nodes, "sd3": nodes_sd3, "flux": nodes_flux,
                               "hidream": nodes_hidream, "folder_paths": folder_paths})


@pytest.fixture(scope="module")
def daemon(models, native, tmp_path_factory):
    d = Daemon(comfy_models.comfy_engine_settings(tmp_path_factory.mktemp("home"), models))
    d.start()
    yield d
    d.stop(10)


@pytest.fixture(scope="module")
def client(daemon):
    c = DaemonClient(*daemon.address, token=daemon.token, timeout=120)
    yield c
    c.close()


@pytest.fixture()
def conn(daemon, client):
    yield connection.configure(daemon.settings, client)


@pytest.fixture(scope="module")
def native_sd3(native):
    return run(native.sd3.TripleCLIPLoader.execute, "clip_l.safetensors", "clip_g.safetensors",
               "t5xxl.safetensors").result[0]


@pytest.fixture(scope="module")
def native_flux(native):
    return run(native.nodes.DualCLIPLoader().load_clip, "clip_l.safetensors", "t5xxl.safetensors", "flux")[0]


def text_encode(native, clip, text):
    return run(native.nodes.CLIPTextEncode().encode, clip, text)[0]


# ------------------------------------------------------------------------ loader nodes


def test_loaders_offer_every_stock_type_and_arity(native):
    stock_single = native.nodes.CLIPLoader.INPUT_TYPES()["required"]
    stock_dual = native.nodes.DualCLIPLoader.INPUT_TYPES()["required"]
    single = luna_nodes.LunaCLIPLoader.INPUT_TYPES()
    dual = luna_nodes.LunaDualCLIPLoader.INPUT_TYPES()
    triple = luna_nodes.LunaTripleCLIPLoader.INPUT_TYPES()
    quad = luna_nodes.LunaQuadrupleCLIPLoader.INPUT_TYPES()
    assert set(stock_single["type"][0]) <= set(single["required"]["type"][0])
    assert set(stock_dual["type"][0]) <= set(single["required"]["type"][0])  # clip_name2 makes it a dual loader
    assert dual["required"]["type"][0] == stock_dual["type"][0]
    files = stock_single["clip_name"][0]
    assert "t5xxl.safetensors" in files
    assert single["required"]["clip_name1"][0] == files
    for spec, count in ((dual, 2), (triple, 3), (quad, 4)):
        names = [k for k in spec["required"] if k.startswith("clip_name")]
        assert names == [f"clip_name{i}" for i in range(1, count + 1)]
        assert all(spec["required"][n][0] == files for n in names)
    stock_triple = native.sd3.TripleCLIPLoader.define_schema().inputs
    stock_quad = native.hidream.QuadrupleCLIPLoader.define_schema().inputs
    assert [i.id for i in stock_triple] == list(triple["required"])
    assert [i.id for i in stock_quad] == list(quad["required"])
    for cls in (luna_nodes.LunaVAELoader, luna_nodes.LunaCLIPLoader, luna_nodes.LunaDualCLIPLoader,
                luna_nodes.LunaTripleCLIPLoader, luna_nodes.LunaQuadrupleCLIPLoader, luna_nodes.LunaCheckpointTunnel):
        kind, options = cls.INPUT_TYPES()["optional"]["instance"]
        assert kind == "STRING" and options["default"] == "auto", cls
    assert luna_nodes.LunaTripleCLIPLoader.VALIDATE_INPUTS("clip_l.safetensors", "clip_g.safetensors",
                                                           "t5xxl.safetensors") is True
    assert "not in ComfyUI's text_encoders folders" in luna_nodes.LunaQuadrupleCLIPLoader.VALIDATE_INPUTS(
        "clip_l.safetensors", "clip_g.safetensors", "t5xxl.safetensors", "llama.safetensors")


def test_instance_input_picks_one_connection_per_value(conn):
    assert connection.get_connection("auto") is conn and connection.get_connection("") is conn
    assert connection.get_connection(" AUTO ") is conn
    assert luna_nodes.LunaCLIPLoader.VALIDATE_INPUTS("clip_l.safetensors", instance="auto") is True
    bad = luna_nodes.LunaCLIPLoader.VALIDATE_INPUTS("clip_l.safetensors", instance="no such/instance")
    assert isinstance(bad, str) and "instance" in bad
    with pytest.raises(DaemonError) as err:
        run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "sd1", instance="no such/instance")
    assert err.value.code == "bad_args" and "[[instances]]" in err.value.message
    try:
        named = connection.get_connection("clip")
        assert named is connection.get_connection("clip") and named is not conn
        assert named.instance == "clip" and conn.instance == "auto"
        assert named.settings is conn.settings  # the injected settings carry over
        assert named.client.instance == "clip" and named.client is not conn.client
    finally:
        connection.configure(conn.settings, conn.client)  # the named connection's client is closed


# --------------------------------------------------------------------------------- SD3


@pytest.fixture()
def sd3(conn):
    return run(luna_nodes.LunaTripleCLIPLoader().load_clip, "clip_l.safetensors", "clip_g.safetensors",
               "t5xxl.safetensors")[0]


SD3_CASES = [  # clip_l, clip_g, t5xxl, empty_padding
    ("a cat", "a (red:1.2) cat", "a cat on a mat", "none"),
    ("a cat", "a cat", "", "none"),  # the issue: empty T5 stream -> [1, 78, 4096]
    ("", "", "a cat", "none"),  # no CLIP streams: T5 only
    ("", "", "", "none"),  # nothing at all: T5's empty sequence, one token
    ("a cat", "", "", "empty_prompt"),
    (" ".join(["a red cat"] * 30), "a cat", "", "none"),  # l longer than g: g padded with empty chunks
]


def test_sd3_triple_loader_and_clip_text_encode_sd3_match_native(native, sd3, native_sd3):
    info = sd3._remote.info
    assert info["tokenizer_keys"] == ["g", "l", "t5xxl"] and info["clip_type"] == "sd3"
    assert same_tokens(run(sd3.tokenize, "a (red:1.2) cat"), run(native_sd3.tokenize, "a (red:1.2) cat"))
    encode = native.sd3.CLIPTextEncodeSD3.execute
    shapes = []
    for case in SD3_CASES:
        got = run(encode, sd3, *case).result[0]
        ref = run(encode, native_sd3, *case).result[0]
        same_cond(got, ref)
        shapes.append(tuple(got[0][0].shape))
    assert shapes[1] == (1, 78, 4096) and shapes[3] == (1, 1, 4096)
    same_cond(text_encode(native, sd3, "a photo of a cat"), text_encode(native, native_sd3, "a photo of a cat"))


def test_sd3_subsets_by_file_count_and_type(native, conn):
    """Two files with type sd3 (and one file): the SD3 encoder with the given parts only."""
    for files in (["clip_l.safetensors", "t5xxl.safetensors"], ["clip_g.safetensors"]):
        proxy = run(luna_nodes.LunaCLIPLoader().load_clip, files[0], "sd3", *files[1:])[0]
        ref = run(native.nodes.DualCLIPLoader().load_clip, *files, "sd3")[0] if len(files) == 2 else \
            run(native.nodes.CLIPLoader().load_clip, files[0], "sd3")[0]
        for case in SD3_CASES[:3]:
            same_cond(run(native.sd3.CLIPTextEncodeSD3.execute, proxy, *case).result[0],
                      run(native.sd3.CLIPTextEncodeSD3.execute, ref, *case).result[0])


# -------------------------------------------------------------------------------- Flux


@pytest.fixture()
def flux(conn):
    return run(luna_nodes.LunaDualCLIPLoader().load_clip, "clip_l.safetensors", "t5xxl.safetensors", "flux")[0]


def test_flux_dual_loader_and_clip_text_encode_flux_match_native(native, flux, native_flux):
    assert flux._remote.info["tokenizer_keys"] == ["l", "t5xxl"]
    for clip_l, t5, guidance in (("a cat", "a (red:1.3) cat on a mat", 3.5), ("", "", 0.0), ("a cat", "", 10.0)):
        got = run(native.flux.CLIPTextEncodeFlux.execute, flux, clip_l, t5, guidance).result[0]
        ref = run(native.flux.CLIPTextEncodeFlux.execute, native_flux, clip_l, t5, guidance).result[0]
        same_cond(got, ref)
        assert got[0][1]["guidance"] == guidance and got[0][0].shape == (1, 256, 4096)
    same_cond(text_encode(native, flux, "a photo of a cat"), text_encode(native, native_flux, "a photo of a cat"))
    # The same files through the single loader with clip_name2 are the same model.
    again = run(luna_nodes.LunaCLIPLoader().load_clip, "clip_l.safetensors", "flux", "t5xxl.safetensors")[0]
    assert again.model_id == flux.model_id


def test_token_dicts_pass_through_unchanged(native, flux, native_flux):
    """Empty chunk lists, word ids, keys the encoder does not read, tuple chunks: the proxy's
    encode sees exactly what a native encode sees."""
    tokens = run(native_flux.tokenize, "a (red:1.2) cat", return_word_ids=True)
    assert same_tokens(run(flux.tokenize, "a (red:1.2) cat", return_word_ids=True), tokens)
    plain = run(native_flux.tokenize, "a red cat")
    variants = [
        tokens,
        {**tokens, "t5xxl": []},
        {**tokens, "l": []},
        {**tokens, "unused_stream": [[(1, 1.0)]], "note": "kept"},
        {"l": tuple(tuple(c) for c in tokens["l"]), "t5xxl": tokens["t5xxl"]},
        # an image dict CLIP-L has no use for: ComfyUI drops it (unweighted tokens, so no empty
        # sequence of the longer length is encoded beside them)
        {**plain, "l": [[plain["l"][0][0], ({"type": "image", "data": torch.rand(1, 8, 8, 3)}, 1.0),
                         *plain["l"][0][1:]]]},
    ]
    outcomes = []
    for variant in variants:
        got = same_outcome(flux.encode_from_tokens_scheduled, native_flux.encode_from_tokens_scheduled, variant,
                           add_dict={"guidance": 2.0})
        outcomes.append(got is not None)
    # An empty CLIP-L stream fails in ComfyUI itself (2 tokens vs the 77-position table);
    # the daemon answers that error, typed; everything else encodes.
    assert outcomes == [True, True, False, True, True, True]


def test_tokenizer_options_and_kwargs_travel(native, flux, native_flux):
    """Per-stream tokenizer options (``t5xxl_min_length``) set on the clone and passed per
    call, and keyword arguments the tokenizer takes (``disable_weights``)."""
    proxy, ref = flux.clone(), native_flux.clone()
    for c in (proxy, ref):
        c.set_tokenizer_option("t5xxl_min_length", 8)
    text = "a (red:1.5) cat"
    assert same_tokens(run(proxy.tokenize, text), run(ref.tokenize, text))
    assert len(run(proxy.tokenize, text)["t5xxl"][0]) == 8 and len(run(flux.tokenize, text)["t5xxl"][0]) == 256
    opts = {"tokenizer_options": {"t5xxl_min_padding": 3}, "disable_weights": True}
    got, want = run(proxy.tokenize, text, **opts), run(ref.tokenize, text, **opts)
    assert same_tokens(got, want)
    same_cond(run(proxy.encode_from_tokens_scheduled, got), run(ref.encode_from_tokens_scheduled, want))
    assert flux.tokenizer_options == {}  # the clone's options stay on the clone


def test_tokenize_images_travel_to_the_daemon(native, flux, native_flux):
    """Images passed to ``clip.tokenize`` (TextEncodeQwenImageEdit's ``images=[...]``) reach
    the daemon's tokenizer as tensors; a tokenizer that does not use them gives native's tokens."""
    image = torch.rand(1, 24, 20, 4)[:, :, :, :3]  # a strided view, as the stock node passes it
    got = run(flux.tokenize, "a cat", images=[image], llama_template="{}")
    assert same_tokens(got, run(native_flux.tokenize, "a cat", images=[image], llama_template="{}"))


def test_bad_tokens_are_typed_errors_and_the_daemon_keeps_serving(native, flux, client):
    mid = flux.model_id
    bad = [
        ({"l": "not chunks", "t5xxl": []}, "bad_args"),
        ({"l": [[("a", 1.0)]], "t5xxl": []}, "bad_args"),
        ({"l": [[(1, "heavy")]], "t5xxl": []}, "bad_args"),
        ({"l": [[(1.5, 1.0)]], "t5xxl": []}, "bad_args"),
        ({"l": [[1, 2, 3]], "t5xxl": []}, "bad_args"),
        ({"t5xxl": []}, "bad_args"),  # the l stream missing
        ({"l": [[(10 ** 9, 1.0)]], "t5xxl": []}, "model_error"),  # well-formed; ComfyUI's embedding lookup fails
    ]
    for tokens, code in bad:
        with pytest.raises(DaemonError) as err:
            client.call("clip_encode", {"model": mid, "tokens": tokens})
        assert err.value.code == code, (tokens, err.value.code, err.value.message)
    with pytest.raises(DaemonError) as err:
        client.call("clip_encode", {"model": mid, "tokens": {}})
    assert err.value.code == "bad_args"
    same_cond(text_encode(native, flux, "a cat"), text_encode(native, flux, "a cat"))  # still serving


# ---------------------------------------------------------------------- Chroma, HiDream


def test_chroma_t5_only_matches_native(native, conn):
    proxy = run(luna_nodes.LunaCLIPLoader().load_clip, "t5xxl.safetensors", "chroma")[0]
    ref = run(native.nodes.CLIPLoader().load_clip, "t5xxl.safetensors", "chroma")[0]
    for text in ("a photo of a (red:1.2) cat", ""):
        got, want = text_encode(native, proxy, text), text_encode(native, ref, text)
        same_cond(got, want)
        assert got[0][1]["pooled_output"] is None


def test_quadruple_loader_sends_four_files_like_quadruple_clip_loader(native, conn):
    """Four files reach ComfyUI's loader, which picks HiDream from the count; the fake comfy
    has no HiDream encoder (Llama 3.1 8B), so both sides fail the same way, typed."""
    names = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl.safetensors", "clip_l.safetensors")
    with pytest.raises(NotImplementedError) as native_err:
        run(native.hidream.QuadrupleCLIPLoader.execute, *names)
    with pytest.raises(DaemonError) as err:
        run(luna_nodes.LunaQuadrupleCLIPLoader().load_clip, *names)
    assert err.value.code == "model_error" and str(native_err.value) in err.value.message


# -------------------------------------------------------------------------- Qwen-Image


def qwen_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the layout of a Qwen2.5-VL 7B text encoder file (the fake's tiny sizes;
    k_proj.bias has 512 entries, which is how ComfyUI recognises the 7B model)."""
    from comfy.text_encoders.llama import QWEN25_7B_TINY as cfg

    g = torch.Generator().manual_seed(seed)
    h, inter, attn = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * cfg["head_dim"]

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).half()

    sd = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h, std=1.0), "model.norm.weight": 1 + rnd(h, std=0.1),
          "visual.patch_embed.proj.weight": rnd(h, 3, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v"):
            sd[f"{p}self_attn.{name}_proj.weight"] = rnd(attn, h, std=h ** -0.5)
            sd[f"{p}self_attn.{name}_proj.bias"] = rnd(attn, std=0.1)
        sd[f"{p}self_attn.o_proj.weight"] = rnd(h, attn, std=attn ** -0.5)
        sd[f"{p}mlp.gate_proj.weight"] = rnd(inter, h, std=h ** -0.5)
        sd[f"{p}mlp.up_proj.weight"] = rnd(inter, h, std=h ** -0.5)
        sd[f"{p}mlp.down_proj.weight"] = rnd(h, inter, std=inter ** -0.5)
        sd[f"{p}input_layernorm.weight"] = 1 + rnd(h, std=0.1)
        sd[f"{p}post_attention_layernorm.weight"] = 1 + rnd(h, std=0.1)
    return sd


@pytest.fixture(scope="module")
def qwen_file(native, models) -> str:
    save_file(qwen_state_dict(seed=21), str(models / "text_encoders" / "qwen_2.5_vl_7b.safetensors"))
    return "qwen_2.5_vl_7b.safetensors"


def test_qwen_image_edit_images_travel_both_ways(native, conn, qwen_file):
    """TextEncodeQwenImageEdit: the image goes into ``clip.tokenize(images=[...])``, comes
    back inside the tokens as ``{"type": "image", "data": tensor}`` and is encoded by the
    daemon's model; the ``attention_mask`` extra (int64) travels too."""
    from comfy_extras import nodes_qwen

    proxy = run(luna_nodes.LunaCLIPLoader().load_clip, qwen_file, "qwen_image")[0]
    ref = run(native.nodes.CLIPLoader().load_clip, qwen_file, "qwen_image")[0]
    image = torch.rand(1, 48, 64, 4)
    for img in (image, None):
        got = run(nodes_qwen.TextEncodeQwenImageEdit.execute, proxy, "make the cat red", image=img).result[0]
        want = run(nodes_qwen.TextEncodeQwenImageEdit.execute, ref, "make the cat red", image=img).result[0]
        same_cond(got, want)
    small = image[:, :16, :16, :3]
    tokens = run(proxy.tokenize, "make it red", images=[small])
    assert same_tokens(tokens, run(ref.tokenize, "make it red", images=[small]))
    images = [item[0] for item in tokens["qwen25_7b"][0] if isinstance(item[0], dict)]
    assert len(images) == 1 and images[0]["type"] == "image" and torch.equal(images[0]["data"], small)
    with_image = run(proxy.encode_from_tokens_scheduled, tokens)
    without = run(proxy.encode_from_tokens_scheduled, run(proxy.tokenize, "make it red"))
    assert with_image[0][0].shape[1] != without[0][0].shape[1]  # the image's embeddings are in the cond
    padded, padded_ref = proxy.clone(), ref.clone()
    for c in (padded, padded_ref):
        c.set_tokenizer_option("qwen25_7b_min_length", 120)
    got = text_encode(native, padded, "a cat")
    same_cond(got, text_encode(native, padded_ref, "a cat"))
    mask = got[0][1]["attention_mask"]
    assert mask.dtype == torch.int64 and mask.shape[1] == got[0][0].shape[1] and int(mask.min()) == 0


# -------------------------------------------------------------------- Checkpoint Tunnel
# A checkpoint's CLIP is the same class load_clip builds from the standalone files (SD3:
# SD3ClipModel_, Flux: FluxClipModel_, Chroma: PixArtTEModel_, ...), so the natives below
# stand for CheckpointLoaderSimple's output (the fake checkpoint loader knows SD1 only).


def tunnel(clip):
    return run(luna_nodes.LunaCheckpointTunnel().tunnel, None, clip, None)[1]


def test_tunnel_sd3_clip_matches_native(native, conn, native_sd3):
    t_clip = tunnel(native_sd3)
    info = t_clip._remote.info
    assert info["clip_type"] == "sd3" and info["model_class"] == type(native_sd3.cond_stage_model).__name__
    assert info["tokenizer_keys"] == ["g", "l", "t5xxl"]
    assert same_tokens(run(t_clip.tokenize, "a (red:1.2) cat"), run(native_sd3.tokenize, "a (red:1.2) cat"))
    for case in SD3_CASES:
        same_cond(run(native.sd3.CLIPTextEncodeSD3.execute, t_clip, *case).result[0],
                  run(native.sd3.CLIPTextEncodeSD3.execute, native_sd3, *case).result[0])
    same_cond(text_encode(native, t_clip, "a photo of a cat"), text_encode(native, native_sd3, "a photo of a cat"))
    assert tunnel(t_clip) is t_clip  # a proxy passes through


@pytest.mark.parametrize("files", [("clip_l.safetensors", "clip_g.safetensors"),  # sd3_medium_incl_clips
                                   ("clip_l.safetensors", "t5xxl.safetensors"), ("t5xxl.safetensors",)])
def test_tunnel_sd3_subsets_stay_sd3(native, conn, files):
    """An SD3 CLIP with CLIP-L + CLIP-G only has SDXL's sub-model names: the tunnel must
    rebuild SD3's encoder (4096-wide cond), not SDXL's, nor Flux's for L + T5."""
    loader = native.nodes.DualCLIPLoader().load_clip if len(files) == 2 else native.nodes.CLIPLoader().load_clip
    ref = run(loader, *files, "sd3")[0]
    t_clip = tunnel(ref)
    assert t_clip._remote.info["clip_type"] == "sd3"
    assert t_clip._remote.info["model_class"] == type(ref.cond_stage_model).__name__
    for case in SD3_CASES[:3]:
        same_cond(run(native.sd3.CLIPTextEncodeSD3.execute, t_clip, *case).result[0],
                  run(native.sd3.CLIPTextEncodeSD3.execute, ref, *case).result[0])


def test_tunnel_flux_and_chroma_clips_match_native(native, conn, native_flux):
    t_flux = tunnel(native_flux)
    assert t_flux._remote.info["clip_type"] == "flux" and t_flux._remote.info["model_class"] == "FluxClipModel_"
    for clip_l, t5, guidance in (("a cat", "a (red:1.3) cat on a mat", 3.5), ("", "", 0.0)):
        same_cond(run(native.flux.CLIPTextEncodeFlux.execute, t_flux, clip_l, t5, guidance).result[0],
                  run(native.flux.CLIPTextEncodeFlux.execute, native_flux, clip_l, t5, guidance).result[0])
    chroma = run(native.nodes.CLIPLoader().load_clip, "t5xxl.safetensors", "chroma")[0]
    t_chroma = tunnel(chroma)
    assert t_chroma._remote.info["model_class"] == "PixArtTEModel_"
    for text in ("a photo of a (red:1.2) cat", ""):
        got = text_encode(native, t_chroma, text)
        same_cond(got, text_encode(native, chroma, text))
        assert got[0][1]["pooled_output"] is None


def test_tunnel_qwen_image_clip_matches_native(native, conn, qwen_file):
    ref = run(native.nodes.CLIPLoader().load_clip, qwen_file, "qwen_image")[0]
    t_clip = tunnel(ref)
    assert t_clip._remote.info["clip_type"] == "qwen_image"
    same_cond(text_encode(native, t_clip, "a red cat"), text_encode(native, ref, "a red cat"))


def _upload(conn, sd, **hint):
    from luna_daemon.comfy_nodes import proxies

    blob, sha = proxies._state_blob(sd)
    return proxies._register(conn, "clip_load_sd", blob, sha, hint)


def test_tunnel_refusals_are_typed_and_name_the_cause(native, conn, client):
    """What cannot be rebuilt from files is bad_args naming it; one stored upload serves
    each class hint; the daemon keeps serving."""
    chroma = run(native.nodes.CLIPLoader().load_clip, "t5xxl.safetensors", "chroma")[0]
    t5_only = chroma.cond_stage_model.state_dict()
    with pytest.raises(DaemonError, match="fit several ComfyUI CLIP types") as err:
        _upload(conn, t5_only)  # no class hint: Chroma, SD3, Mochi, LTXV all have just t5xxl
    assert err.value.code == "bad_args"
    with pytest.raises(DaemonError, match="expected clip_l\\+t5xxl") as err:
        _upload(conn, t5_only, model_class="FluxClipModel_", tokenizer_class="FluxTokenizer")
    assert err.value.code == "bad_args"
    with pytest.raises(DaemonError, match="HiDreamTEModel_") as err:
        _upload(conn, t5_only, model_class="HiDreamTEModel_", tokenizer_class="HiDreamTokenizer")
    with pytest.raises(DaemonError, match="model_class must be") as err:
        _upload(conn, t5_only, model_class=["x"])
    # The same stored upload, two hints: two CLIP types (per call, not per upload).
    assert _upload(conn, t5_only, model_class="PixArtTEModel_", tokenizer_class="PixArtTokenizer")["clip_type"] == "chroma"
    assert _upload(conn, t5_only, model_class="SD3ClipModel_", tokenizer_class="SD3Tokenizer")["clip_type"] == "sd3"
    # A sub-model ComfyUI's file loaders do not know (here: grafted on a fresh CLIP).
    odd = run(native.nodes.CLIPLoader().load_clip, "t5xxl.safetensors", "chroma")[0]
    odd.cond_stage_model.add_module("mt5xl", torch.nn.Linear(2, 2))
    with pytest.raises(DaemonError, match="mt5xl.bias") as err:
        tunnel(odd)
    assert err.value.code == "bad_args" and "Luna CLIP loader" in err.value.message
    assert client.ping()["pong"] is True


def test_split_puts_tokenizer_data_into_the_one_encoders_file():
    """Wan (umT5-XXL) and Lumina2 (Gemma 2) CLIPs carry their SentencePiece model as
    ``spiece_model`` in ``get_sd()``; ComfyUI's loader reads it from the encoder's file."""
    from luna_daemon.models.engines.base import EngineError
    from luna_daemon.models.engines.comfy import split_clip_state_dict

    spiece = torch.arange(16, dtype=torch.uint8)
    weight = torch.ones(4, 4)
    clip_type, parts = split_clip_state_dict(
        {"umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight": weight, "umt5xxl.logit_scale": torch.ones(()),
         "spiece_model": spiece}, "WanTEModel", "WanT5Tokenizer")
    assert clip_type == "wan" and [n for n, _ in parts] == ["umt5xxl"]
    assert sorted(parts[0][1]) == ["encoder.block.0.layer.0.SelfAttention.k.weight", "spiece_model"]
    assert parts[0][1]["spiece_model"] is spiece
    clip_type, parts = split_clip_state_dict({"gemma2_2b.transformer.model.norm.weight": weight, "spiece_model": spiece},
                                             "LuminaTEModel_", "LuminaTokenizer")
    assert clip_type == "lumina2" and sorted(parts[0][1]) == ["model.norm.weight", "spiece_model"]
    with pytest.raises(EngineError, match="tokenizer data") as err:
        split_clip_state_dict({"clip_l.transformer.text_model.x": weight, "llama.transformer.model.x": weight,
                               "spiece_model": spiece}, "HunyuanVideoClipModel_", "HunyuanVideoTokenizer")
    assert err.value.code == "bad_args"
    _, parts = split_clip_state_dict({"clip_l.transformer.text_model.x": weight, "llama.transformer.model.x": weight},
                                     "HunyuanVideoClipModel_", "HunyuanVideoTokenizer")
    assert [n for n, _ in parts] == ["clip_l", "llama"]


# ----------------------------------------------------------------------- Wan, Lumina2


def random_te_file(path: Path, model, seed: int) -> str:
    """A text-encoder file in the layout of ``model`` (names and shapes from the fake's own
    module, built on the meta device; seeded values) plus a ``spiece_model`` (the stand-in
    SentencePiece model ComfyUI's Wan / Lumina2 loaders read from the file)."""
    from comfy.text_encoders.spiece_tokenizer import make_model

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, meta in model.state_dict().items():
        if not key.startswith("transformer."):
            continue  # logit_scale: not in a standalone file
        shape = tuple(meta.shape)
        if len(shape) == 1:
            value = 1 + 0.05 * torch.randn(shape, generator=g)
        elif "shared" in key or "embed_tokens" in key or "relative_attention_bias" in key:
            value = torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) * shape[-1] ** -0.5
        sd[key[len("transformer."):]] = value.half()
    sd["spiece_model"] = torch.frombuffer(bytearray(make_model()), dtype=torch.uint8)
    save_file(sd, str(path))
    return path.name


@pytest.fixture(scope="module")
def wan_file(native, models) -> str:
    from comfy.text_encoders import wan

    return random_te_file(models / "text_encoders" / "umt5_xxl.safetensors",
                          wan.UMT5XXlModel(device="meta", dtype=torch.float16), seed=31)


@pytest.fixture(scope="module")
def lumina_file(native, models) -> str:
    from comfy.text_encoders import lumina2

    return random_te_file(models / "text_encoders" / "gemma_2_2b.safetensors",
                          lumina2.Gemma2_2BModel(device="meta", dtype=torch.float16), seed=32)


def test_wan_umt5_matches_native_and_through_the_tunnel(native, conn, wan_file):
    """Wan: CLIPLoader type wan; cond [1, 512, 4096] with the padded positions zeroed, no pooled
    output; the tokenizer comes from the file's spiece_model, in the daemon as here."""
    proxy = run(luna_nodes.LunaCLIPLoader().load_clip, wan_file, "wan")[0]
    ref = run(native.nodes.CLIPLoader().load_clip, wan_file, "wan")[0]
    assert type(ref.cond_stage_model).__name__ == "WanTEModel" and proxy._remote.info["tokenizer_keys"] == ["umt5xxl"]
    tokens = run(ref.tokenize, "a (red:1.2) cat")
    assert same_tokens(run(proxy.tokenize, "a (red:1.2) cat"), tokens) and len(tokens["umt5xxl"][0]) == 512
    for text in ("a photo of a (red:1.2) cat", ""):
        got = text_encode(native, proxy, text)
        same_cond(got, text_encode(native, ref, text))
        cond = got[0][0]
        assert cond.shape == (1, 512, 4096) and got[0][1]["pooled_output"] is None
        assert float(cond[0, -1].abs().max()) == 0.0  # padding zeroed (zero_out_masked)
    t_clip = tunnel(ref)
    assert t_clip._remote.info["clip_type"] == "wan" and t_clip._remote.info["model_class"] == "WanTEModel"
    same_cond(text_encode(native, t_clip, "a red cat"), text_encode(native, ref, "a red cat"))


def test_lumina2_gemma_matches_native_and_through_the_tunnel(native, conn, lumina_file):
    """Lumina2: CLIPTextEncodeLumina2 with each system prompt; start token 2, no padding, the
    attention_mask extra (int64), no pooled output."""
    from comfy_extras import nodes_lumina2

    encode = nodes_lumina2.CLIPTextEncodeLumina2.execute
    proxy = run(luna_nodes.LunaCLIPLoader().load_clip, lumina_file, "lumina2")[0]
    ref = run(native.nodes.CLIPLoader().load_clip, lumina_file, "lumina2")[0]
    assert type(ref.cond_stage_model).__name__ == "LuminaTEModel_"
    tokens = run(ref.tokenize, "a cat")
    assert same_tokens(run(proxy.tokenize, "a cat"), tokens) and tokens["gemma2_2b"][0][0][0] == 2
    t_clip = tunnel(ref)
    assert t_clip._remote.info["clip_type"] == "lumina2"
    for system in ("superior", "alignment"):
        for user in ("a photo of a (red:1.2) cat", ""):
            want = run(encode, ref, user, system).result[0]
            got = run(encode, proxy, user, system).result[0]
            same_cond(got, want)
            same_cond(run(encode, t_clip, user, system).result[0], want)
            mask = got[0][1]["attention_mask"]
            assert mask.dtype == torch.int64 and mask.shape[1] == got[0][0].shape[1] and got[0][1]["pooled_output"] is None
    with pytest.raises(RuntimeError, match="clip input is invalid"):
        run(encode, None, "a cat", "superior")
