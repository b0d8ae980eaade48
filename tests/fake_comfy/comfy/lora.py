"""Fake of ``comfy.lora``: LoRA key maps, ``load_lora`` and ``calculate_weight``."""

import logging

import torch

import comfy.model_management
from comfy import weight_adapter

LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def model_lora_keys_clip(model, key_map={}):
    """Map every LoRA naming convention for text encoders to a key of ``model.state_dict()``.

    Only the state dict's *keys* are used.
    """
    sdk = set(model.state_dict().keys())
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders.{}".format(k[:-len(".weight")])] = k

    clip_l_present = any(k.startswith("clip_l.transformer.text_model.encoder.layers.") for k in sdk)
    for b in range(32):
        for module, kohya in LORA_CLIP_MAP.items():
            for encoder in ("clip_h", "clip_l"):
                k = f"{encoder}.transformer.text_model.encoder.layers.{b}.{module}.weight"
                if k in sdk:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = k
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{module}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{module}.weight"
            if k in sdk:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{kohya}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{module}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{module}"] = k
                    key_map[f"lora_prior_te_text_model_encoder_layers_{b}_{kohya}"] = k

    k = "clip_g.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_prior_te_text_projection"] = k
        key_map["lora_te2_text_projection"] = k
    k = "clip_l.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_te1_text_projection"] = k
    return key_map


def model_lora_keys_unet(model, key_map={}):
    sdk = model.state_dict().keys()
    for k in sdk:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            stem = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_{}".format(stem.replace(".", "_"))] = k
            key_map[k[:-len(".weight")]] = k
    return key_map


def load_lora(lora, to_load, log_missing=True):
    """``{lora_prefix: model_key}`` + a LoRA state dict -> ``{model_key: patch}``."""
    patch_dict = {}
    loaded_keys = set()
    for prefix, model_key in to_load.items():
        alpha = None
        alpha_name = f"{prefix}.alpha"
        if alpha_name in lora:
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        dora_scale = None
        dora_name = f"{prefix}.dora_scale"
        if dora_name in lora:
            dora_scale = lora[dora_name]
            loaded_keys.add(dora_name)

        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(prefix, lora, alpha, dora_scale, loaded_keys)
            if adapter is not None:
                patch_dict[model_key] = adapter
                loaded_keys.update(adapter.loaded_keys)
                break

        bias_key = "{}.bias".format(model_key[:-len(".weight")]) if isinstance(model_key, str) and model_key.endswith(".weight") else None
        for suffix, target, kind in ((".w_norm", model_key, "diff"), (".b_norm", bias_key, "diff"),
                                     (".diff", model_key, "diff"), (".diff_b", bias_key, "diff"),
                                     (".set_weight", model_key, "set")):
            name = prefix + suffix
            if name in lora and target is not None:
                patch_dict[target] = (kind, (lora[name],))
                loaded_keys.add(name)

    if log_missing:
        for k in lora:
            if k not in loaded_keys:
                logging.warning(f"lora key not loaded: {k}")
    return patch_dict


def _identity(a):
    return a


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    """Apply ``[(strength_patch, patch, strength_model, offset, function), ...]`` to ``weight``
    (modified in place where possible; the result is returned)."""
    for strength, v, strength_model, offset, function in patches:
        if function is None:
            function = _identity
        target = weight.narrow(offset[0], offset[1], offset[2]) if offset is not None else weight
        if strength_model != 1.0:
            target *= strength_model

        if isinstance(v, list):
            base = comfy.model_management.cast_to_device(v[0][0], weight.device, intermediate_dtype, copy=True)
            v = (calculate_weight(v[1:], base, key, intermediate_dtype=intermediate_dtype),)

        if isinstance(v, weight_adapter.WeightAdapterBase):
            try:
                out = v.calculate_weight(target, key, strength, strength_model, offset, function,
                                         intermediate_dtype, original_weights)
            except Exception as e:  # noqa: BLE001 (logged and skipped, like ComfyUI)
                logging.error(f"ERROR {v.name} {key} {e}")
                continue
            if offset is None:
                weight = out
            elif out is not target:
                target.copy_(out)
            continue

        if len(v) == 1:
            kind, args = "diff", v
        else:
            kind, args = v[0], v[1]

        if kind == "diff":
            diff = args[0]
            if strength != 0.0:
                if diff.shape != target.shape:
                    logging.warning(f"WARNING SHAPE MISMATCH {key} WEIGHT NOT MERGED {diff.shape} != {target.shape}")
                else:
                    target += function(strength * comfy.model_management.cast_to_device(diff, target.device, target.dtype))
        elif kind == "set":
            target.copy_(function(args[0]).to(dtype=target.dtype, device=target.device))
        else:
            logging.warning(f"patch type not recognized {kind} {key}")
    return weight
