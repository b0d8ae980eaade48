"""Fake of ``comfy.sd``: ``CLIP``, ``VAE``, ``CLIPType``, text-encoder detection and loading,
``load_lora_for_models`` and (SD1-only) checkpoint loading.

See ../README.md for what is modelled and what is simplified.
"""

import enum
import logging
import math

import torch

import comfy.diffusers_convert
import comfy.lora
import comfy.lora_convert
import comfy.model_patcher
import comfy.utils
from comfy import model_management, sd1_clip, sd2_clip, sdxl_clip
from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
from comfy.supported_models_base import ClipTarget

_KL_REGULARIZER = {"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"}
_ENCODER = "comfy.ldm.modules.diffusionmodules.model.Encoder"
_DECODER = "comfy.ldm.modules.diffusionmodules.model.Decoder"


# ------------------------------------------------------------------------------- LoRA


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)

    lora = comfy.lora_convert.convert_lora(lora)
    loaded = comfy.lora.load_lora(lora, key_map)

    new_modelpatcher = None
    k = ()
    if model is not None:
        new_modelpatcher = model.clone()
        k = new_modelpatcher.add_patches(loaded, strength_model)
    new_clip = None
    k1 = ()
    if clip is not None:
        new_clip = clip.clone()
        k1 = new_clip.add_patches(loaded, strength_clip)

    accepted = set(k) | set(k1)
    for x in loaded:
        if x not in accepted:
            logging.warning(f"NOT LOADED {x}")
    return (new_modelpatcher, new_clip)


# ------------------------------------------------------------------------------- CLIP


class CLIP:
    def __init__(self, target=None, embedding_directory=None, no_init=False, tokenizer_data={}, parameters=0,
                 model_options={}):
        if no_init:
            return
        params = target.params.copy()
        clip = target.clip
        tokenizer = target.tokenizer

        load_device = model_options.get("load_device", model_management.text_encoder_device())
        offload_device = model_options.get("offload_device", model_management.text_encoder_offload_device())
        dtype = model_options.get("dtype", None)
        if dtype is None:
            dtype = model_management.text_encoder_dtype(load_device)
        params["dtype"] = dtype
        params["device"] = model_options.get(
            "initial_device",
            model_management.text_encoder_initial_device(load_device, offload_device,
                                                         parameters * model_management.dtype_size(dtype)))
        params["model_options"] = model_options

        self.cond_stage_model = clip(**params)
        for dt in self.cond_stage_model.dtypes:
            if not model_management.supports_cast(load_device, dt):
                load_device = offload_device
                if params["device"] != offload_device:
                    self.cond_stage_model.to(offload_device)
                    logging.warning("Had to shift TE back.")

        self.tokenizer = tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device=load_device,
                                                        offload_device=offload_device)
        self.patcher.hook_mode = "MinVram"
        self.patcher.is_clip = True
        self.apply_hooks_to_conds = None
        if params["device"] == load_device:
            model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.layer_idx = None
        self.use_clip_schedule = False
        self.tokenizer_options = {}
        logging.info("CLIP/text encoder model load device: {}, offload device: {}, current: {}, dtype: {}".format(
            load_device, offload_device, params["device"], dtype))

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        n.tokenizer_options = self.tokenizer_options.copy()
        n.use_clip_schedule = self.use_clip_schedule
        n.apply_hooks_to_conds = self.apply_hooks_to_conds
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def set_tokenizer_option(self, option_name, value):
        self.tokenizer_options[option_name] = value

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def tokenize(self, text, return_word_ids=False, **kwargs):
        tokenizer_options = kwargs.get("tokenizer_options", {})
        if len(self.tokenizer_options) > 0:
            tokenizer_options = {**self.tokenizer_options, **tokenizer_options}
        if len(tokenizer_options) > 0:
            kwargs["tokenizer_options"] = tokenizer_options
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def add_hooks_to_dict(self, pooled_dict):
        if self.apply_hooks_to_conds:
            pooled_dict["hooks"] = self.apply_hooks_to_conds
        return pooled_dict

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        all_cond_pooled = []
        all_hooks = self.patcher.forced_hooks
        if all_hooks is None or not self.use_clip_schedule:
            return_pooled = "unprojected" if unprojected else True
            pooled_dict = self.encode_from_tokens(tokens, return_pooled=return_pooled, return_dict=True)
            cond = pooled_dict.pop("cond")
            pooled_dict.update(add_dict)
            all_cond_pooled.append([cond, pooled_dict])
            return all_cond_pooled
        raise NotImplementedError("the fake comfy does not implement scheduled CLIP hooks")

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        if return_pooled == "unprojected":
            self.cond_stage_model.set_clip_options({"projected_pooled": False})

        self.load_model()
        o = self.cond_stage_model.encode_token_weights(tokens)
        cond, pooled = o[:2]
        if return_dict:
            out = {"cond": cond, "pooled_output": pooled}
            if len(o) > 2:
                for k in o[2]:
                    out[k] = o[2][k]
            self.add_hooks_to_dict(out)
            return out
        if return_pooled:
            return cond, pooled
        return cond

    def encode(self, text):
        tokens = self.tokenize(text)
        return self.encode_from_tokens(tokens)

    def load_sd(self, sd, full_model=False):
        if full_model:
            return self.cond_stage_model.load_state_dict(sd, strict=False)
        return self.cond_stage_model.load_sd(sd)

    def get_sd(self):
        sd_clip = self.cond_stage_model.state_dict()
        sd_tokenizer = self.tokenizer.state_dict()
        for k in sd_tokenizer:
            sd_clip[k] = sd_tokenizer[k]
        return sd_clip

    def load_model(self):
        model_management.load_model_gpu(self.patcher)
        return self.patcher

    def get_key_patches(self):
        return self.patcher.get_key_patches()


class CLIPType(enum.Enum):
    STABLE_DIFFUSION = 1
    STABLE_CASCADE = 2
    SD3 = 3
    STABLE_AUDIO = 4
    HUNYUAN_DIT = 5
    FLUX = 6
    MOCHI = 7
    LTXV = 8
    HUNYUAN_VIDEO = 9
    PIXART = 10
    COSMOS = 11
    LUMINA2 = 12
    WAN = 13
    HIDREAM = 14
    CHROMA = 15
    ACE = 16
    OMNIGEN2 = 17
    QWEN_IMAGE = 18
    HUNYUAN_IMAGE = 19


class TEModel(enum.Enum):
    CLIP_L = 1
    CLIP_H = 2
    CLIP_G = 3
    T5_XXL = 4
    T5_XL = 5
    T5_BASE = 6
    LLAMA3_8 = 7
    T5_XXL_OLD = 8
    GEMMA_2_2B = 9
    QWEN25_3B = 10
    QWEN25_7B = 11
    BYT5_SMALL_GLYPH = 12
    GEMMA_3_4B = 13


def detect_te_model(sd):
    if "text_model.encoder.layers.30.mlp.fc1.weight" in sd:
        return TEModel.CLIP_G
    if "text_model.encoder.layers.22.mlp.fc1.weight" in sd:
        return TEModel.CLIP_H
    if "text_model.encoder.layers.0.mlp.fc1.weight" in sd:
        return TEModel.CLIP_L
    key = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"
    if key in sd:
        if sd[key].shape[-1] == 4096:
            return TEModel.T5_XXL
        if sd[key].shape[-1] == 2048:
            return TEModel.T5_XL
    if "encoder.block.23.layer.1.DenseReluDense.wi.weight" in sd:
        return TEModel.T5_XXL_OLD
    key = "encoder.block.0.layer.0.SelfAttention.k.weight"
    if key in sd:
        return TEModel.BYT5_SMALL_GLYPH if sd[key].shape[0] == 384 else TEModel.T5_BASE
    if "model.layers.0.post_feedforward_layernorm.weight" in sd:
        return TEModel.GEMMA_3_4B if "model.layers.0.self_attn.q_norm.weight" in sd else TEModel.GEMMA_2_2B
    key = "model.layers.0.self_attn.k_proj.bias"
    if key in sd:
        if sd[key].shape[0] == 256:
            return TEModel.QWEN25_3B
        if sd[key].shape[0] == 512:
            return TEModel.QWEN25_7B
    if "model.layers.0.post_attention_layernorm.weight" in sd:
        return TEModel.LLAMA3_8
    return None


def _not_in_fake(what):
    return NotImplementedError(f"the fake comfy package does not implement {what}")


def _model_options_long_clip(sd, tokenizer_data, model_options):
    """Long-CLIP files (248 positions) change the model's and tokenizer's max length."""
    for prefix, name in (("clip_l.", "clip_l"), ("", "clip_l"), ("clip_g.", "clip_g")):
        key = f"{prefix}text_model.embeddings.position_embedding.weight"
        if key in sd:
            positions = sd[key].shape[0]
            if positions != 77:
                model_options = {**model_options}
                config = dict(model_options.get(f"{name}_model_config", {}))
                config["max_position_embeddings"] = positions
                model_options[f"{name}_model_config"] = config
                tokenizer_data = {**tokenizer_data, f"{name}_max_length": positions}
            break
    return tokenizer_data, model_options


def _t5xxl_detect(clip_data):
    """T5 dtype facts of the first file holding a T5-XXL (comfy.sd's t5xxl_detect)."""
    from comfy.text_encoders import sd3_clip

    for sd in clip_data:
        if ("encoder.block.23.layer.1.DenseReluDense.wi_1.weight" in sd
                or "encoder.block.23.layer.1.DenseReluDense.wi.weight" in sd):
            return sd3_clip.t5_xxl_detect(sd)
    return {}


def _sd3_target(clip_target, clip_data, **parts):
    from comfy.text_encoders import sd3_clip

    clip_target.clip = sd3_clip.sd3_clip(**parts, **_t5xxl_detect(clip_data))
    clip_target.tokenizer = sd3_clip.SD3Tokenizer


def load_clip(ckpt_paths, embedding_directory=None, clip_type=CLIPType.STABLE_DIFFUSION, model_options={}):
    clip_data = []
    for p in ckpt_paths:
        clip_data.append(comfy.utils.load_torch_file(p, safe_load=True))
    return load_text_encoder_state_dicts(clip_data, embedding_directory=embedding_directory, clip_type=clip_type,
                                         model_options=model_options)


def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None, clip_type=CLIPType.STABLE_DIFFUSION,
                                  model_options={}):
    clip_data = list(state_dicts)
    for i, sd in enumerate(clip_data):
        if "transformer.resblocks.0.ln_1.weight" in sd:
            clip_data[i] = comfy.utils.clip_text_transformers_convert(dict(sd), "", "text_model.")
        elif "text_projection" in sd:
            sd = dict(sd)
            sd["text_projection.weight"] = sd["text_projection"].transpose(0, 1)
            clip_data[i] = sd

    tokenizer_data = {}
    clip_target = ClipTarget(None, None)
    if len(clip_data) == 1:
        te_model = detect_te_model(clip_data[0])
        if te_model == TEModel.CLIP_G:
            if clip_type == CLIPType.SD3:
                _sd3_target(clip_target, clip_data, clip_l=False, clip_g=True, t5=False)
            elif clip_type in (CLIPType.STABLE_CASCADE, CLIPType.HIDREAM):
                raise _not_in_fake(f"CLIP-G for {clip_type.name}")
            else:
                clip_target.clip = sdxl_clip.SDXLRefinerClipModel
                clip_target.tokenizer = sdxl_clip.SDXLTokenizer
        elif te_model == TEModel.CLIP_H:
            clip_target.clip = sd2_clip.SD2ClipModel
            clip_target.tokenizer = sd2_clip.SD2Tokenizer
        elif te_model == TEModel.T5_XXL and clip_type == CLIPType.SD3:
            _sd3_target(clip_target, clip_data, clip_l=False, clip_g=False, t5=True)
        elif te_model == TEModel.T5_XXL and clip_type in (CLIPType.PIXART, CLIPType.CHROMA):
            from comfy.text_encoders import pixart_t5

            clip_target.clip = pixart_t5.pixart_te(**_t5xxl_detect(clip_data))
            clip_target.tokenizer = pixart_t5.PixArtTokenizer
        elif te_model == TEModel.T5_XXL and clip_type == CLIPType.WAN:
            from comfy.text_encoders import wan

            clip_target.clip = wan.te(**_t5xxl_detect(clip_data))
            clip_target.tokenizer = wan.WanT5Tokenizer
            tokenizer_data["spiece_model"] = clip_data[0].get("spiece_model", None)
        elif te_model == TEModel.GEMMA_2_2B:
            from comfy.text_encoders import llama, lumina2

            clip_target.clip = lumina2.te(**llama.llama_detect(clip_data[0]))
            clip_target.tokenizer = lumina2.LuminaTokenizer
            tokenizer_data["spiece_model"] = clip_data[0].get("spiece_model", None)
        elif te_model == TEModel.QWEN25_7B and clip_type != CLIPType.HUNYUAN_IMAGE:
            from comfy.text_encoders import llama, qwen_image

            clip_target.clip = qwen_image.te(**llama.llama_detect(clip_data[0]))
            clip_target.tokenizer = qwen_image.QwenImageTokenizer
        elif te_model is not None and te_model != TEModel.CLIP_L:
            raise _not_in_fake(f"{te_model.name} text encoders for {clip_type.name}")
        else:
            if clip_type == CLIPType.SD3:
                _sd3_target(clip_target, clip_data, clip_l=True, clip_g=False, t5=False)
            elif clip_type == CLIPType.HIDREAM:
                raise _not_in_fake(f"CLIP-L for {clip_type.name}")
            else:
                clip_target.clip = sd1_clip.SD1ClipModel
                clip_target.tokenizer = sd1_clip.SD1Tokenizer
    elif len(clip_data) == 2:
        if clip_type == CLIPType.SD3:
            found = [detect_te_model(c) for c in clip_data]
            _sd3_target(clip_target, clip_data, clip_l=TEModel.CLIP_L in found, clip_g=TEModel.CLIP_G in found,
                        t5=TEModel.T5_XXL in found)
        elif clip_type == CLIPType.FLUX:
            from comfy.text_encoders import flux

            clip_target.clip = flux.flux_clip(**_t5xxl_detect(clip_data))
            clip_target.tokenizer = flux.FluxTokenizer
        elif clip_type in (CLIPType.HUNYUAN_DIT, CLIPType.HUNYUAN_VIDEO, CLIPType.HIDREAM, CLIPType.HUNYUAN_IMAGE):
            raise _not_in_fake(f"two-file {clip_type.name} text encoders")
        else:
            clip_target.clip = sdxl_clip.SDXLClipModel
            clip_target.tokenizer = sdxl_clip.SDXLTokenizer
    elif len(clip_data) == 3:
        # Three files are SD3 whatever the clip_type (TripleCLIPLoader passes none).
        _sd3_target(clip_target, clip_data)
    elif len(clip_data) == 4:
        raise _not_in_fake("HiDream (four text encoders)")
    else:
        raise ValueError("no text encoder state dicts given")

    parameters = 0
    for c in clip_data:
        parameters += sum(v.nelement() for v in c.values())
        tokenizer_data, model_options = _model_options_long_clip(c, tokenizer_data, model_options)

    clip = CLIP(clip_target, embedding_directory=embedding_directory, parameters=parameters,
                tokenizer_data=tokenizer_data, model_options=model_options)
    for c in clip_data:
        m, u = clip.load_sd(c)
        if len(m) > 0:
            logging.warning(f"clip missing: {m}")
        if len(u) > 0:
            logging.debug(f"clip unexpected: {u}")
    return clip


# -------------------------------------------------------------------------------- VAE


class VAE:
    def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        if sd is None:
            sd = {}
        if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:  # diffusers layout
            sd = comfy.diffusers_convert.convert_vae_state_dict(sd)

        self.memory_used_encode = lambda shape, dtype: (1767 * shape[2] * shape[3]) * model_management.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: (2178 * shape[2] * shape[3] * 64) * model_management.dtype_size(dtype)
        self.downscale_ratio = 8
        self.upscale_ratio = 8
        self.latent_channels = 4
        self.latent_dim = 2
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.disable_offload = False
        self.not_video = False
        self.crop_input = True
        self.extra_1d_channel = None
        self.downscale_index_formula = None
        self.upscale_index_formula = None

        if config is None:
            kind = self._detect(sd)
            if kind is None:
                logging.warning("WARNING: No VAE weights detected, VAE not initalized.")
                self.first_stage_model = None
                return
        else:
            self.first_stage_model = AutoencoderKL(**(config["params"]))
        self.first_stage_model = self.first_stage_model.eval()

        m, u = self.first_stage_model.load_state_dict(sd, strict=False)
        if len(m) > 0:
            logging.warning(f"Missing VAE keys {m}")
        if len(u) > 0:
            logging.debug(f"Leftover VAE keys {u}")

        if device is None:
            device = model_management.vae_device()
        self.device = device
        offload_device = model_management.vae_offload_device()
        if dtype is None:
            dtype = model_management.vae_dtype(self.device, self.working_dtypes)
        self.vae_dtype = dtype
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = model_management.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=offload_device)
        logging.info(f"VAE load device: {self.device}, offload device: {offload_device}, dtype: {self.vae_dtype}")

    def _detect(self, sd):
        """Pick the model from signature keys (first match wins); None = invalid."""
        unimplemented = (
            ("decoder.mid.block_1.mix_factor", "the SVD temporal decoder"),
            ("taesd_decoder.1.weight", "TAESD"),
            ("vquantizer.codebook.weight", "Stable Cascade stage A"),
            ("backbone.1.0.block.0.1.num_batches_tracked", "Stable Cascade stage C"),
            ("blocks.11.num_batches_tracked", "the Stable Cascade previewer"),
            ("encoder.backbone.1.0.block.0.1.num_batches_tracked", "Stable Cascade stage C"),
        )
        for key, what in unimplemented:
            if key in sd:
                raise _not_in_fake(f"{what} VAEs")
        if "decoder.conv_in.weight" in sd:
            z_channels = sd["decoder.conv_in.weight"].shape[1]
            if z_channels == 64:
                return self._family("hunyuan_image", sd)
            if z_channels == 32:
                raise _not_in_fake("the HunyuanImage refiner VAE")
            ddconfig = {"double_z": True, "z_channels": z_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                        "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                        "dropout": 0.0}
            if "encoder.down.2.downsample.conv.weight" not in sd and "decoder.up.3.upsample.conv.weight" not in sd:
                ddconfig["ch_mult"] = [1, 2, 4]  # the SD x4 upscaler's VAE
                self.downscale_ratio = 4
                self.upscale_ratio = 4
            self.latent_channels = z_channels
            if "post_quant_conv.weight" in sd:
                self.first_stage_model = AutoencoderKL(ddconfig=ddconfig, embed_dim=sd["post_quant_conv.weight"].shape[1])
            else:
                self.first_stage_model = AutoencodingEngine(
                    regularizer_config=_KL_REGULARIZER,
                    encoder_config={"target": _ENCODER, "params": ddconfig},
                    decoder_config={"target": _DECODER, "params": ddconfig})
            return "kl"
        # In ComfyUI's order: the first signature key present decides.
        video_or_audio = (
            ("decoder.layers.1.layers.0.beta", "Stable Audio"),
            ("blocks.2.blocks.3.stack.5.weight", "Mochi"),
            ("decoder.up_blocks.0.res_blocks.0.conv1.conv.weight", "ltxv"),
            ("decoder.conv_in.conv.weight", "hunyuan_video"),
            ("decoder.unpatcher3d.wavelets", "Cosmos"),
            ("decoder.middle.0.residual.0.gamma", "wan"),
            ("geo_decoder.cross_attn_decoder.ln_1.bias", "Hunyuan3D"),
            ("vocoder.backbone.channel_layers.0.0.bias", "ACE-Step"),
        )
        for key, what in video_or_audio:
            if key in sd:
                if what == "ltxv":
                    return self._family("ltxv", sd)
                if what == "hunyuan_video":
                    if sd[key].shape[1] == 32:
                        raise _not_in_fake("the HunyuanImage refiner VAE")
                    return self._family("hunyuan_video", sd)
                if what == "wan":
                    wan22 = "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd
                    return self._family("wan2.2" if wan22 else "wan2.1", sd)
                raise _not_in_fake(f"{what} VAEs")
        if "pixel_space_vae" in sd:
            self.first_stage_model = _PixelspaceConversionVAE()
            self.memory_used_encode = lambda shape, dtype: shape[1] * shape[2] * shape[3] * model_management.dtype_size(dtype)
            self.memory_used_decode = self.memory_used_encode
            self.downscale_ratio = 1
            self.upscale_ratio = 1
            self.latent_channels = 3
            self.process_input = lambda image: image
            self.process_output = lambda image: image
            return "pixel_space"
        if "vocoder.activation_post.downsample.lowpass.filter" in sd:
            raise _not_in_fake("MMAudio VAEs")
        return None

    def _family(self, name, sd):
        """Set the attributes ComfyUI gives family ``name`` and build its (tiny) model."""
        fam = _FAMILIES[name]
        k, s = fam["ratio"]
        self.latent_channels = fam["channels"]
        self.working_dtypes = list(fam["dtypes"])
        self.memory_used_encode, self.memory_used_decode = fam["memory"]
        if k is None:  # an image VAE with a large ratio
            self.downscale_ratio = self.upscale_ratio = s
            self.latent_dim = 2
        else:
            self.latent_dim = 3
            self.upscale_ratio = (lambda a, k=k: max(0, a * k - (k - 1)), s, s)
            self.downscale_ratio = (lambda a, k=k: max(0, math.floor((a + k - 1) / k)), s, s)
            self.upscale_index_formula = self.downscale_index_formula = (k, s, s)
        self.first_stage_model = fam["build"](sd)
        return name

    def throw_exception_if_invalid(self):
        if self.first_stage_model is None:
            raise RuntimeError("ERROR: VAE is invalid: None\n\nIf the VAE is from a checkpoint loader node your "
                               "checkpoint does not contain a valid VAE.")

    # ---------------------------------------------------------------- geometry

    def spacial_compression_decode(self):
        try:
            return self.upscale_ratio[-1]
        except TypeError:
            return self.upscale_ratio

    def spacial_compression_encode(self):
        try:
            return self.downscale_ratio[-1]
        except TypeError:
            return self.downscale_ratio

    def temporal_compression_decode(self):
        try:
            return round(self.upscale_ratio[0](8192) / 8192)
        except TypeError:
            return None

    def vae_encode_crop_pixels(self, pixels):
        if not self.crop_input:
            return pixels
        ratio = self.spacial_compression_encode()
        spatial = pixels.shape[1:-1]
        for d, size in enumerate(spatial):
            keep = (size // ratio) * ratio
            if keep != size:
                pixels = pixels.narrow(d + 1, (size % ratio) // 2, keep)
        return pixels

    # ------------------------------------------------------------------ tiled

    def decode_tiled_(self, samples, tile_x=64, tile_y=64, overlap=16):
        steps = samples.shape[0] * comfy.utils.get_tiled_scale_steps(samples.shape[3], samples.shape[2], tile_x, tile_y, overlap)
        steps += samples.shape[0] * comfy.utils.get_tiled_scale_steps(samples.shape[3], samples.shape[2], tile_x // 2, tile_y * 2, overlap)
        steps += samples.shape[0] * comfy.utils.get_tiled_scale_steps(samples.shape[3], samples.shape[2], tile_x * 2, tile_y // 2, overlap)
        pbar = comfy.utils.ProgressBar(steps)

        def decode_fn(a):
            return self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device)).float()

        passes = [(tile_x, tile_y), (tile_x // 2, tile_y * 2), (tile_x * 2, tile_y // 2)]
        total = None
        for tx, ty in passes:
            out = comfy.utils.tiled_scale(samples, decode_fn, tx, ty, overlap, upscale_amount=self.upscale_ratio,
                                          out_channels=self.output_channels, output_device=self.output_device,
                                          pbar=pbar)
            total = out if total is None else total + out
        return self.process_output(total / 3.0)

    def encode_tiled_(self, pixel_samples, tile_x=512, tile_y=512, overlap=64):
        steps = pixel_samples.shape[0] * comfy.utils.get_tiled_scale_steps(pixel_samples.shape[3], pixel_samples.shape[2], tile_x, tile_y, overlap)
        steps += pixel_samples.shape[0] * comfy.utils.get_tiled_scale_steps(pixel_samples.shape[3], pixel_samples.shape[2], tile_x // 2, tile_y * 2, overlap)
        steps += pixel_samples.shape[0] * comfy.utils.get_tiled_scale_steps(pixel_samples.shape[3], pixel_samples.shape[2], tile_x * 2, tile_y // 2, overlap)
        pbar = comfy.utils.ProgressBar(steps)

        def encode_fn(a):
            return self.first_stage_model.encode(self.process_input(a).to(self.vae_dtype).to(self.device)).float()

        passes = [(tile_x, tile_y), (tile_x // 2, tile_y * 2), (tile_x * 2, tile_y // 2)]
        total = None
        for tx, ty in passes:
            out = comfy.utils.tiled_scale(pixel_samples, encode_fn, tx, ty, overlap,
                                          upscale_amount=(1 / self.downscale_ratio), out_channels=self.latent_channels,
                                          output_device=self.output_device, pbar=pbar)
            total = out if total is None else total + out
        return total / 3.0

    # ------------------------------------------------------------------ calls

    def decode(self, samples_in, vae_options={}):
        self.throw_exception_if_invalid()
        pixel_samples = None
        try:
            memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                             force_full_load=self.disable_offload)
            free_memory = model_management.get_free_memory(self.device)
            batch_number = max(1, int(free_memory / max(1, memory_used)))
            for x in range(0, samples_in.shape[0], batch_number):
                samples = samples_in[x:x + batch_number].to(self.vae_dtype).to(self.device)
                out = self.process_output(self.first_stage_model.decode(samples, **vae_options).to(self.output_device).float())
                if pixel_samples is None:
                    pixel_samples = torch.empty((samples_in.shape[0],) + tuple(out.shape[1:]), device=self.output_device)
                pixel_samples[x:x + batch_number] = out
        except model_management.OOM_EXCEPTION:
            logging.warning("Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding.")
            if samples_in.ndim == 5:
                tile = 256 // self.spacial_compression_decode()
                pixel_samples = self.decode_tiled_3d(samples_in, tile_x=tile, tile_y=tile, overlap=(1, tile // 4, tile // 4))
            else:
                pixel_samples = self.decode_tiled_(samples_in)
        return pixel_samples.to(self.output_device).movedim(1, -1)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        self.throw_exception_if_invalid()
        memory_used = self.memory_used_decode(samples.shape, self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used)
        dims = samples.ndim - 2
        args = {}
        if tile_x is not None:
            args["tile_x"] = tile_x
        if tile_y is not None:
            args["tile_y"] = tile_y
        if overlap is not None:
            args["overlap"] = overlap
        if dims == 2:
            output = self.decode_tiled_(samples, **args)
        elif dims == 3:
            args["overlap"] = (1 if overlap_t is None else max(1, overlap_t), overlap, overlap)
            if tile_t is not None:
                args["tile_t"] = max(2, tile_t)
            output = self.decode_tiled_3d(samples, **args)
        else:
            raise _not_in_fake(f"{dims}-D tiled decoding")
        return output.movedim(1, -1)

    def decode_tiled_3d(self, samples, tile_t=999, tile_x=32, tile_y=32, overlap=(1, 8, 8)):
        def decode_fn(a):
            return self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device)).float()

        return self.process_output(comfy.utils.tiled_scale_multidim(
            samples, decode_fn, tile=(tile_t, tile_x, tile_y), overlap=overlap, upscale_amount=self.upscale_ratio,
            out_channels=self.output_channels, index_formulas=self.upscale_index_formula,
            output_device=self.output_device))

    def encode_tiled_3d(self, samples, tile_t=9999, tile_x=512, tile_y=512, overlap=(1, 64, 64)):
        def encode_fn(a):
            return self.first_stage_model.encode(self.process_input(a).to(self.vae_dtype).to(self.device)).float()

        return comfy.utils.tiled_scale_multidim(
            samples, encode_fn, tile=(tile_t, tile_x, tile_y), overlap=overlap, upscale_amount=self.downscale_ratio,
            out_channels=self.latent_channels, downscale=True, index_formulas=self.downscale_index_formula,
            output_device=self.output_device)

    def encode(self, pixel_samples):
        self.throw_exception_if_invalid()
        pixel_samples = self.vae_encode_crop_pixels(pixel_samples)
        pixel_samples = pixel_samples.movedim(-1, 1)
        if self.latent_dim == 3 and pixel_samples.ndim < 5:
            # A batch of frames is one clip [1, C, T, H, W] (not_video VAEs: T images of one frame).
            pixel_samples = pixel_samples.unsqueeze(2) if self.not_video else pixel_samples.movedim(1, 0).unsqueeze(0)
        samples = None
        try:
            memory_used = self.memory_used_encode(pixel_samples.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                             force_full_load=self.disable_offload)
            free_memory = model_management.get_free_memory(self.device)
            batch_number = max(1, int(free_memory / max(1, memory_used)))
            for x in range(0, pixel_samples.shape[0], batch_number):
                pixels_in = self.process_input(pixel_samples[x:x + batch_number]).to(self.vae_dtype).to(self.device)
                out = self.first_stage_model.encode(pixels_in).to(self.output_device).float()
                if samples is None:
                    samples = torch.empty((pixel_samples.shape[0],) + tuple(out.shape[1:]), device=self.output_device)
                samples[x:x + batch_number] = out
        except model_management.OOM_EXCEPTION:
            logging.warning("Ran out of memory when regular VAE encoding, retrying with tiled VAE encoding.")
            if self.latent_dim == 3:
                samples = self.encode_tiled_3d(pixel_samples, tile_x=256, tile_y=256, overlap=(1, 64, 64))
            else:
                samples = self.encode_tiled_(pixel_samples)
        return samples

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        self.throw_exception_if_invalid()
        pixel_samples = self.vae_encode_crop_pixels(pixel_samples)
        dims = self.latent_dim
        pixel_samples = pixel_samples.movedim(-1, 1)
        if dims == 3:
            pixel_samples = pixel_samples.unsqueeze(2) if self.not_video else pixel_samples.movedim(1, 0).unsqueeze(0)
        memory_used = self.memory_used_encode(pixel_samples.shape, self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                         force_full_load=self.disable_offload)
        args = {}
        if tile_x is not None:
            args["tile_x"] = tile_x
        if tile_y is not None:
            args["tile_y"] = tile_y
        if overlap is not None:
            args["overlap"] = overlap
        if dims == 2:
            samples = self.encode_tiled_(pixel_samples, **args)
        elif dims == 3:
            # Temporal sizes arrive in frames: rounded to what the VAE can represent
            # (1 + k*n frames), and the clip is cut to such a length too.
            tile_t_latent = 9999 if tile_t is None else max(2, self.downscale_ratio[0](tile_t))
            args["tile_t"] = self.upscale_ratio[0](tile_t_latent)
            if overlap_t is None:
                args["overlap"] = (1, overlap, overlap)
            else:
                t_over = max(1, min(tile_t_latent // 2, self.downscale_ratio[0](overlap_t)))
                args["overlap"] = (self.upscale_ratio[0](t_over), overlap, overlap)
            frames = self.upscale_ratio[0](self.downscale_ratio[0](pixel_samples.shape[2]))
            samples = self.encode_tiled_3d(pixel_samples[:, :, :frames], **args)
        else:
            raise _not_in_fake(f"{dims}-D tiled encoding")
        return samples

    def get_sd(self):
        return self.first_stage_model.state_dict()


def _build(module, cls, **kwargs):
    def build(sd):
        import importlib

        return getattr(importlib.import_module(module), cls)(**kwargs)

    return build


def _ltxv(sd):
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import SIGNATURE, VideoVAE

    width = sd[SIGNATURE].shape[0]
    version = 0 if width == 512 else (2 if "encoder.down_blocks.1.conv.conv.bias" in sd else 1)
    return VideoVAE(version=version)


def _memory(coef_encode, encode_dims, coef_decode, decode_dims, floor_t=None):
    """ComfyUI's estimates: a coefficient times the sizes at ``*_dims`` of the shape, times
    the dtype size (``floor_t``: the encode's frame count is taken as at least that)."""
    def size(shape, dims, floor=None):
        out = 1
        for d in dims:
            out *= max(shape[d], floor) if (floor is not None and d == 2) else shape[d]
        return out

    return (lambda shape, dtype: coef_encode * size(shape, encode_dims, floor_t) * model_management.dtype_size(dtype),
            lambda shape, dtype: coef_decode * size(shape, decode_dims) * model_management.dtype_size(dtype))


_BF16_FP16_FP32 = (torch.bfloat16, torch.float16, torch.float32)
# What ComfyUI 0.3.64's VAE gives each family (ratio = (temporal k or None, spatial s)).
_FAMILIES = {
    "wan2.1": {"channels": 16, "ratio": (4, 8), "dtypes": _BF16_FP16_FP32,
               "memory": _memory(6000, (3, 4), 7000 * 8 * 8, (3, 4)), "build": _build("comfy.ldm.wan.vae", "WanVAE")},
    "wan2.2": {"channels": 48, "ratio": (4, 16), "dtypes": _BF16_FP16_FP32,
               "memory": _memory(3300, (3, 4), 8000 * 16 * 16, (3, 4)),
               "build": _build("comfy.ldm.wan.vae2_2", "WanVAE")},
    "hunyuan_video": {"channels": 16, "ratio": (4, 8), "dtypes": _BF16_FP16_FP32,
                      "memory": _memory(900, (2, 3, 4), 1500 * 4 * 8 * 8, (2, 3, 4), floor_t=2),
                      "build": _build("comfy.ldm.hunyuan_video.causal_kl", "HunyuanVideoVAE")},
    "ltxv": {"channels": 128, "ratio": (8, 32), "dtypes": (torch.bfloat16, torch.float32),
             "memory": _memory(70, (2, 3, 4), 900 * 8 * 8 * 8, (2, 3, 4), floor_t=7), "build": _ltxv},
    "hunyuan_image": {"channels": 64, "ratio": (None, 32), "dtypes": (torch.float16, torch.bfloat16, torch.float32),
                      "memory": _memory(700, (2, 3), 700 * 32 * 32, (2, 3)),
                      "build": _build("comfy.ldm.hunyuan_video.vae", "HunyuanImageVAE")},
}


class _PixelspaceConversionVAE(torch.nn.Module):
    """The pixel-space "VAE": latents are the pixels (in -1..1)."""

    def __init__(self):
        super().__init__()
        self.pixel_space_vae = torch.nn.Parameter(torch.tensor(1.0))

    def encode(self, x):
        return x

    def decode(self, x):
        return x


# ----------------------------------------------------------------------- checkpoints


class _OpaqueDiffusionModel(torch.nn.Module):
    """Stands in for the UNet of a checkpoint: the fake cannot sample, it only keeps the
    ``diffusion_model.*`` tensors so key maps and ``add_patches`` see the real key names."""

    def __init__(self, unet_sd):
        super().__init__()
        self._unet_sd = unet_sd

    def state_dict(self, *args, **kwargs):
        return {"diffusion_model." + k: v for k, v in self._unet_sd.items()}


def load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True, output_clipvision=False,
                                 embedding_directory=None, output_model=True, model_options={}, te_model_options={}):
    sd, metadata = comfy.utils.load_torch_file(ckpt_path, return_metadata=True)
    out = load_state_dict_guess_config(sd, output_vae, output_clip, output_clipvision, embedding_directory,
                                       output_model, model_options, te_model_options=te_model_options,
                                       metadata=metadata)
    if out is None:
        raise RuntimeError(f"ERROR: Could not detect model type of: {ckpt_path}")
    return out


def load_state_dict_guess_config(sd, output_vae=True, output_clip=True, output_clipvision=False,
                                 embedding_directory=None, output_model=True, model_options={}, te_model_options={},
                                 metadata=None):
    """SD1 checkpoints only (UNet key ``model.diffusion_model.input_blocks.0.0.weight`` with a
    ``cond_stage_model.transformer.`` text encoder); everything else is "not detected"."""
    if "model.diffusion_model.input_blocks.0.0.weight" not in sd:
        return None
    if not any(k.startswith("cond_stage_model.transformer.") for k in sd):
        raise _not_in_fake("checkpoints other than SD1")

    model_patcher = None
    if output_model:
        unet_sd = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        load_device = model_management.get_torch_device()
        model_patcher = comfy.model_patcher.ModelPatcher(_OpaqueDiffusionModel(unet_sd), load_device=load_device,
                                                         offload_device=model_management.unet_offload_device())

    vae = None
    if output_vae:
        vae_sd = comfy.utils.state_dict_prefix_replace(dict(sd), {"first_stage_model.": ""}, filter_keys=True)
        vae = VAE(sd=vae_sd, metadata=metadata)

    clip = None
    if output_clip:
        clip_sd = {"clip_l.transformer." + k[len("cond_stage_model.transformer."):]: v
                   for k, v in sd.items() if k.startswith("cond_stage_model.transformer.")}
        target = ClipTarget(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel)
        target.params = {"clip_model": sd1_clip.SD1CheckpointClipModel}
        parameters = sum(v.nelement() for v in clip_sd.values())
        clip = CLIP(target, embedding_directory=embedding_directory, parameters=parameters,
                    model_options=te_model_options)
        m, u = clip.load_sd(clip_sd, full_model=True)
        m = [k for k in m if not k.endswith((".text_projection.weight", ".logit_scale"))]
        if len(m) > 0:
            logging.warning(f"clip missing: {m}")
        if len(u) > 0:
            logging.debug(f"clip unexpected {u}:")
    return (model_patcher, clip, vae, None)

