"""Tiny random-weight model files in the layouts real ComfyUI loads, plus a helper to import
the fake ComfyUI package in ``tests/fake_comfy``.

Writers (all seeded, all ``.safetensors``):

* ``write_clip_l``: a standalone CLIP-L text encoder as Hugging Face saves ``CLIPTextModel``
  weights under ``text_model.*`` (hidden 32, 2 layers: the fake's ``sd1_clip_config.json``).
* ``write_clip_g``: an SDXL CLIP-G text encoder (``text_model.*`` + ``text_projection.weight``,
  hidden 32, 32 layers so ``text_model.encoder.layers.30...`` exists, as ComfyUI's detection
  expects).
* ``write_vae``: a KL VAE in the original LDM / ComfyUI key layout (``encoder.down.0.block.0...``,
  ``quant_conv``, ``post_quant_conv``) and, with ``config=True``, a ``<stem>.json`` sidecar with
  the ``{"params": {"embed_dim", "ddconfig"}}`` config that ``comfy.sd.VAE(config=...)`` takes
  (ComfyUI cannot size a non-SD VAE from its keys).
* ``write_lora``: a kohya-style text-encoder LoRA (``lora_te_...`` / ``lora_te1_`` / ``lora_te2_``
  with ``.lora_up.weight``, ``.lora_down.weight`` and ``.alpha``).
* ``write_embedding``: a textual-inversion file (``{"emb_params": [n, dim]}``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

FAKE_COMFY_ROOT = Path(__file__).resolve().parent / "fake_comfy"

VOCAB = 49408
POSITIONS = 77
HIDDEN = 32
INTERMEDIATE = 64
L_LAYERS = 2
G_LAYERS = 32

CLIP_MODULES = {  # module -> (out, in) shape factory
    "self_attn.q_proj": lambda h, i: (h, h),
    "self_attn.k_proj": lambda h, i: (h, h),
    "self_attn.v_proj": lambda h, i: (h, h),
    "self_attn.out_proj": lambda h, i: (h, h),
    "mlp.fc1": lambda h, i: (i, h),
    "mlp.fc2": lambda h, i: (h, i),
}

# The tiny VAE: ch 32, ch_mult (1, 1, 2, 2) -> 8x downscale, 1 res block per level, 4 latent channels.
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
VAE_EMBED_DIM = 4


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _normal(g: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------------- CLIP


def clip_text_state_dict(*, layers: int, seed: int, projection: bool, hidden: int = HIDDEN,
                         intermediate: int = INTERMEDIATE) -> dict[str, torch.Tensor]:
    """Random CLIP text-encoder weights with Hugging Face names (``text_model.*``)."""
    g = _generator(seed)
    sd = {
        "text_model.embeddings.token_embedding.weight": _normal(g, VOCAB, hidden, std=0.5),
        "text_model.embeddings.position_embedding.weight": _normal(g, POSITIONS, hidden, std=0.2),
        "text_model.final_layer_norm.weight": 1.0 + _normal(g, hidden, std=0.1),
        "text_model.final_layer_norm.bias": _normal(g, hidden, std=0.1),
    }
    for i in range(layers):
        prefix = f"text_model.encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            sd[prefix + norm + ".weight"] = 1.0 + _normal(g, hidden, std=0.1)
            sd[prefix + norm + ".bias"] = _normal(g, hidden, std=0.1)
        for module, shape in CLIP_MODULES.items():
            out_f, in_f = shape(hidden, intermediate)
            sd[prefix + module + ".weight"] = _normal(g, out_f, in_f, std=in_f ** -0.5)
            sd[prefix + module + ".bias"] = _normal(g, out_f, std=0.05)
    if projection:
        sd["text_projection.weight"] = _normal(g, hidden, hidden, std=hidden ** -0.5)
    return sd


def write_clip_l(path: str | Path, seed: int = 0) -> Path:
    """Standalone CLIP-L text encoder file (no projection, like HF ``CLIPTextModel``)."""
    return _save(clip_text_state_dict(layers=L_LAYERS, seed=seed, projection=False), Path(path))


def write_clip_g(path: str | Path, seed: int = 1) -> Path:
    """SDXL CLIP-G text encoder file (with ``text_projection.weight``)."""
    return _save(clip_text_state_dict(layers=G_LAYERS, seed=seed, projection=True), Path(path))


# ---------------------------------------------------------------------------------- VAE


def vae_ldm_state_dict(seed: int = 0, ddconfig: dict | None = None, embed_dim: int = VAE_EMBED_DIM
                       ) -> dict[str, torch.Tensor]:
    """Random KL-VAE weights in the LDM / ComfyUI key layout."""
    cfg = dict(VAE_DDCONFIG if ddconfig is None else ddconfig)
    g = _generator(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[name + ".weight"] = _normal(g, cout, cin, k, k, std=(cin * k * k) ** -0.5)
        sd[name + ".bias"] = _normal(g, cout, std=0.02)

    def norm(name: str, c: int) -> None:
        sd[name + ".weight"] = 1.0 + _normal(g, c, std=0.1)
        sd[name + ".bias"] = _normal(g, c, std=0.1)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def mid(prefix: str, c: int) -> None:
        resnet(prefix + ".mid.block_1", c, c)
        norm(prefix + ".mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(prefix + ".mid.attn_1." + part, c, c, 1)
        resnet(prefix + ".mid.block_2", c, c)

    ch, mult, blocks, z = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["z_channels"]
    levels = len(mult)
    conv("encoder.conv_in", ch, cfg["in_channels"], 3)
    block_in = ch
    for i in range(levels):
        block_out = ch * mult[i]
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z, block_in, 3)
    conv("quant_conv", 2 * embed_dim, 2 * z, 1)
    conv("post_quant_conv", z, embed_dim, 1)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder", block_in)
    for i in reversed(range(levels)):
        block_out = ch * mult[i]
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", cfg["out_ch"], block_in, 3)
    return sd


def vae_config(ddconfig: dict | None = None, embed_dim: int = VAE_EMBED_DIM) -> dict:
    """The ``config`` argument of ``comfy.sd.VAE`` for the tiny VAE."""
    return {"params": {"embed_dim": embed_dim, "ddconfig": dict(VAE_DDCONFIG if ddconfig is None else ddconfig)}}


def write_vae(path: str | Path, seed: int = 0, *, config: bool = True) -> Path:
    """Tiny LDM-layout VAE file; ``config=True`` also writes ``<stem>.json`` (see module doc)."""
    path = Path(path)
    _save(vae_ldm_state_dict(seed), path)
    if config:
        path.with_suffix(".json").write_text(json.dumps(vae_config(), indent=1))
    return path


# --------------------------------------------------------------------------------- LoRA


def write_lora(path: str | Path, *, seed: int = 5, rank: int = 4, encoders: tuple[str, ...] = ("lora_te",),
               layers: tuple[int, ...] = (0, 1), alpha: float | None = 2.0, hidden: int = HIDDEN,
               intermediate: int = INTERMEDIATE) -> Path:
    """Kohya text-encoder LoRA: ``<enc>_text_model_encoder_layers_<i>_<module>.lora_{up,down}.weight``
    (+ ``.alpha``) for every attention / MLP projection of the given layers. ``encoders`` are
    the kohya prefixes: ``lora_te`` (SD1), ``lora_te1`` / ``lora_te2`` (SDXL L / G)."""
    g = _generator(seed)
    sd: dict[str, torch.Tensor] = {}
    for enc in encoders:
        for i in layers:
            for module, shape in CLIP_MODULES.items():
                out_f, in_f = shape(hidden, intermediate)
                stem = f"{enc}_text_model_encoder_layers_{i}_{module.replace('.', '_')}"
                sd[stem + ".lora_up.weight"] = _normal(g, out_f, rank, std=0.3)
                sd[stem + ".lora_down.weight"] = _normal(g, rank, in_f, std=0.3)
                if alpha is not None:
                    sd[stem + ".alpha"] = torch.tensor(float(alpha))
    return _save(sd, Path(path), metadata={"ss_network_module": "networks.lora"})


def write_embedding(path: str | Path, *, vectors: int = 2, dim: int = HIDDEN, seed: int = 9) -> Path:
    """Textual-inversion embedding with ``vectors`` tokens of ``dim`` values."""
    g = _generator(seed)
    return _save({"emb_params": _normal(g, vectors, dim, std=0.5)}, Path(path))


# ---------------------------------------------------------------------- fake ComfyUI


def comfy_engine_settings(home: str | Path, models: str | Path, **overrides):
    """Settings of a test daemon on the comfy engine over the fake ComfyUI: free ports,
    ``LUNA_HOME=home``, ``models`` its one model root (``overrides`` win)."""
    from luna_daemon.settings import Settings

    base = {"port": 0, "monitor_port": 0, "lock_port": 0, "engine": "comfy", "comfyui_root": str(FAKE_COMFY_ROOT),
            "model_roots": [str(models)], **overrides}
    return Settings.load(env={"LUNA_HOME": str(home)}, overrides=base)


@contextlib.contextmanager
def fake_comfy_isolated():
    """Undo, on exit, what importing the fake ComfyUI did: its modules and its sys.path
    entry, and the comfy engine's once-per-process import state. Test modules wrap their
    whole run in it so that later modules see no importable ``comfy``."""
    path_before = list(sys.path)
    modules_before = set(sys.modules)
    try:
        yield
    finally:
        import luna_daemon.models.engines.comfy as comfy_engine

        fake_top = ("comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths")
        for name in set(sys.modules) - modules_before:
            if name.split(".")[0] in fake_top:
                del sys.modules[name]
        sys.path[:] = [p for p in sys.path if p in path_before or p != str(FAKE_COMFY_ROOT)]
        comfy_engine._STATE.clear()


def import_fake_comfy():
    """Put the fake ComfyUI root first on ``sys.path`` and import ``comfy.sd`` as ComfyUI's
    ``main.py --cpu`` would (``args.cpu`` is set when torch has no CUDA). Returns ``comfy``."""
    root = str(FAKE_COMFY_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.sd

    return sys.modules["comfy"]
