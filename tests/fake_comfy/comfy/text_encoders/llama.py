"""Fake of ``comfy.text_encoders.llama``: a tiny Qwen2.5-VL-style text decoder with an image
input, in ComfyUI's key layout for Qwen2.5-VL 7B text encoders.

Keys: ``model.embed_tokens.weight``, ``model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}``,
``model.layers.N.self_attn.o_proj.weight``, ``model.layers.N.mlp.{gate,up,down}_proj.weight``,
``model.layers.N.{input,post_attention}_layernorm.weight``, ``model.norm.weight``, and the
image stand-in ``visual.patch_embed.proj.weight``. ComfyUI detects the 7B model by
``k_proj.bias`` having 512 entries, so the attention keeps 4 heads of 128 while the hidden
size is 32. Causal attention with rotary positions; padding keys masked by the attention mask.

Simplification (not Qwen's vision tower): an image token ``{"type": "image", "data": IMAGE}``
becomes 4 embeddings, the image average-pooled to 2×2 and projected from RGB.
"""

import torch
import torch.nn.functional as F

QWEN25_7B_TINY = {"vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
                  "rope_theta": 1000000.0, "image_tokens": 4}


def llama_detect(state_dict, prefix=""):
    """``{"dtype_llama": <dtype of model.norm.weight>}`` (ComfyUI's llama_detect)."""
    out = {}
    key = f"{prefix}model.norm.weight"
    if key in state_dict:
        out["dtype_llama"] = state_dict[key].dtype
    if f"{prefix}scaled_fp8" in state_dict:
        out["llama_scaled_fp8"] = state_dict[f"{prefix}scaled_fp8"].dtype
    return out


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps, dtype=None, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(device=x.device, dtype=x.dtype) * x


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(torch.nn.Module):
    def __init__(self, config, dtype, device, operations):
        super().__init__()
        h, heads, kv, hd = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
        self.heads, self.kv_heads, self.head_dim = heads, kv, hd
        self.q_proj = operations.Linear(h, heads * hd, bias=True, dtype=dtype, device=device)
        self.k_proj = operations.Linear(h, kv * hd, bias=True, dtype=dtype, device=device)
        self.v_proj = operations.Linear(h, kv * hd, bias=True, dtype=dtype, device=device)
        self.o_proj = operations.Linear(heads * hd, h, bias=False, dtype=dtype, device=device)

    def forward(self, x, mask, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(torch.nn.Module):
    def __init__(self, config, dtype, device, operations):
        super().__init__()
        h, i = config["hidden_size"], config["intermediate_size"]
        self.gate_proj = operations.Linear(h, i, bias=False, dtype=dtype, device=device)
        self.up_proj = operations.Linear(h, i, bias=False, dtype=dtype, device=device)
        self.down_proj = operations.Linear(i, h, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(torch.nn.Module):
    def __init__(self, config, dtype, device, operations):
        super().__init__()
        self.self_attn = Attention(config, dtype, device, operations)
        self.mlp = MLP(config, dtype, device, operations)
        self.input_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"], dtype, device)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"], dtype, device)

    def forward(self, x, mask, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), mask, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama2_(torch.nn.Module):
    def __init__(self, config, dtype, device, operations):
        super().__init__()
        self.config = config
        self.embed_tokens = operations.Embedding(config["vocab_size"], config["hidden_size"], dtype=dtype, device=device)
        self.layers = torch.nn.ModuleList([DecoderLayer(config, dtype, device, operations)
                                           for _ in range(config["num_hidden_layers"])])
        self.norm = RMSNorm(config["hidden_size"], config["rms_norm_eps"], dtype, device)

    def forward(self, x, attention_mask=None, intermediate_output=None, final_layer_norm_intermediate=True):
        b, t, _ = x.shape
        hd = self.config["head_dim"]
        inv_freq = 1.0 / (self.config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
        freqs = torch.outer(torch.arange(t, dtype=torch.float32, device=x.device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        mask = mask.reshape(1, 1, t, t)
        if attention_mask is not None:
            keep = attention_mask.to(x.dtype).reshape(b, 1, 1, t)
            mask = mask + (1.0 - keep) * torch.finfo(x.dtype).min
        if intermediate_output is not None and intermediate_output < 0:
            intermediate_output = len(self.layers) + intermediate_output
        intermediate = None
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, cos, sin)
            if i == intermediate_output:
                intermediate = x.clone()
        x = self.norm(x)
        if intermediate is not None and final_layer_norm_intermediate:
            intermediate = self.norm(intermediate)
        return x, intermediate


class Visual(torch.nn.Module):
    """The image stand-in: [B, H, W, 3] -> 4 embeddings (2×2 average pool, RGB projection)."""

    def __init__(self, config, dtype, device, operations):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = operations.Linear(3, config["hidden_size"], bias=False, dtype=dtype, device=device)

    def forward(self, image):
        pooled = F.adaptive_avg_pool2d(image[:1, :, :, :3].movedim(-1, 1).float(), 2)  # [1, 3, 2, 2]
        return self.patch_embed.proj(pooled.flatten(2).transpose(1, 2)[0])  # [4, hidden]


class Qwen25_7BVLI(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        config = {**QWEN25_7B_TINY, **config_dict}
        self.num_layers = config["num_hidden_layers"]
        self.model = Llama2_(config, dtype, device, operations)
        self.visual = Visual(config, dtype, device, operations)
        self.dtype = dtype

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, embeddings):
        self.model.embed_tokens = embeddings

    def preprocess_embed(self, embed, device):
        """An ``{"type": "image", "data": IMAGE}`` token -> its embeddings [n, hidden]."""
        if embed.get("type") != "image":
            return None
        return self.visual(embed["data"].to(device))

    def forward(self, input_ids=None, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=torch.float32, **kwargs):
        x = embeds if embeds is not None else self.model.embed_tokens(input_ids, out_dtype=dtype)
        x, intermediate = self.model(x.to(dtype), attention_mask=attention_mask,
                                     intermediate_output=intermediate_output,
                                     final_layer_norm_intermediate=final_layer_norm_intermediate)
        return x, intermediate, None, None


# ------------------------------------------------------------------------- Gemma 2 (Lumina2)
# ComfyUI's Gemma2_2B in its key layout: ``model.embed_tokens.weight``, per layer
# ``self_attn.{q,k,v,o}_proj.weight`` (no biases; grouped key/value heads),
# ``mlp.{gate,up,down}_proj.weight`` (tanh-GELU gate), four norms ``input_layernorm``,
# ``post_attention_layernorm``, ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``
# (RMS norms scaling by ``1 + weight``), ``model.norm.weight``; the input embeddings are
# multiplied by sqrt(hidden). ComfyUI detects Gemma 2 by ``post_feedforward_layernorm``.
# Tiny sizes (hidden 32, 3 layers) instead of 2304 / 26.
GEMMA2_2B_TINY = {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "rms_norm_eps": 1e-6,
                  "rope_theta": 10000.0}


class GemmaRMSNorm(RMSNorm):
    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (1.0 + self.weight.to(device=x.device, dtype=x.dtype)) * x


class GemmaAttention(Attention):
    def __init__(self, config, dtype, device, operations):
        super().__init__(config, dtype, device, operations)
        h, heads, kv, hd = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
        self.q_proj = operations.Linear(h, heads * hd, bias=False, dtype=dtype, device=device)
        self.k_proj = operations.Linear(h, kv * hd, bias=False, dtype=dtype, device=device)
        self.v_proj = operations.Linear(h, kv * hd, bias=False, dtype=dtype, device=device)

    def forward(self, x, mask, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class GemmaMLP(MLP):
    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma2Layer(torch.nn.Module):
    def __init__(self, config, dtype, device, operations):
        super().__init__()
        h, eps = config["hidden_size"], config["rms_norm_eps"]
        self.self_attn = GemmaAttention(config, dtype, device, operations)
        self.mlp = GemmaMLP(config, dtype, device, operations)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(h, eps, dtype, device))

    def forward(self, x, mask, cos, sin):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(Llama2_):
    def __init__(self, config, dtype, device, operations):
        super().__init__(config, dtype, device, operations)
        self.layers = torch.nn.ModuleList([Gemma2Layer(config, dtype, device, operations)
                                           for _ in range(config["num_hidden_layers"])])
        self.norm = GemmaRMSNorm(config["hidden_size"], config["rms_norm_eps"], dtype, device)


class Gemma2_2B(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        config = {**GEMMA2_2B_TINY, **config_dict}
        self.num_layers = config["num_hidden_layers"]
        self.model = Gemma2Model(config, dtype, device, operations)
        self.hidden_size = config["hidden_size"]
        self.dtype = dtype

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, embeddings):
        self.model.embed_tokens = embeddings

    def forward(self, input_ids=None, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=torch.float32, **kwargs):
        x = embeds if embeds is not None else self.model.embed_tokens(input_ids, out_dtype=dtype)
        x = x.to(dtype) * self.hidden_size ** 0.5
        x, intermediate = self.model(x, attention_mask=attention_mask, intermediate_output=intermediate_output,
                                     final_layer_norm_intermediate=final_layer_norm_intermediate)
        return x, intermediate, None, None
