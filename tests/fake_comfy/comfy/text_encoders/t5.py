"""Fake of ``comfy.text_encoders.t5``: a T5 encoder stack in ComfyUI's state-dict layout.

Keys: ``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`` (block 0
also ``relative_attention_bias.weight``), ``encoder.block.N.layer.0.layer_norm.weight``,
``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`` (gated GELU),
``encoder.block.N.layer.1.layer_norm.weight``, ``encoder.final_layer_norm.weight``. RMS layer
norms, no attention scaling, bidirectional bucketed relative position bias from block 0 shared
by every block (umT5, ``model_type`` ``umt5``: a bias in every block). Written from the T5 paper's description; the sizes come from the config
(``t5_config_xxl.json`` here is tiny apart from d_model = 4096 and 24 blocks, which ComfyUI's
detection of a T5-XXL file looks at).
"""

import math

import torch
import torch.nn.functional as F


class T5LayerNorm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-6, dtype=None, device=None, operations=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight.to(device=x.device, dtype=x.dtype) * x


class T5DenseGatedActDense(torch.nn.Module):
    def __init__(self, model_dim, ff_dim, dtype, device, operations):
        super().__init__()
        self.wi_0 = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wi_1 = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wo = operations.Linear(ff_dim, model_dim, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(torch.nn.Module):
    def __init__(self, model_dim, ff_dim, eps, dtype, device, operations):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(model_dim, ff_dim, dtype, device, operations)
        self.layer_norm = T5LayerNorm(model_dim, eps, dtype=dtype, device=device)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Attention(torch.nn.Module):
    def __init__(self, model_dim, inner_dim, heads, relative_attention_bias, num_buckets, max_distance, dtype, device,
                 operations):
        super().__init__()
        self.q = operations.Linear(model_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.k = operations.Linear(model_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.v = operations.Linear(model_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.o = operations.Linear(inner_dim, model_dim, bias=False, dtype=dtype, device=device)
        self.num_heads = heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = None
        if relative_attention_bias:
            self.relative_attention_bias = operations.Embedding(num_buckets, heads, dtype=dtype, device=device)

    def _bucket(self, relative_position):
        """Bidirectional buckets: half per direction, exact for small distances, log-spaced
        up to ``max_distance``."""
        buckets = self.num_buckets // 2
        out = (relative_position > 0).to(torch.long) * buckets
        distance = relative_position.abs()
        exact = buckets // 2
        is_small = distance < exact
        large = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                         * (buckets - exact)).to(torch.long)
        large = torch.clamp(large, max=buckets - 1)
        return out + torch.where(is_small, distance, large)

    def position_bias(self, length, device, dtype):
        pos = torch.arange(length, dtype=torch.long, device=device)
        relative = pos[None, :] - pos[:, None]
        values = self.relative_attention_bias(self._bucket(relative), out_dtype=dtype)  # [T, T, H]
        return values.permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]

    def forward(self, x, mask=None, past_bias=None):
        b, t, _ = x.shape
        if self.relative_attention_bias is not None:
            past_bias = self.position_bias(t, x.device, x.dtype)
        bias = past_bias
        if mask is not None:
            bias = bias + mask
        head_dim = self.q.weight.shape[0] // self.num_heads

        def split(y):
            return y.view(b, t, self.num_heads, head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # T5: no 1/sqrt(d) scaling
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), past_bias


class T5LayerSelfAttention(torch.nn.Module):
    def __init__(self, model_dim, inner_dim, heads, relative_attention_bias, config, dtype, device, operations):
        super().__init__()
        self.SelfAttention = T5Attention(model_dim, inner_dim, heads, relative_attention_bias,
                                         config["relative_attention_num_buckets"],
                                         config["relative_attention_max_distance"], dtype, device, operations)
        self.layer_norm = T5LayerNorm(model_dim, config["layer_norm_epsilon"], dtype=dtype, device=device)

    def forward(self, x, mask=None, past_bias=None):
        out, past_bias = self.SelfAttention(self.layer_norm(x), mask=mask, past_bias=past_bias)
        return x + out, past_bias


class T5Block(torch.nn.Module):
    def __init__(self, config, relative_attention_bias, dtype, device, operations):
        super().__init__()
        d, inner = config["d_model"], config["d_kv"] * config["num_heads"]
        self.layer = torch.nn.ModuleList([
            T5LayerSelfAttention(d, inner, config["num_heads"], relative_attention_bias, config, dtype, device,
                                 operations),
            T5LayerFF(d, config["d_ff"], config["layer_norm_epsilon"], dtype, device, operations),
        ])

    def forward(self, x, mask=None, past_bias=None):
        x, past_bias = self.layer[0](x, mask, past_bias)
        return self.layer[1](x), past_bias


class T5Stack(torch.nn.Module):
    def __init__(self, config, dtype, device, operations):
        super().__init__()
        # T5: one relative position bias in block 0, shared; umT5: one per block.
        own_bias = config.get("model_type") == "umt5"
        self.block = torch.nn.ModuleList([T5Block(config, own_bias or i == 0, dtype, device, operations)
                                          for i in range(config["num_layers"])])
        self.final_layer_norm = T5LayerNorm(config["d_model"], config["layer_norm_epsilon"], dtype=dtype, device=device)

    def forward(self, x, attention_mask=None, intermediate_output=None, final_layer_norm_intermediate=True):
        mask = None
        if attention_mask is not None:
            # Additive key mask: masked positions get the lowest value of the dtype.
            keep = attention_mask.to(x.dtype).reshape(attention_mask.shape[0], 1, 1, attention_mask.shape[-1])
            mask = (1.0 - keep) * torch.finfo(x.dtype).min
        if intermediate_output is not None and intermediate_output < 0:
            intermediate_output = len(self.block) + intermediate_output
        intermediate = None
        past_bias = None
        for i, block in enumerate(self.block):
            x, past_bias = block(x, mask, past_bias)
            if i == intermediate_output:
                intermediate = x.clone()
        x = self.final_layer_norm(x)
        if intermediate is not None and final_layer_norm_intermediate:
            intermediate = self.final_layer_norm(intermediate)
        return x, intermediate


class T5(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        self.num_layers = config_dict["num_layers"]
        self.encoder = T5Stack(config_dict, dtype, device, operations)
        self.shared = operations.Embedding(config_dict["vocab_size"], config_dict["d_model"], dtype=dtype, device=device)
        self.dtype = dtype

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, embeddings):
        self.shared = embeddings

    def forward(self, input_ids=None, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=torch.float32, **kwargs):
        x = embeds if embeds is not None else self.shared(input_ids, out_dtype=dtype)
        x, intermediate = self.encoder(x.to(dtype), attention_mask=attention_mask,
                                       intermediate_output=intermediate_output,
                                       final_layer_norm_intermediate=final_layer_norm_intermediate)
        return x, intermediate, None, None
