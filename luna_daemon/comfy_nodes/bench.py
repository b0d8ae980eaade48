"""Per-call overhead of the ComfyUI proxies versus running the same model in-process.

:func:`proxy_overhead_benchmark` builds a tiny CLIP-L (the sizes of the ComfyUI install's own
``comfy/sd1_clip_config.json``) and a tiny KL VAE, loads each twice -- natively with
``comfy.sd`` in this process, and in a Luna Daemon (engine = comfy, its own process on free
ports, as in real use) behind :class:`~luna_daemon.comfy_nodes.proxies.DaemonCLIP` /
:class:`~luna_daemon.comfy_nodes.proxies.DaemonVAE` -- and times what the stock nodes call:

* CLIP: ``tokenize`` + ``encode_from_tokens_scheduled`` (CLIPTextEncode: two round trips);
* VAE: ``decode`` of a ``decode_size`` x ``decode_size`` image (512 by default);
* video VAE: ``decode`` of a Wan 2.1 latent ``[1, 16, 2, 8, 8]`` (5 frames of 64x64), the
  ComfyUI's own ``WanVAE`` with random weights (full size in a real ComfyUI, tiny in the
  fake comfy);
* Flux: CLIPTextEncodeFlux's calls (two ``tokenize``, the T5 stream spliced in, an encode
  with ``guidance``) on a small random CLIP-L + T5-XXL pair, when the ComfyUI's
  ``t5_config_xxl.json`` is small (the fake comfy's: the real d_model and 24 blocks, tiny
  otherwise; a real ComfyUI's 4.7 billion parameters are left out, saying so).

All calls run on one worker thread inside ``torch.inference_mode()``, like ComfyUI's prompt
worker; native and proxy calls alternate (interleaved), and medians are reported. The
overhead is serialisation + loopback TCP + the daemon's queue hop.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The tiny VAE: ch 32, ch_mult (1, 1, 2, 2) -> 8x, one res block per level, 4 latent channels.
_VAE_CONFIG = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def _find_root(comfyui_root: str | None, settings: Any) -> Path:
    from luna_daemon.models.engines import detect_comfyui_root

    if comfyui_root:
        return Path(comfyui_root).expanduser().resolve()
    if settings is not None:
        found = detect_comfyui_root(settings)
        if found is not None:
            return found
    fake = Path(__file__).resolve().parents[2] / "tests" / "fake_comfy"
    if (fake / "comfy" / "sd.py").is_file():
        return fake
    raise RuntimeError("no ComfyUI found for the proxy benchmark: pass comfyui_root or set comfyui_root / COMFYUI_PATH")


def _clip_l_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random CLIP text-encoder weights in the Hugging Face layout (``text_model.*``)."""
    g = torch.Generator().manual_seed(seed)
    h, inter = int(config["hidden_size"]), int(config["intermediate_size"])

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).half()

    sd = {"text_model.embeddings.token_embedding.weight": rnd(int(config["vocab_size"]), h, std=0.5),
          "text_model.embeddings.position_embedding.weight": rnd(int(config["max_position_embeddings"]), h, std=0.2),
          "text_model.final_layer_norm.weight": (1 + rnd(h, std=0.1).float()).half(),
          "text_model.final_layer_norm.bias": rnd(h, std=0.1)}
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.out_proj": (h, h), "mlp.fc1": (inter, h), "mlp.fc2": (h, inter)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"text_model.encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            sd[p + norm + ".weight"] = (1 + rnd(h, std=0.1).float()).half()
            sd[p + norm + ".bias"] = rnd(h, std=0.1)
        for module, (out_f, in_f) in shapes.items():
            sd[p + module + ".weight"] = rnd(out_f, in_f, std=in_f ** -0.5)
            sd[p + module + ".bias"] = rnd(out_f, std=0.05)
    return sd


# Above this many parameters the Flux case is left out (a real ComfyUI's T5-XXL config is
# 4.7 billion; the fake comfy's is ~10 million, with the real d_model and block count).
FLUX_T5_MAX_PARAMS = 60_000_000


def t5_config(root: Path) -> dict | None:
    """The T5-XXL config of the ComfyUI at ``root`` (``comfy/text_encoders/t5_config_xxl.json``)."""
    path = root / "comfy" / "text_encoders" / "t5_config_xxl.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def t5_parameters(config: dict) -> int:
    d, inner, ff, layers = (int(config[k]) for k in ("d_model", "d_kv", "d_ff", "num_layers"))
    inner *= int(config["num_heads"])
    return int(config["vocab_size"]) * d + layers * (4 * d * inner + 3 * d * ff + 2 * d) + d


def t5_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random T5 encoder weights in ComfyUI's layout (``shared.weight``, ``encoder.block.N...``,
    gated GELU feed-forward), fp16, from a ``t5_config_xxl.json``-style config."""
    g = torch.Generator().manual_seed(seed)
    d, ff, heads = int(config["d_model"]), int(config["d_ff"]), int(config["num_heads"])
    inner = int(config["d_kv"]) * heads

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).half()

    def norm() -> torch.Tensor:
        return (1 + rnd(d, std=0.1).float()).half()

    sd = {"shared.weight": rnd(int(config["vocab_size"]), d, std=1.0), "encoder.final_layer_norm.weight": norm()}
    for i in range(int(config["num_layers"])):
        p = f"encoder.block.{i}.layer."
        for name in ("q", "k", "v"):
            sd[f"{p}0.SelfAttention.{name}.weight"] = rnd(inner, d, std=d ** -0.5)
        sd[f"{p}0.SelfAttention.o.weight"] = rnd(d, inner, std=inner ** -0.5)
        if i == 0:
            sd[f"{p}0.SelfAttention.relative_attention_bias.weight"] = rnd(
                int(config["relative_attention_num_buckets"]), heads, std=0.5)
        sd[f"{p}0.layer_norm.weight"] = norm()
        sd[f"{p}1.DenseReluDense.wi_0.weight"] = rnd(ff, d, std=d ** -0.5)
        sd[f"{p}1.DenseReluDense.wi_1.weight"] = rnd(ff, d, std=d ** -0.5)
        sd[f"{p}1.DenseReluDense.wo.weight"] = rnd(d, ff, std=ff ** -0.5)
        sd[f"{p}1.layer_norm.weight"] = norm()
    return sd


def _random_like(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights for a state dict's keys and shapes (comfy may leave modules uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in sorted(sd.items()):
        shape = tuple(ref.shape)
        if len(shape) >= 2:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            value = torch.randn(shape, generator=g) * fan_in ** -0.5
        elif "norm" in key and key.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            value = 0.02 * torch.randn(shape, generator=g)
        out[key] = value.float().contiguous()
    return out


VIDEO_LATENT_FRAMES = 2
_WAN21 = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
          "temperal_downsample": [False, True, True], "dropout": 0.0}  # ComfyUI's Wan 2.1 VAE config


def _write_video_vae(path: Path, seed: int) -> Path | None:
    """A Wan 2.1 VAE file with seeded weights: key names and shapes from the ComfyUI's own
    ``comfy.ldm.wan.vae.WanVAE`` (built on the meta device: no memory). None without it."""
    from safetensors.torch import save_file

    try:
        wan = importlib.import_module("comfy.ldm.wan.vae")
    except ImportError:
        return None
    with torch.device("meta"):
        shapes = wan.WanVAE(**_WAN21).state_dict()
    save_file(_random_like(shapes, seed=seed), str(path))
    return path


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def proxy_overhead_benchmark(repeats: int = 30, *, decode_size: int = 512, comfyui_root: str | None = None,
                             settings: Any = None) -> dict:
    """Median per-call time, proxy vs in-process, for a tiny CLIP encode and a VAE decode.

    Returns ``{"ok", "root", "device", "results": {name: {proxy_ms, in_process_ms,
    overhead_ms, ratio, repeats}}, "lines": [...]}``."""
    from safetensors.torch import save_file

    from luna_daemon.client import DaemonClient
    from luna_daemon.comfy_nodes import connection, proxies
    from luna_daemon.bench import daemon_process
    from luna_daemon.models.engines.comfy import ComfyEngine
    from luna_daemon.settings import Settings

    root = _find_root(comfyui_root, settings)
    with tempfile.TemporaryDirectory(prefix="luna-proxy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        daemon_settings = Settings.load(env={"LUNA_HOME": str(tmp / "home")}, overrides={
            "port": 0, "monitor_port": 0, "lock_port": 0, "engine": "comfy", "comfyui_root": str(root),
            "model_roots": [str(tmp / "models")], "log_level": "WARNING"})
        comfy = ComfyEngine(daemon_settings, root).prepare()  # imports comfy in this process (flags first)

        # ---- model files
        clip_cfg = json.loads((root / "comfy" / "sd1_clip_config.json").read_text(encoding="utf-8"))
        clip_path = tmp / "models" / "text_encoders" / "bench_clip_l.safetensors"
        vae_path = tmp / "models" / "vae" / "bench_vae.safetensors"
        clip_path.parent.mkdir(parents=True)
        vae_path.parent.mkdir(parents=True)
        save_file(_clip_l_state_dict(clip_cfg, seed=1), str(clip_path))
        t5_cfg = t5_config(root)
        t5_path = None
        if t5_cfg is not None and t5_parameters(t5_cfg) <= FLUX_T5_MAX_PARAMS:
            t5_path = tmp / "models" / "text_encoders" / "bench_t5xxl.safetensors"
            save_file(t5_state_dict(t5_cfg, seed=4), str(t5_path))
        # ComfyUI's own modules give the key names and shapes. Built from an empty state
        # dict on purpose, so ComfyUI's "Missing VAE keys" warning (every key) is muted.
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)
        try:
            with torch.inference_mode():
                built = comfy.sd.VAE(sd={}, config=_VAE_CONFIG)
        finally:
            root_logger.setLevel(level)
        save_file(_random_like(built.get_sd(), seed=2), str(vae_path))
        vae_path.with_suffix(".json").write_text(json.dumps(_VAE_CONFIG), encoding="utf-8")
        video_path = _write_video_vae(tmp / "models" / "vae" / "bench_wan21_vae.safetensors", seed=5)

        worker = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-prompt-worker")

        def on_worker(fn: Callable[[], Any]) -> Any:
            def job() -> Any:
                with torch.inference_mode():
                    return fn()
            return worker.submit(job).result()

        native_clip = on_worker(lambda: comfy.sd.load_clip(ckpt_paths=[str(clip_path)], embedding_directory=[]))
        native_vae = on_worker(lambda: comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)), config=_VAE_CONFIG))
        native_video = on_worker(lambda: comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(video_path)))) \
            if video_path else None
        flux_files = [str(clip_path), str(t5_path)]
        native_flux = on_worker(lambda: comfy.sd.load_clip(ckpt_paths=flux_files, embedding_directory=[],
                                                           clip_type=comfy.sd.CLIPType.FLUX)) if t5_path else None

        # The daemon runs in its own process, as in real use: same-process numbers would
        # include GIL hand-offs between the prompt worker and the daemon's threads.
        with daemon_process([str(tmp / "models")], {"LUNA_ENGINE": "comfy", "LUNA_COMFYUI_ROOT": str(root)}) as (port, token, _):
            client = DaemonClient("127.0.0.1", port, token=token, timeout=120)
            conn = connection.Connection(daemon_settings, client)
            try:
                proxy_clip = proxies.load_clip(conn, [str(clip_path)], "sd1")
                proxy_vae = proxies.load_vae(conn, str(vae_path))
                proxy_video = proxies.load_vae(conn, str(video_path)) if video_path else None
                proxy_flux = proxies.load_clip(conn, flux_files, "flux") if t5_path else None
                text = "a photo of a (red:1.2) cat riding a horse at night, highly detailed"
                side = max(8, int(decode_size) // 8)
                latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(3))
                # Wan 2.1: 2 latent frames -> 5 frames (4x causal), 8x8 -> 64x64 pixels.
                video_latent = torch.randn(1, 16, VIDEO_LATENT_FRAMES, 8, 8, generator=torch.Generator().manual_seed(4))

                def clip_call(c: Any) -> Callable[[], Any]:
                    return lambda: c.encode_from_tokens_scheduled(c.tokenize(text))

                def vae_call(v: Any) -> Callable[[], Any]:
                    return lambda: v.decode(latent)

                def flux_call(c: Any) -> Callable[[], Any]:
                    def encode() -> Any:  # what CLIPTextEncodeFlux does
                        tokens = c.tokenize(text)
                        tokens["t5xxl"] = c.tokenize(text)["t5xxl"]
                        return c.encode_from_tokens_scheduled(tokens, add_dict={"guidance": 3.5})
                    return encode

                cases = {"clip_encode": (clip_call(native_clip), clip_call(proxy_clip)),
                         "vae_decode": (vae_call(native_vae), vae_call(proxy_vae))}
                if proxy_video is not None:
                    cases["video_vae_decode"] = ((lambda: native_video.decode(video_latent)),
                                                 (lambda: proxy_video.decode(video_latent)))
                if proxy_flux is not None:
                    cases["flux_encode"] = (flux_call(native_flux), flux_call(proxy_flux))

                def measure() -> dict[str, tuple[list[float], list[float], float]]:
                    out = {}
                    for name, (native_fn, proxy_fn) in cases.items():
                        for _ in range(2):  # warm-up both sides
                            native_fn()
                            proxy_fn()
                        a, b = native_fn(), proxy_fn()
                        diff = _max_diff(a, b)
                        native_t: list[float] = []
                        proxy_t: list[float] = []
                        for i in range(max(1, int(repeats))):
                            order = (native_fn, proxy_fn) if i % 2 == 0 else (proxy_fn, native_fn)
                            for fn in order:
                                t0 = time.perf_counter()
                                fn()
                                dt = time.perf_counter() - t0
                                (native_t if fn is native_fn else proxy_t).append(dt)
                        out[name] = (native_t, proxy_t, diff)
                    return out

                raw = on_worker(measure)
            finally:
                client.close()
                worker.shutdown(wait=True)

    device = str(comfy.model_management.get_torch_device())
    results: dict[str, dict[str, Any]] = {}
    lines = [(f"proxy overhead vs in-process (ComfyUI at {root}, device {device}, {repeats} interleaved calls, "
              "medians, one prompt-worker thread, daemon in its own process)")]
    labels = {"clip_encode": f"CLIP tokenize+encode (hidden {clip_cfg['hidden_size']}, "
                             f"{clip_cfg['num_hidden_layers']} layers)",
              "vae_decode": f"VAE decode {side * 8}x{side * 8} (tiny KL VAE)",
              "video_vae_decode": f"Wan 2.1 VAE decode, {4 * VIDEO_LATENT_FRAMES - 3} frames 64x64 "
                                  f"(latent [1, 16, {VIDEO_LATENT_FRAMES}, 8, 8])"}
    if t5_cfg is not None and t5_path is not None:
        labels["flux_encode"] = (f"Flux text encode (CLIP-L + T5-XXL d_model {t5_cfg['d_model']}, "
                                 f"{t5_cfg['num_layers']} blocks, {t5_parameters(t5_cfg) / 1e6:.1f}M parameters, "
                                 "256 T5 tokens)")
    for name, (native_t, proxy_t, diff) in raw.items():
        n_ms, p_ms = _median_ms(native_t), _median_ms(proxy_t)
        results[name] = {"in_process_ms": n_ms, "proxy_ms": p_ms, "overhead_ms": p_ms - n_ms,
                         "ratio": p_ms / n_ms if n_ms else float("inf"), "repeats": len(proxy_t), "max_abs_diff": diff}
        lines.append(f"  {labels[name]}: in-process {n_ms:.2f} ms, proxy {p_ms:.2f} ms, overhead {p_ms - n_ms:+.2f} ms "
                     f"(x{results[name]['ratio']:.2f}), max |diff| {diff:.1e}")
    if video_path is None:
        lines.append("  Wan 2.1 VAE decode: left out (this ComfyUI has no comfy.ldm.wan.vae)")
    if t5_path is None:
        lines.append("  Flux text encode: left out (this ComfyUI's T5-XXL config is "
                     + ("missing" if t5_cfg is None else f"{t5_parameters(t5_cfg) / 1e9:.1f}B parameters") + ")")
    return {"ok": all(r["max_abs_diff"] <= 1e-5 for r in results.values()), "root": str(root), "device": device,
            "results": results, "lines": lines}


def _max_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over the tensors of two results (CONDITIONING lists or images)."""
    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (list, tuple)):
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict):
        return max((_max_diff(a[k], b[k]) for k in a if k in b), default=0.0)
    return 0.0
