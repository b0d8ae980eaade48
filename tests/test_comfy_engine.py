"""The comfy engine against the fake ComfyUI in tests/fake_comfy (offline, CPU, fast).

Every parity test runs the same computation twice: through ``ComfyEngine`` and through the
stock nodes of the fake ComfyUI in this process (what a ComfyUI instance would compute), and
requires the results to match (max |diff| <= 1e-5; in practice they are bit-identical).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_models

from luna_daemon.models.engines import select_engine
from luna_daemon.models.engines.base import EngineError, LoraSpec, TiledArgs
from luna_daemon.models.engines import comfy as comfy_engine
from luna_daemon.models.engines.comfy import ComfyEngine
from luna_daemon.settings import Settings

CPU = torch.device("cpu")
FAKE_ROOT = comfy_models.FAKE_COMFY_ROOT
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and float((a - b).abs().max()) <= TOL


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _forget_fake_comfy_afterwards():
    """Leave no fake ``comfy`` importable for test modules that run after this one."""
    with comfy_models.fake_comfy_isolated():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("comfy_models")
    paths = {
        "root": root,
        "clip_l": comfy_models.write_clip_l(root / "text_encoders" / "clip_l.safetensors", seed=3),
        "clip_g": comfy_models.write_clip_g(root / "text_encoders" / "clip_g.safetensors", seed=4),
        "vae": comfy_models.write_vae(root / "vae" / "tiny_vae.safetensors", seed=1),
        "vae_noconfig": comfy_models.write_vae(root / "vae" / "tiny_vae_bare.safetensors", seed=1, config=False),
        "lora_a": comfy_models.write_lora(root / "loras" / "lora_a.safetensors", seed=5, alpha=2.0),
        "lora_b": comfy_models.write_lora(root / "loras" / "lora_b.safetensors", seed=6, alpha=None, layers=(1,)),
        "lora_xl": comfy_models.write_lora(root / "loras" / "lora_xl.safetensors", seed=7,
                                           encoders=("lora_te1", "lora_te2"), layers=(0, 1, 30)),
        "embedding": comfy_models.write_embedding(root / "embeddings" / "myemb.safetensors", vectors=2),
    }
    from safetensors.torch import save_file

    save_file({"not_a_vae.weight": torch.zeros(2)}, str(root / "junk.safetensors"))
    paths["junk"] = root / "junk.safetensors"
    return paths


def _settings(tmp: Path, **overrides) -> Settings:
    base = {"port": 0, "monitor_port": 0, "lock_port": 0, "engine": "comfy", "comfyui_root": str(FAKE_ROOT)}
    base.update(overrides)
    return Settings.load(env={"LUNA_HOME": str(tmp / "home")}, overrides=base)


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory) -> ComfyEngine:
    settings = _settings(tmp_path_factory.mktemp("settings"), model_roots=[str(models["root"])])
    eng = ComfyEngine(settings, FAKE_ROOT)
    eng.prepare()
    return eng


@pytest.fixture(scope="module")
def native(engine, models):
    """The fake ComfyUI's own modules and stock nodes, with the test folders registered."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes
    from comfy_extras import nodes_clip_sdxl

    for kind in ("text_encoders", "vae", "loras", "embeddings"):
        folder_paths.add_model_folder_path(kind, str(models["root"] / kind))
    return type("Native", (), {"sd": comfy.sd, "utils": comfy.utils, "nodes": nodes, "sdxl": nodes_clip_sdxl,
                               "folder_paths": folder_paths})


@pytest.fixture(scope="module")
def clip(engine, models, native):
    return engine.load_clip([str(models["clip_l"])], "sd1", CPU, None)


@pytest.fixture(scope="module")
def native_clip(native):
    with torch.inference_mode():
        return native.nodes.CLIPLoader().load_clip("clip_l.safetensors", type="stable_diffusion")[0]


def native_encode(native, clip_obj, text):
    with torch.inference_mode():
        cond = native.nodes.CLIPTextEncode().encode(clip_obj, text)[0]
    assert len(cond) == 1
    return cond[0][0], cond[0][1]


# ----------------------------------------------------------------------- selection / import


def test_select_engine_picks_comfy_for_auto_and_comfy(tmp_path):
    for choice in ("auto", "comfy"):
        eng = select_engine(_settings(tmp_path, engine=choice))
        assert isinstance(eng, ComfyEngine) and eng.name == "comfy"
        assert eng.root == FAKE_ROOT.resolve()
    assert select_engine(_settings(tmp_path, engine="standalone")).name == "standalone"


def test_engine_comfy_without_comfyui_is_a_clear_error(tmp_path):
    # A fresh interpreter: this test process has the fake comfy imported already.
    probe = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from luna_daemon.models.engines import select_engine
        from luna_daemon.models.engines.base import EngineError
        from luna_daemon.settings import Settings
        def s(engine):
            return Settings.load(env={{"LUNA_HOME": {str(tmp_path)!r}}}, overrides={{"engine": engine, "comfyui_root": ""}})
        try:
            select_engine(s("comfy"))
        except EngineError as exc:
            assert exc.code == "model_error" and "comfyui_root" in exc.message, exc.message
        else:
            raise SystemExit("engine=comfy without ComfyUI did not fail")
        assert select_engine(s("auto")).name == "standalone"
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


_IMPORT_PROBE = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, {repo!r})
    sys.argv = ["luna-daemon", "--definitely-not-a-comfyui-flag", "serve"]
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    from luna_daemon.models.engines import select_engine
    from luna_daemon.settings import Settings
    settings = Settings.load(env={{"LUNA_HOME": {home!r}}}, overrides={{"comfyui_root": {root!r}, "engine": "auto"}})
    engine = select_engine(settings)
    modules = engine.prepare()
    import comfy.cli_args, comfy.model_management, comfy.options
    after = (list(root.handlers), root.level)
    print(json.dumps({{
        "engine": engine.name,
        "argv": sys.argv,
        "args_parsing": comfy.options.args_parsing,
        "cpu_flag": comfy.cli_args.args.cpu,
        "device": str(comfy.model_management.get_torch_device()),
        "root_unchanged": before == after,
        "comfy_file": comfy.cli_args.__file__,
    }}))
""")

_FAKE_FACTS_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    out = {{}}
    import comfy.options
    comfy.options.enable_args_parsing()
    sys.argv = ["main.py", "--definitely-not-a-comfyui-flag"]
    try:
        import comfy.cli_args
        out["unknown_flag"] = "accepted"
    except SystemExit as exc:
        out["unknown_flag"] = "exit %s" % exc.code
    sys.modules.pop("comfy.cli_args", None)
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    out["cpu_default"] = comfy.cli_args.args.cpu
    try:
        import comfy.model_management
        out["mm_import"] = "ok"
    except AssertionError as exc:
        out["mm_import"] = "AssertionError: %s" % exc
    print(json.dumps(out))
""")


def _run_probe(code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_ignores_argv_and_keeps_root_logger(tmp_path):
    out = _run_probe(_IMPORT_PROBE.format(repo=str(REPO), home=str(tmp_path), root=str(FAKE_ROOT)))
    assert out["engine"] == "comfy"
    assert out["argv"][1] == "--definitely-not-a-comfyui-flag"  # untouched, and comfy did not exit on it
    assert out["args_parsing"] is False
    assert out["root_unchanged"] is True
    assert Path(out["comfy_file"]).resolve().is_relative_to(FAKE_ROOT.resolve())
    if not torch.cuda.is_available():
        assert out["cpu_flag"] is True and out["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA assertion only happens on a CPU-only torch")
def test_fake_comfy_import_time_facts():
    """The fake reproduces what makes the engine's import precautions necessary."""
    out = _run_probe(_FAKE_FACTS_PROBE.format(root=str(FAKE_ROOT)))
    assert out["unknown_flag"] == "exit 2"
    assert out["cpu_default"] is False
    assert out["mm_import"] == "AssertionError: Torch not compiled with CUDA enabled"


_LOCATION_PROBE = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, {repo!r})
    warnings = []
    class H(logging.Handler):
        def emit(self, r):
            if r.levelno >= logging.WARNING:
                warnings.append(r.getMessage())
    logging.getLogger("luna_daemon").addHandler(H())
    from luna_daemon.models.engines.comfy import ComfyEngine
    from luna_daemon.settings import Settings
    settings = Settings.load(env={{"LUNA_HOME": {home!r}}}, overrides={{"engine": "comfy"}})
    engine = ComfyEngine(settings, {link!r})  # a symlink to the fake ComfyUI root
    for _ in range(3):  # every load calls prepare()
        modules = engine.prepare()
    import comfy
    same_root = list(warnings)
    other = ComfyEngine(settings, {other!r})
    for _ in range(3):
        other.prepare()
    print(json.dumps({{"comfy_file": comfy.__file__, "root": str(modules.root), "same_root": same_root,
                      "other_root": warnings[len(same_root):]}}))
""")


def test_comfy_namespace_package_location_is_checked_once(tmp_path):
    """Real ComfyUI's ``comfy`` has no __init__.py (``__file__`` is None): the engine finds its
    folder from ``__path__`` (symlinks resolved) and warns about a mismatch once, not per load."""
    link = tmp_path / "ComfyUI-link"
    link.symlink_to(FAKE_ROOT, target_is_directory=True)
    other = tmp_path / "OtherComfyUI"
    other.mkdir()
    out = _run_probe(_LOCATION_PROBE.format(repo=str(REPO), home=str(tmp_path / "home"), link=str(link),
                                            other=str(other)))
    assert out["comfy_file"] is None  # the fake is a namespace package, like ComfyUI's
    assert out["root"] == str(FAKE_ROOT.resolve())
    assert out["same_root"] == []
    assert len(out["other_root"]) == 1 and str(other) in out["other_root"][0], out["other_root"]


def test_unavailable_device_lists_devices(engine, models):
    bad = torch.device(f"cuda:{torch.cuda.device_count() + 1}")
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(models["vae"])], bad, None)
    assert err.value.code == "bad_args"
    assert str(bad) in err.value.message and "cpu" in err.value.message
    with pytest.raises(EngineError) as err:
        engine.load_clip([str(models["clip_l"])], "sd1", bad, None)
    assert err.value.code == "bad_args" and "devices on this machine" in err.value.message


# -------------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae_pair(engine, models, native):
    vae = engine.load_vae([str(models["vae"])], CPU, None)
    config = json.loads(models["vae"].with_suffix(".json").read_text())
    with torch.inference_mode():
        ref = native.sd.VAE(sd=native.utils.load_torch_file(str(models["vae"])), config=config)
    return vae, ref


def test_vae_matches_native_nodes(vae_pair, native):
    vae, ref = vae_pair
    nodes = native.nodes
    pixels = torch.rand(2, 68, 100, 4, generator=torch.Generator().manual_seed(0))  # RGBA, not a multiple of 8
    with torch.inference_mode():
        latent = vae.encode(pixels)
        ref_latent = nodes.VAEEncode().encode(ref, pixels)[0]["samples"]
        image = vae.decode(latent)
        ref_image = nodes.VAEDecode().decode(ref, {"samples": ref_latent})[0]
        tiled_image = vae.decode(latent, TiledArgs(tile_x=8, tile_y=8, overlap=2))
        ref_tiled_image = nodes.VAEDecodeTiled().decode(ref, {"samples": ref_latent}, tile_size=64, overlap=16)[0]
        tiled_latent = vae.encode(pixels, TiledArgs(tile_x=64, tile_y=64, overlap=16))
        ref_tiled_latent = nodes.VAEEncodeTiled().encode(ref, pixels, tile_size=64, overlap=16)[0]["samples"]
    assert latent.shape == (2, 4, 8, 12) and latent.dtype == torch.float32 and latent.device == CPU
    assert image.shape == (2, 64, 96, 3) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert close(latent, ref_latent)
    assert close(image, ref_image)
    assert close(tiled_image, ref_tiled_image)
    assert close(tiled_latent, ref_tiled_latent)
    # The three-pass tiled result really differs from the plain one (it is not a no-op).
    assert float((tiled_image - image).abs().max()) > 1e-3
    assert float((tiled_latent - latent).abs().max()) > 1e-3


def test_vae_info_is_json_safe_and_complete(vae_pair):
    vae, ref = vae_pair
    info = vae.info()
    json.dumps(info)
    assert info["latent_channels"] == 4 == ref.latent_channels
    assert info["downscale_ratio"] == 8 and info["upscale_ratio"] == 8
    assert info["latent_dim"] == 2 and info["output_channels"] == 3
    assert info["downscale_index_formula"] is None and info["upscale_index_formula"] is None
    assert info["spacial_compression_encode"] == 8 and info["spacial_compression_decode"] == 8
    assert info["temporal_compression_decode"] is None
    assert vae.dtype == torch.float32 and vae.device == CPU
    assert vae.nbytes() == sum(p.numel() * p.element_size() for p in ref.first_stage_model.parameters())


def test_vae_config_inferred_when_no_sidecar(engine, models, vae_pair):
    vae, _ = vae_pair
    bare = engine.load_vae([str(models["vae_noconfig"])], CPU, None)
    latent = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(bare.decode(latent), vae.decode(latent))


def test_diffusers_layout_vae_matches_standalone_engine(engine, model_dir):
    """The daemon's tiny diffusers-layout VAE through comfy's key conversion and LDM modules
    gives what diffusers computes (an independent check of the fake's maths)."""
    from luna_daemon.models.engines.standalone import StandaloneEngine

    path = str(model_dir / "vae_file" / "tiny_vae.safetensors")
    mine = engine.load_vae([path], CPU, None)
    ref = StandaloneEngine().load_vae([path], CPU, None)
    pixels = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        latent, ref_latent = mine.encode(pixels), ref.encode(pixels)
        assert float((latent - ref_latent).abs().max()) < 1e-4
        assert float((mine.decode(ref_latent) - ref.decode(ref_latent)).abs().max()) < 1e-4
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(model_dir / "vae_folder")], CPU, None)
    assert err.value.code == "bad_args" and "folder" in err.value.message


def test_vae_errors_are_clear(engine, models, tmp_path):
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(models["junk"])], CPU, None)
    assert err.value.code == "model_error" and "does not recognise" in err.value.message
    with pytest.raises(EngineError) as err:
        engine.load_vae([str(tmp_path / "missing.safetensors")], CPU, None)
    assert err.value.code == "not_found"
    vae = engine.load_vae([str(models["vae"])], CPU, None)
    with pytest.raises(EngineError) as err:
        vae.decode(torch.zeros(1, 3, 4, 4))
    assert err.value.code == "bad_args"
    vae.release()
    with pytest.raises(EngineError):
        vae.encode(torch.rand(1, 8, 8, 3))


# ------------------------------------------------------------------------------- CLIP


LONG_PROMPT = " ".join(["a photo of a red cat riding a horse at night"] * 12)
PROMPTS = ["a photo of a cat", "a (photo:1.3) of a ((cat)) in \\(parens\\)", LONG_PROMPT, ""]


def test_clip_matches_native_clip_text_encode(clip, native_clip, native):
    for text in PROMPTS:
        tokens = clip.tokenize(text)
        assert tokens == native_clip.tokenize(text)
        out = clip.encode(tokens)
        ref_cond, ref_extra = native_encode(native, native_clip, text)
        assert close(out["cond"], ref_cond), text
        assert close(out["pooled_output"], ref_extra["pooled_output"]), text
    weighted = clip.tokenize("a (photo:1.3) of a ((cat))")["l"][0]
    assert (531, pytest.approx(1.3)) in [(t, w) for t, w in weighted]
    assert any(abs(w - 1.21) < 1e-9 for _, w in weighted)
    long_out = clip.encode(clip.tokenize(LONG_PROMPT))
    assert long_out["cond"].shape[1] == 77 * len(clip.tokenize(LONG_PROMPT)["l"]) > 77
    assert long_out["pooled_output"].shape == (1, 32)


def test_clip_chunks_follow_comfy_layout(clip):
    chunks = clip.tokenize("a photo")["l"]
    assert len(chunks) == 1 and len(chunks[0]) == 77
    assert chunks[0][0] == (49406, 1.0) and chunks[0][-1] == (49407, 1.0)
    with_ids = clip.tokenize("a photo", return_word_ids=True)["l"][0]
    assert with_ids[1][2] == 1 and with_ids[2][2] == 2 and with_ids[0][2] == 0


def test_clip_set_last_layer_matches_native(clip, native_clip, native):
    with torch.inference_mode():
        penultimate = native.nodes.CLIPSetLastLayer().set_last_layer(native_clip, -2)[0]
    assert native_clip.layer_idx is None and penultimate.layer_idx == -2  # the clone took the layer
    for text in PROMPTS[:2]:
        ref_cond, ref_extra = native_encode(native, penultimate, text)
        out = clip.encode(clip.tokenize(text), layer=-2)
        assert close(out["cond"], ref_cond) and close(out["pooled_output"], ref_extra["pooled_output"])
        assert not torch.equal(out["cond"], clip.encode(clip.tokenize(text))["cond"])
    # The layer choice never leaks into later default-layer calls.
    base_cond, _ = native_encode(native, native_clip, PROMPTS[0])
    assert close(clip.encode(clip.tokenize(PROMPTS[0]))["cond"], base_cond)


def test_clip_tokens_survive_the_wire(clip, native_clip, native):
    text = "a (photo:1.3) of a cat"
    wire = json.loads(json.dumps(clip.tokenize(text)))  # tuples -> lists, as JSON carries them
    ref_cond, _ = native_encode(native, native_clip, text)
    assert close(clip.encode(wire)["cond"], ref_cond)
    with pytest.raises(EngineError) as err:
        clip.encode({"g": wire["l"]})
    assert err.value.code == "bad_args" and "'l'" in err.value.message
    with pytest.raises(EngineError):
        clip.encode({"l": [[["x", 1.0]]]})


def test_clip_textual_inversion_embedding(clip, native_clip, native):
    text = "embedding:myemb a photo of a cat"
    tokens = clip.tokenize(text)
    emb = [t for t, _ in tokens["l"][0] if isinstance(t, torch.Tensor)]
    assert len(emb) == 2 and emb[0].shape == (32,)
    ref_cond, ref_extra = native_encode(native, native_clip, text)
    out = clip.encode(tokens)
    assert close(out["cond"], ref_cond) and close(out["pooled_output"], ref_extra["pooled_output"])
    assert not torch.equal(out["cond"], clip.encode(clip.tokenize("a photo of a cat"))["cond"])


def test_clip_embedding_directories_per_call(engine, clip, models, tmp_path, caplog):
    """``tokenize(embedding_directories=...)``: the caller's folders for this call only (both
    SDXL tokenizers too); a name found nowhere is ComfyUI's warning, not a silent drop."""
    other = tmp_path / "other_embeddings"
    comfy_models.write_embedding(other / "elsewhere.safetensors", vectors=3, seed=31)
    text = "embedding:elsewhere a cat"
    with caplog.at_level(logging.WARNING):
        plain = clip.tokenize(text)
    assert not any(isinstance(t, torch.Tensor) for t, _ in plain["l"][0])
    assert any("embedding:elsewhere does not exist" in r.getMessage() for r in caplog.records)
    found = clip.tokenize(text, embedding_directories=[str(other)])
    assert sum(isinstance(t, torch.Tensor) for t, _ in found["l"][0]) == 3
    again = clip.tokenize(text)  # the load-time folders are back
    assert not any(isinstance(t, torch.Tensor) for t, _ in again["l"][0])
    sdxl = engine.load_clip([str(models["clip_l"]), str(models["clip_g"])], "sdxl", CPU, None)
    both = sdxl.tokenize(text, embedding_directories=[str(other)])
    assert all(sum(isinstance(t, torch.Tensor) for t, _ in both[k][0]) == 3 for k in ("g", "l")), both
    assert all(t.embedding_directory == sdxl.info()["embedding_directories"]
               for t in comfy_engine._sub_tokenizers(sdxl._clip)), "restored after a failing call too"
    assert len(comfy_engine._sub_tokenizers(sdxl._clip)) == 2


def test_clip_info_and_patchable_keys(clip, native_clip):
    info = clip.info()
    json.dumps(info)
    assert info["clip_type"] == "sd1" and info["comfy_clip_type"] == "STABLE_DIFFUSION"
    assert info["tokenizer_keys"] == ["l"] and info["model_class"] == "SD1ClipModel"
    names = [name for name, _shape, _dtype in info["state_dict"]]
    assert names == list(native_clip.cond_stage_model.state_dict().keys())
    assert ["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", [32, 32], "float16"] in info["state_dict"]
    assert clip.dtype == torch.float16  # ComfyUI's text-encoder default, even on the CPU
    keys = clip.patchable_keys()
    assert "clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in keys
    assert all(k in names for k in keys)


def test_sdxl_tokens_and_clip_text_encode_sdxl(engine, models, native):
    sdxl = engine.load_clip([str(models["clip_l"]), str(models["clip_g"])], "sdxl", CPU, None)
    with torch.inference_mode():
        ref_clip = native.nodes.DualCLIPLoader().load_clip("clip_l.safetensors", "clip_g.safetensors", "sdxl")[0]
    assert sdxl.info()["tokenizer_keys"] == ["g", "l"] and sdxl.info()["model_class"] == "SDXLClipModel"
    tokens = sdxl.tokenize("a cat")
    assert tokens["g"][0][-1] == (0, 1.0) and tokens["l"][0][-1] == (49407, 1.0)  # G pads with 0

    text_g, text_l = "a photo of a cat", LONG_PROMPT
    with torch.inference_mode():
        out = native.sdxl.CLIPTextEncodeSDXL.execute(ref_clip, 1024, 768, 0, 0, 1024, 768, text_g, text_l)
    (ref_cond, ref_extra), = out.args[0]
    assert ref_extra["width"] == 1024 and ref_extra["target_height"] == 768

    # What the node does, through the engine: splice "l" from a second tokenize, pad with "".
    spliced = sdxl.tokenize(text_g)
    spliced["l"] = sdxl.tokenize(text_l)["l"]
    empty = sdxl.tokenize("")
    while len(spliced["g"]) < len(spliced["l"]):
        spliced["g"] += empty["g"]
    mine = sdxl.encode(spliced)
    assert mine["cond"].shape == (1, 77 * len(spliced["l"]), 64)
    assert close(mine["cond"], ref_cond) and close(mine["pooled_output"], ref_extra["pooled_output"])

    with torch.inference_mode():
        last = native.nodes.CLIPSetLastLayer().set_last_layer(ref_clip, -1)[0]
    ref_last, _ = native_encode(native, last, text_g)
    assert close(sdxl.encode(sdxl.tokenize(text_g), layer=-1)["cond"], ref_last)
    sdxl.release()


# ------------------------------------------------------------------------------- LoRA


def lora_spec(clip, path: Path, strength: float) -> LoraSpec:
    """The daemon's own path: the LoRA cache's parser, mapped onto the engine's keys."""
    from luna_daemon.models.lora import map_to_model, parse_lora

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraSpec(sha, strength, map_to_model(parse_lora(load_file(str(path)), sha), clip.patchable_keys()))


def native_lora(native, clip_obj, name: str, strength: float):
    with torch.inference_mode():
        return native.nodes.LoraLoader().load_lora(None, clip_obj, name, 1.0, strength)[1]


def test_lora_weights_use_comfy_key_space(clip, models):
    spec = lora_spec(clip, models["lora_a"], 1.0)
    keys = set(clip.patchable_keys())
    assert len(spec.weights) == 12 and set(spec.weights) <= keys
    raw = load_file(str(models["lora_a"]))
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    up, down, alpha = spec.weights["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(up, raw[stem + ".lora_up.weight"]) and torch.equal(down, raw[stem + ".lora_down.weight"])
    assert alpha == 2.0
    assert all(a is None for _, _, a in lora_spec(clip, models["lora_b"], 1.0).weights.values())


def test_lora_matches_native_lora_loader(clip, native_clip, native, models):
    text = "a (photo:1.2) of a cat"
    base_cond, _ = native_encode(native, native_clip, text)
    tokens = clip.tokenize(text)
    spec_a = lora_spec(clip, models["lora_a"], 0.8)
    with_lora = native_lora(native, native_clip, "lora_a.safetensors", 0.8)
    ref_cond, ref_extra = native_encode(native, with_lora, text)
    out = clip.encode(tokens, loras=[spec_a])
    assert close(out["cond"], ref_cond) and close(out["pooled_output"], ref_extra["pooled_output"])
    assert float((out["cond"] - base_cond).abs().max()) > 1e-3

    # A stack equals a chain of LoraLoaders, and the layer applies on top of the patches.
    spec_b = lora_spec(clip, models["lora_b"], -0.5)
    chained = native_lora(native, with_lora, "lora_b.safetensors", -0.5)
    with torch.inference_mode():
        chained_penultimate = native.nodes.CLIPSetLastLayer().set_last_layer(chained, -2)[0]
    ref_stack, _ = native_encode(native, chained_penultimate, text)
    assert close(clip.encode(tokens, layer=-2, loras=[spec_a, spec_b])["cond"], ref_stack)

    # Strength 0 is the base model; and the base is restored after patched calls.
    zero = LoraSpec(spec_a.sha256, 0.0, spec_a.weights)
    assert close(clip.encode(tokens, loras=[zero])["cond"], base_cond)
    assert close(clip.encode(tokens)["cond"], base_cond)
    assert close(native_encode(native, native_clip, text)[0], base_cond)
    # Cached clone: the same stack again gives the same result.
    assert close(clip.encode(tokens, loras=[spec_a])["cond"], ref_cond)


def test_lora_bad_shapes_are_bad_args(clip, models):
    spec = lora_spec(clip, models["lora_a"], 1.0)
    key = next(iter(spec.weights))
    up, down, alpha = spec.weights[key]
    bad = LoraSpec("bad" * 8, 1.0, {key: (up, down[:, :-1], alpha)})
    with pytest.raises(EngineError) as err:
        clip.encode(clip.tokenize("a cat"), loras=[bad])
    assert err.value.code == "bad_args"


def test_sdxl_lora_matches_native(engine, models, native):
    sdxl = engine.load_clip([str(models["clip_l"]), str(models["clip_g"])], "sdxl", CPU, None)
    with torch.inference_mode():
        ref_clip = native.nodes.DualCLIPLoader().load_clip("clip_l.safetensors", "clip_g.safetensors", "sdxl")[0]
    spec = lora_spec(sdxl, models["lora_xl"], 0.9)
    assert any(k.startswith("clip_g.") for k in spec.weights) and any(k.startswith("clip_l.") for k in spec.weights)
    ref_cond, ref_extra = native_encode(native, native_lora(native, ref_clip, "lora_xl.safetensors", 0.9), "a cat")
    out = sdxl.encode(sdxl.tokenize("a cat"), loras=[spec])
    assert close(out["cond"], ref_cond) and close(out["pooled_output"], ref_extra["pooled_output"])
    sdxl.release()


def test_threads_with_different_lora_stacks_match_solo(clip, models):
    spec_a = lora_spec(clip, models["lora_a"], 1.0)
    spec_b = lora_spec(clip, models["lora_b"], 0.7)
    stacks = [[], [spec_a], [spec_b], [spec_a, spec_b], [LoraSpec(spec_a.sha256, -1.0, spec_a.weights)]]
    layers = [None, -2, None, None, -2]  # (lora_b only patches the last layer, which -2 skips)
    texts = ["a photo of a cat", "a (dog:1.2) at night", LONG_PROMPT]
    tokens = [clip.tokenize(t) for t in texts]
    solo = {(i, j): clip.encode(tok, layer=layers[i], loras=stack)["cond"]
            for i, stack in enumerate(stacks) for j, tok in enumerate(tokens)}
    barrier = threading.Barrier(len(stacks))
    failures: list[str] = []

    def worker(i: int) -> None:
        barrier.wait()
        for rep in range(6):
            j = (i + rep) % len(tokens)
            got = clip.encode(tokens[j], layer=layers[i], loras=stacks[i])["cond"]
            if not torch.equal(got, solo[(i, j)]):
                failures.append(f"stack {i} text {j} rep {rep}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stacks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    for i in range(len(stacks)):  # the stacks really differ from each other
        for k in range(i):
            assert not torch.equal(solo[(i, 0)], solo[(k, 0)]), (i, k)


# ------------------------------------------------------------------------------ daemon


def test_daemon_with_comfy_engine_encodes_like_native(make_settings, models, native, native_clip):
    from luna_daemon.client import DaemonClient
    from luna_daemon.daemon import Daemon

    daemon = Daemon(make_settings(engine="comfy", comfyui_root=str(FAKE_ROOT), model_roots=[str(models["root"])]))
    daemon.start()
    try:
        with DaemonClient(*daemon.address, token=daemon.token, timeout=60) as client:
            assert client.hello()["engine"] == "comfy"
            info = client.clip_load([str(models["clip_l"])], "sd1")
            text = "a (photo:1.3) of a cat"
            tokens = client.clip_tokenize(info["model"], text)
            out = client.clip_encode(info["model"], tokens=tokens)
            out_text = client.clip_encode(info["model"], text=text, layer=-2)
            ref_cond, ref_extra = native_encode(native, native_clip, text)
            with torch.inference_mode():
                penultimate = native.nodes.CLIPSetLastLayer().set_last_layer(native_clip, -2)[0]
            ref_layer, _ = native_encode(native, penultimate, text)
            assert close(out["cond"], ref_cond) and close(out["pooled_output"], ref_extra["pooled_output"])
            assert close(out_text["cond"], ref_layer)

            vae = client.vae_load(str(models["vae"]))
            pixels = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(2))
            latent = client.vae_encode(vae["model"], pixels)
            with torch.inference_mode():
                ref = native.sd.VAE(sd=native.utils.load_torch_file(str(models["vae"])),
                                    config=json.loads(models["vae"].with_suffix(".json").read_text()))
                ref_latent = native.nodes.VAEEncode().encode(ref, pixels)[0]["samples"]
            assert close(latent, ref_latent)
    finally:
        daemon.stop(10)
