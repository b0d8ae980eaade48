"""Tests of the standalone engine on tiny real-architecture models (offline, CPU, fast)."""

from __future__ import annotations

import copy
import json
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from luna_daemon.models.engines.base import EngineError, LoraSpec, TiledArgs
from luna_daemon.models.engines.standalone import (
    StandaloneClip,
    StandaloneEngine,
    StandaloneVae,
)
from luna_daemon.models.engines.tiling import (
    tile_starts,
    tiled_map,
    tiled_map_three_pass,
)
from luna_daemon.models.tiny import (
    BOS_ID,
    EOS_ID,
    big_vae_shape,
    make_big_vae,
    make_tiny_clip,
    make_tiny_vae,
)

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine() -> StandaloneEngine:
    return StandaloneEngine()


@pytest.fixture(scope="module")
def vae_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return make_tiny_vae(root / "folder"), make_tiny_vae(root / "file", layout="file")


@pytest.fixture(scope="module")
def vae(engine, vae_paths) -> StandaloneVae:
    return engine.load_vae([str(vae_paths[0])], CPU, None)


@pytest.fixture(scope="module")
def clip_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {
        "l_folder": make_tiny_clip(root / "l_folder", kind="l"),
        "l_file": make_tiny_clip(root / "l_file", kind="l", layout="file"),
        "g_folder": make_tiny_clip(root / "g_folder", kind="g", seed=1),
        "g_file": make_tiny_clip(root / "g_file", kind="g", layout="file", seed=1),
    }


@pytest.fixture(scope="module")
def clip(engine, clip_paths) -> StandaloneClip:
    return engine.load_clip([str(clip_paths["l_folder"])], "sd1", CPU, None)


@pytest.fixture(scope="module")
def sdxl(engine, clip_paths) -> StandaloneClip:
    return engine.load_clip([str(clip_paths["l_folder"]), str(clip_paths["g_folder"])], "sdxl", CPU, None)


def reference_clip(folder, projected=False):
    """The same weights in a plain transformers model, loaded independently of the engine."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_json_file(str(folder / "config.json"))
    model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(config).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


def ids_of(tokens, key="l"):
    return torch.tensor([[t[0] for t in chunk] for chunk in tokens[key]])


def random_lora(clip_model: StandaloneClip, sha: str, seed: int, rank: int = 2, keys=None) -> LoraSpec:
    gen = torch.Generator().manual_seed(seed)
    encoders = clip_model._encoders
    weights = {}
    for target in keys or clip_model.patchable_keys():
        enc_key, _, name = target.rpartition(":")
        enc = encoders[enc_key or "l"]
        out_dim, in_dim = enc.params[enc.patchable[name]].shape
        up = torch.randn(out_dim, rank, generator=gen) * 0.3
        down = torch.randn(rank, in_dim, generator=gen) * 0.3
        weights[target] = (up, down, 0.5)
    return LoraSpec(sha256=sha, strength=1.0, weights=weights)


# --------------------------------------------------------------------------------- VAE


def test_vae_folder_and_file_give_identical_outputs(engine, vae_paths):
    folder_vae = engine.load_vae([str(vae_paths[0])], CPU, None)
    file_vae = engine.load_vae([str(vae_paths[1])], CPU, None)
    pixels = torch.rand(1, 32, 40, 3, generator=torch.Generator().manual_seed(0))
    latent = folder_vae.encode(pixels)
    assert torch.equal(latent, file_vae.encode(pixels))
    assert torch.equal(folder_vae.decode(latent), file_vae.decode(latent))
    assert folder_vae.info() == file_vae.info()


def test_vae_encode_decode_shapes_and_ranges(vae):
    pixels = torch.rand(2, 68, 100, 3)
    latent = vae.encode(pixels)
    assert latent.shape == (2, 4, 8, 12)
    assert latent.dtype == torch.float32 and latent.device.type == "cpu"
    image = vae.decode(latent)
    assert image.shape == (2, 64, 96, 3)
    assert image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_vae_encode_crops_centre_and_drops_alpha(vae):
    pixels = torch.rand(1, 68, 100, 4)
    # 68 % 8 = 4 and 100 % 8 = 4: two rows/columns are cut on each side.
    expected = vae.encode(pixels[:, 2:66, 2:98, :3].contiguous())
    assert torch.equal(vae.encode(pixels), expected)


def test_vae_matches_diffusers_reference_without_scaling(vae, vae_paths):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(str(vae_paths[0]), local_files_only=True).eval()
    assert ref.config.scaling_factor != 1.0  # the engine must ignore it
    pixels = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = pixels.movedim(-1, 1) * 2 - 1
        mean = ref.encode(x).latent_dist.mean
        image = ((ref.decode(mean).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    latent = vae.encode(pixels)
    assert torch.allclose(latent, mean, atol=1e-5)
    assert torch.equal(latent, vae.encode(pixels))  # deterministic: the mode, not a sample
    assert torch.allclose(vae.decode(latent), image, atol=1e-5)


def test_vae_info_and_nbytes(vae):
    info = vae.info()
    json.dumps(info)
    assert info == {
        "latent_channels": 4, "downscale_ratio": 8, "upscale_ratio": 8, "latent_dim": 2,
        "output_channels": 3, "downscale_index_formula": None, "upscale_index_formula": None,
    }
    params = sum(p.numel() for p in vae._module.parameters())
    assert vae.nbytes() == params * 4


def _smooth_latent(h=32, w=32):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return (torch.tensor([0.3, -0.2, 0.1, 0.5]).view(1, 4, 1, 1) + 0.05 * torch.stack([yy, xx, yy, xx])[None])


def test_vae_tiled_decode_shape_and_closeness(vae):
    latent = _smooth_latent()
    plain = vae.decode(latent)
    tiled = vae.decode(latent, TiledArgs(tile_x=16, tile_y=16, overlap=8))
    assert tiled.shape == plain.shape == (1, 256, 256, 3)
    assert tiled.min() >= 0 and tiled.max() <= 1
    # Random weights amplify the padding seams of every tile (GroupNorm statistics, zero
    # padding), so only the bulk of the image can be expected to agree.
    assert (tiled - plain).abs().mean() < 0.15
    # Tiles that cover the whole latent in all three passes reproduce the plain decode.
    covering = vae.decode(latent, TiledArgs(tile_x=64, tile_y=64, overlap=16))
    assert torch.allclose(covering, plain, atol=1e-6)


def test_vae_tiled_encode_shape_and_defaults(vae):
    pixels = torch.rand(1, 72, 136, 3)
    plain = vae.encode(pixels)
    tiled = vae.encode(pixels, TiledArgs(tile_x=64, tile_y=64, overlap=16))
    assert tiled.shape == plain.shape == (1, 4, 9, 17)
    assert torch.isfinite(tiled).all()
    # The ComfyUI default (512 px) covers this image: identical to the plain encode.
    assert torch.allclose(vae.encode(pixels, TiledArgs(512, 512, 64)), plain, atol=1e-6)


def test_vae_bad_inputs(vae):
    with pytest.raises(EngineError) as err:
        vae.decode(torch.zeros(1, 3, 8, 8))
    assert err.value.code == "bad_args"
    with pytest.raises(EngineError) as err:
        vae.encode(torch.zeros(1, 4, 4, 3))
    assert err.value.code == "bad_args"
    with pytest.raises(EngineError) as err:
        vae.encode(torch.zeros(1, 16, 16))
    assert err.value.code == "bad_args"


def test_vae_release_is_idempotent(engine, vae_paths):
    model = engine.load_vae([str(vae_paths[1])], CPU, None)
    model.release()
    model.release()
    assert model.nbytes() == 0
    with pytest.raises(EngineError) as err:
        model.decode(torch.zeros(1, 4, 2, 2))
    assert err.value.code == "model_error"


def test_vae_sidecar_norm_groups(engine, tmp_path):
    path = make_tiny_vae(tmp_path, layout="file", block_out_channels=(16, 16, 32, 32), norm_num_groups=8)
    model = engine.load_vae([str(path)], CPU, None)
    assert model.decode(torch.zeros(1, 4, 2, 2)).shape == (1, 16, 16, 3)
    (tmp_path / "tiny_vae.json").unlink()
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(path)], CPU, None)
    assert err.value.code == "model_error" and "norm_num_groups" in err.value.message


def test_vae_legacy_attention_names_load(engine, vae_paths, tmp_path):
    state = load_file(str(vae_paths[1]))
    legacy = {}
    for key, value in state.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, old)
        legacy[key] = value
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    latent = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    a = engine.load_vae([str(vae_paths[1])], CPU, None).decode(latent)
    b = engine.load_vae([str(tmp_path / "legacy.safetensors")], CPU, None).decode(latent)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name, content, code",
    [
        ("missing.safetensors", None, "not_found"),
        ("model.ckpt", b"not really a pickle", "model_error"),
        ("model.pt", b"x", "model_error"),
        ("weights.onnx", b"x", "model_error"),
        ("garbage.safetensors", b"this is not a safetensors file", "model_error"),
    ],
)
def test_vae_bad_paths(engine, tmp_path, name, content, code):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(path)], CPU, None)
    assert err.value.code == code
    assert name in err.value.message


def test_vae_unknown_and_ldm_layouts_are_refused(engine, tmp_path):
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(tmp_path / "unknown.safetensors")], CPU, None)
    assert err.value.code == "model_error" and "AutoencoderKL" in err.value.message
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2)}, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(tmp_path / "ldm.safetensors")], CPU, None)
    assert err.value.code == "model_error" and "LDM" in err.value.message
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(tmp_path / "a"), str(tmp_path / "b")], CPU, None)
    assert err.value.code == "bad_args"


# ------------------------------------------------------------------------------ tiling


def test_tile_starts_cover_and_end_at_border():
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    starts = tile_starts(41, 16, 4)
    assert starts[-1] + 16 == 41 and starts[0] == 0


def test_tiled_map_pointwise_is_exact():
    x = torch.randn(2, 3, 37, 53)
    fn = lambda t: torch.tanh(t) * 2
    out = tiled_map(fn, x, tile_h=8, tile_w=12, overlap=3, scale=1)
    assert torch.allclose(out, fn(x), atol=1e-6)
    out3 = tiled_map_three_pass(fn, x, tile_x=12, tile_y=8, overlap=3, scale=1)
    assert torch.allclose(out3, fn(x), atol=1e-6)


def test_tiled_map_scaling_is_exact():
    x = torch.randn(1, 2, 16, 24)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=4, mode="nearest")
    assert torch.allclose(tiled_map(up, x, tile_h=8, tile_w=8, overlap=2, scale=4), up(x), atol=1e-6)
    big = up(x)
    down = lambda t: torch.nn.functional.avg_pool2d(t, 4)
    out = tiled_map_three_pass(down, big, tile_x=32, tile_y=16, overlap=8, scale=0.25, align=4)
    assert torch.allclose(out, x, atol=1e-5)


def test_tiled_map_blending_beats_hard_seams():
    x = torch.rand(1, 1, 64, 64)
    blur = lambda t: torch.nn.functional.avg_pool2d(t, 5, stride=1, padding=2, count_include_pad=False)
    exact = blur(x)
    hard = tiled_map(blur, x, tile_h=16, tile_w=16, overlap=0, scale=1)
    soft = tiled_map(blur, x, tile_h=16, tile_w=16, overlap=8, scale=1)
    assert (soft - exact).abs().mean() < (hard - exact).abs().mean()


# -------------------------------------------------------------------------------- CLIP


def test_tokenize_chunks(clip):
    tokens = clip.tokenize("a photo of a cat")
    assert list(tokens) == ["l"]
    (chunk,) = tokens["l"]
    assert len(chunk) == 77
    assert all(isinstance(t, tuple) and t[1] == 1.0 for t in chunk)
    ids = [t[0] for t in chunk]
    assert ids[0] == BOS_ID and ids[6] == EOS_ID
    assert ids[1:6] == [ids[1], ids[2], ids[3], ids[1], ids[5]]  # "a" twice, one token per word
    assert all(i == EOS_ID for i in ids[6:])  # CLIP-L pads with the end token
    assert [t[0] for t in clip.tokenize("")["l"][0][:3]] == [BOS_ID, EOS_ID, EOS_ID]


def test_tokenize_long_prompt_and_word_boundaries(clip):
    tokens = clip.tokenize(" ".join(["cat"] * 100))
    chunks = tokens["l"]
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert [t[0] for t in chunks[0]][76] == EOS_ID and chunks[1][0][0] == BOS_ID
    assert sum(1 for t in chunks[0] + chunks[1] if t[0] not in (BOS_ID, EOS_ID)) == 100
    # "xyz" is 3 tokens: after 74 words it does not fit in the 1 remaining slot and moves whole.
    moved = clip.tokenize(" ".join(["cat"] * 74) + " xyz", return_word_ids=True)["l"]
    assert len(moved) == 2
    assert [t[2] for t in moved[0][1:76]] == list(range(1, 75)) + [0]
    assert [t[2] for t in moved[1][1:4]] == [75, 75, 75]


def test_encode_long_prompt_shape_and_pooled_from_first_chunk(clip):
    tokens = clip.tokenize(" ".join(["cat", "dog"] * 50))
    out = clip.encode(tokens)
    assert out["cond"].shape == (1, 154, 32) and out["cond"].dtype == torch.float32
    assert out["pooled_output"].shape == (1, 32)
    first = clip.encode({"l": tokens["l"][:1]})
    assert torch.allclose(out["pooled_output"], first["pooled_output"], atol=1e-6)
    assert torch.allclose(out["cond"][:, :77], first["cond"], atol=1e-6)


def test_encode_matches_transformers_reference(clip, clip_paths):
    ref = reference_clip(clip_paths["l_folder"])
    tokens = clip.tokenize("a photo of a cat")
    with torch.no_grad():
        expected = ref(ids_of(tokens), output_hidden_states=True)
    last = clip.encode(tokens)
    assert torch.allclose(last["cond"], expected.last_hidden_state, atol=1e-5)
    assert torch.allclose(last["pooled_output"], expected.pooler_output, atol=1e-5)
    assert torch.equal(clip.encode(tokens, layer=-1)["cond"], last["cond"])
    penultimate = clip.encode(tokens, layer=-2)
    assert not torch.allclose(penultimate["cond"], last["cond"])
    with torch.no_grad():
        manual = ref.final_layer_norm(expected.hidden_states[-2])
    assert torch.allclose(penultimate["cond"], manual, atol=1e-5)
    assert torch.allclose(penultimate["pooled_output"], last["pooled_output"], atol=1e-6)


def test_layer_out_of_range(clip):
    tokens = clip.tokenize("a cat")
    for bad in (-3, 2, 1.5, True):
        with pytest.raises(EngineError) as err:
            clip.encode(tokens, layer=bad)
        assert err.value.code == "bad_args"


def test_token_weights_follow_comfy_formula(clip, clip_paths):
    ref = reference_clip(clip_paths["l_folder"])
    tokens = clip.tokenize("a photo of a cat")
    chunk = list(tokens["l"][0])
    chunk[2] = (chunk[2][0], 1.2)
    chunk[5] = (chunk[5][0], 0.5)
    weighted = clip.encode({"l": [chunk]})
    weights = torch.ones(1, 77, 1)
    weights[0, 2], weights[0, 5] = 1.2, 0.5
    empty = torch.tensor([[BOS_ID, EOS_ID] + [EOS_ID] * 75])
    with torch.no_grad():
        z = ref(ids_of(tokens)).last_hidden_state
        z_empty = ref(empty).last_hidden_state
    expected = torch.where(weights != 1, z_empty + (z - z_empty) * weights, z)
    assert torch.allclose(weighted["cond"], expected, atol=1e-5)
    plain = clip.encode(tokens)
    assert not torch.allclose(weighted["cond"][:, 2], plain["cond"][:, 2])
    assert torch.allclose(weighted["cond"][:, 3], plain["cond"][:, 3], atol=1e-5)


def test_bad_tokens(clip):
    for tokens in ({}, {"l": []}, {"l": [[(1.5, 1.0)] * 77]}, {"l": [[(10**6, 1.0)] * 77]},
                   {"l": [[(1, 1.0)] * 78]}, {"l": [[(1, 1.0)] * 77, [(1, 1.0)] * 10]}):
        with pytest.raises(EngineError) as err:
            clip.encode(tokens)
        assert err.value.code == "bad_args"


def test_single_file_clip_key_layouts(engine, clip, clip_paths, tmp_path):
    tokens = clip.tokenize("a photo of a dog")
    expected = clip.encode(tokens)
    from_file = engine.load_clip([str(clip_paths["l_file"])], "sd1", CPU, None)
    assert torch.equal(from_file.encode(tokens)["cond"], expected["cond"])
    # The same weights with text_model.* keys, a sidecar config and a tokenizer/ folder.
    state = load_file(str(clip_paths["l_file"]))
    assert next(iter(state)).startswith("embeddings.")
    save_file({"text_model." + k: v for k, v in state.items()}, str(tmp_path / "prefixed.safetensors"))
    (tmp_path / "prefixed.json").write_text((clip_paths["l_file"].parent / "clip_l.json").read_text())
    (clip_paths["l_file"].parent / "clip_l_tokenizer").rename(tmp_path / "tokenizer")
    try:
        prefixed = engine.load_clip([str(tmp_path / "prefixed.safetensors")], "sd1", CPU, None)
    finally:
        (tmp_path / "tokenizer").rename(clip_paths["l_file"].parent / "clip_l_tokenizer")
    assert torch.equal(prefixed.encode(tokens)["cond"], expected["cond"])


def test_clip_pipeline_folder_with_sibling_tokenizer(engine, clip, clip_paths, tmp_path):
    encoder_dir = make_tiny_clip(tmp_path / "text_encoder", kind="l")
    (tmp_path / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (encoder_dir / name).rename(tmp_path / "tokenizer" / name)
    model = engine.load_clip([str(encoder_dir)], "sd1", CPU, None)
    tokens = clip.tokenize("a horse")
    assert model.tokenize("a horse") == tokens
    assert torch.equal(model.encode(tokens)["cond"], clip.encode(tokens)["cond"])


def test_clip_file_without_tokenizer_or_heads(engine, clip_paths, tmp_path):
    state = load_file(str(clip_paths["l_file"]))
    save_file(state, str(tmp_path / "lonely.safetensors"))
    (tmp_path / "lonely.json").write_text(json.dumps({"num_attention_heads": 4}))
    with pytest.raises(EngineError) as err:
        engine.load_clip([str(tmp_path / "lonely.safetensors")], "sd1", CPU, None)
    assert err.value.code == "model_error"
    assert "lonely_tokenizer" in err.value.message and "tokenizer" in err.value.message
    (tmp_path / "lonely.json").unlink()
    with pytest.raises(EngineError) as err:
        engine.load_clip([str(tmp_path / "lonely.safetensors")], "sd1", CPU, None)
    assert err.value.code == "model_error" and "heads" in err.value.message


def test_clip_bad_args_and_paths(engine, clip_paths, tmp_path):
    for clip_type in ("flux", "sd3"):
        with pytest.raises(EngineError) as err:
            engine.load_clip([str(clip_paths["l_folder"])], clip_type, CPU, None)
        assert err.value.code == "bad_args" and "comfy engine" in err.value.message
    with pytest.raises(EngineError) as err:
        engine.load_clip([str(clip_paths["l_folder"])], "sdxl", CPU, None)
    assert err.value.code == "bad_args"
    with pytest.raises(EngineError) as err:
        engine.load_clip([str(tmp_path / "nope.safetensors")], "sd1", CPU, None)
    assert err.value.code == "not_found"
    (tmp_path / "clip.bin").write_bytes(b"x")
    with pytest.raises(EngineError) as err:
        engine.load_clip([str(tmp_path / "clip.bin")], "sd1", CPU, None)
    assert err.value.code == "model_error" and "safetensors" in err.value.message
    # CLIP-G needs a projection: a CLIPTextModel file in the "g" slot is refused.
    with pytest.raises(EngineError) as err:
        engine.load_clip([str(clip_paths["l_folder"]), str(clip_paths["l_folder"])], "sdxl", CPU, None)
    assert err.value.code == "model_error" and "text_projection" in err.value.message


def test_clip_info_nbytes_release(engine, clip_paths):
    model = engine.load_clip([str(clip_paths["l_file"])], "sd1", CPU, None)
    json.dumps(model.info())
    assert model.info()["cond_dim"] == 32
    assert model.nbytes() > 1_000_000
    model.release()
    model.release()
    assert model.nbytes() == 0
    with pytest.raises(EngineError):
        model.encode({"l": [[(BOS_ID, 1.0)] * 77]})


# -------------------------------------------------------------------------------- LoRA


def test_patchable_keys(clip, sdxl):
    keys = clip.patchable_keys()
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "text_model.encoder.layers.1.mlp.fc2.weight" in keys
    assert len(keys) == 2 * 6
    xl = sdxl.patchable_keys()
    assert "l:text_model.encoder.layers.0.self_attn.out_proj.weight" in xl
    assert "g:text_projection.weight" in xl
    assert len(xl) == 2 * 6 + 2 * 6 + 1


def test_lora_strength_zero_and_merged_reference(clip, clip_paths):
    tokens = clip.tokenize("a photo of a cat")
    base = clip.encode(tokens)
    spec = random_lora(clip, "a" * 64, seed=0)
    zero = LoraSpec(spec.sha256, 0.0, spec.weights)
    assert torch.equal(clip.encode(tokens, loras=[zero])["cond"], base["cond"])
    strength = 0.7
    patched = clip.encode(tokens, loras=[LoraSpec(spec.sha256, strength, spec.weights)])
    assert not torch.allclose(patched["cond"], base["cond"], atol=1e-3)
    ref = reference_clip(clip_paths["l_folder"])
    with torch.no_grad():
        for name, param in ref.named_parameters():
            target = name if name.startswith("text_model.") else "text_model." + name
            if target in spec.weights:
                up, down, alpha = spec.weights[target]
                param += up @ down * (alpha / down.shape[0]) * strength
        expected = ref(ids_of(tokens))
    assert torch.allclose(patched["cond"], expected.last_hidden_state, atol=1e-5)
    assert torch.allclose(patched["pooled_output"], expected.pooler_output, atol=1e-5)


def test_lora_leaves_base_weights_and_caches(engine, clip_paths):
    model = engine.load_clip([str(clip_paths["l_folder"])], "sd1", CPU, None)
    before = {k: v.clone() for k, v in model._encoders["l"].module.state_dict().items()}
    tokens = model.tokenize("a cat")
    base = model.encode(tokens)
    spec_a = random_lora(model, "b" * 64, seed=1)
    spec_b = random_lora(model, "c" * 64, seed=2, keys=["l:text_model.encoder.layers.0.mlp.fc1.weight"])
    stacked = model.encode(tokens, loras=[spec_a, spec_b])
    again = model.encode(tokens, loras=[spec_a, spec_b])
    assert torch.equal(stacked["cond"], again["cond"])
    assert model.lora_cache_stats() == {"entries": 1, "hits": 1, "misses": 1}
    def recount() -> int:
        return sum(t.numel() * t.element_size() for patch in model._lora_cache.values()
                   for tensors in patch.values() for t in tensors.values())

    assert model.cache_nbytes() == recount() > 0
    for seed in range(3, 9):  # more stacks than the cache keeps: the oldest are evicted
        model.encode(tokens, loras=[random_lora(model, f"{seed:x}" * 64, seed=seed)])
    assert len(model._lora_cache) == model._lora_cache.max_entries
    assert model.cache_nbytes() == recount() > 0
    after = model._encoders["l"].module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.encode(tokens)["cond"], base["cond"])
    # Stacking is additive: a's delta plus b's delta.
    only_a = model.encode(tokens, loras=[spec_a])
    assert not torch.allclose(only_a["cond"], stacked["cond"])


def test_lora_shape_mismatch_is_bad_args(clip):
    bad = LoraSpec("d" * 64, 1.0, {
        "text_model.encoder.layers.0.mlp.fc1.weight": (torch.zeros(3, 2), torch.zeros(2, 5), 1.0)})
    with pytest.raises(EngineError) as err:
        clip.encode(clip.tokenize("a"), loras=[bad])
    assert err.value.code == "bad_args"


def test_concurrent_encodes_with_different_lora_stacks(engine, clip_paths):
    model = engine.load_clip([str(clip_paths["l_folder"])], "sd1", CPU, None)
    tokens = model.tokenize(" ".join(["a photo of a cat"] * 20))
    stacks = [[]] + [[random_lora(model, f"{i:064x}", seed=10 + i)] for i in range(1, 4)]
    solo = [model.encode(tokens, loras=stack)["cond"] for stack in stacks]
    for i in range(len(solo)):
        for j in range(i):
            assert not torch.allclose(solo[i], solo[j], atol=1e-3)
    barrier = threading.Barrier(len(stacks))
    failures: list[str] = []

    def worker(index: int) -> None:
        try:
            with torch.inference_mode():
                for _ in range(8):
                    barrier.wait()
                    got = model.encode(tokens, loras=stacks[index])["cond"]
                    if not torch.allclose(got, solo[index], rtol=0, atol=1e-5):
                        failures.append(f"stack {index} saw foreign weights")
        except Exception as exc:  # noqa: BLE001 - any failure in a worker is reported below
            failures.append(repr(exc))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stacks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    assert model._encoders["l"].shells.created >= 1


# -------------------------------------------------------------------------------- SDXL


def test_sdxl_tokens_and_concat(sdxl, clip_paths):
    tokens = sdxl.tokenize("a photo of a cat")
    assert sorted(tokens) == ["g", "l"]
    g_ids = [t[0] for t in tokens["g"][0]]
    l_ids = [t[0] for t in tokens["l"][0]]
    assert g_ids[:7] == l_ids[:7] and g_ids[6] == EOS_ID
    assert all(i == 0 for i in g_ids[7:]) and all(i == EOS_ID for i in l_ids[7:])
    out = sdxl.encode(tokens)
    assert out["cond"].shape == (1, 77, 64)
    assert out["pooled_output"].shape == (1, 32)
    ref_l = reference_clip(clip_paths["l_folder"])
    ref_g = reference_clip(clip_paths["g_folder"], projected=True)
    with torch.no_grad():
        hl = ref_l(ids_of(tokens, "l"), output_hidden_states=True).hidden_states[-2]
        g_out = ref_g(ids_of(tokens, "g"), output_hidden_states=True)
    # SDXL defaults to the penultimate layer of both encoders, without the final norm.
    assert torch.allclose(out["cond"][..., :32], hl, atol=1e-5)
    assert torch.allclose(out["cond"][..., 32:], g_out.hidden_states[-2], atol=1e-5)
    assert torch.allclose(out["pooled_output"], g_out.text_embeds, atol=1e-5)
    last = sdxl.encode(tokens, layer=-1)
    assert torch.allclose(last["cond"][..., 32:], g_out.hidden_states[-1], atol=1e-5)


def test_sdxl_long_prompt_and_g_only_lora(sdxl):
    tokens = sdxl.tokenize(" ".join(["cat"] * 100))
    out = sdxl.encode(tokens)
    assert out["cond"].shape == (1, 154, 64)
    spec = random_lora(sdxl, "e" * 64, seed=5, keys=[k for k in sdxl.patchable_keys() if k.startswith("g:")])
    patched = sdxl.encode(tokens, loras=[spec])
    assert torch.equal(patched["cond"][..., :32], out["cond"][..., :32])
    assert not torch.allclose(patched["cond"][..., 32:], out["cond"][..., 32:], atol=1e-3)
    assert not torch.allclose(patched["pooled_output"], out["pooled_output"], atol=1e-3)


def test_sdxl_from_single_files(engine, sdxl, clip_paths):
    files = engine.load_clip([str(clip_paths["l_file"]), str(clip_paths["g_file"])], "sdxl", CPU, None)
    tokens = sdxl.tokenize("a cat riding a horse")
    a, b = sdxl.encode(tokens), files.encode(tokens)
    assert torch.equal(a["cond"], b["cond"]) and torch.equal(a["pooled_output"], b["pooled_output"])


def test_tiny_builders_are_deterministic(tmp_path):
    a = make_tiny_clip(tmp_path / "a", layout="file", seed=3)
    b = make_tiny_clip(tmp_path / "b", layout="file", seed=3)
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    state = copy.copy(torch.random.get_rng_state())
    make_tiny_vae(tmp_path / "v", seed=4)
    assert torch.equal(state, torch.random.get_rng_state())


def test_big_vae_builder(engine, tmp_path):
    channels, layers = big_vae_shape(400 * 2**20)
    assert channels[0] % 32 == 0 and 1 <= layers <= 3
    assert big_vae_shape(335 * 2**20) == ((128, 256, 512, 512), 2)  # the real SD VAE's shape
    path = make_big_vae(tmp_path, 20 * 2**20)
    model = engine.load_vae([str(path)], CPU, None)
    assert 10 * 2**20 < model.nbytes() <= 20 * 2**20


def test_weight_reads_report_load_progress(tmp_path):
    from luna_daemon.models import tiny
    from luna_daemon.models.engines.base import load_progress
    from luna_daemon.models.engines.standalone import _load_safetensors

    path = tiny.make_tiny_vae(tmp_path / "vae", layout="file", seed=0)
    seen: list[int] = []
    with load_progress(seen.append):
        state = _load_safetensors(path, "VAE")
    assert len(seen) == len(state) and seen == sorted(seen)
    assert seen[-1] == sum(t.numel() * t.element_size() for t in state.values())
    # Outside a load nothing is reported (and nothing fails).
    _load_safetensors(path, "VAE")
    assert len(seen) == len(state)
