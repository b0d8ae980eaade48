"""Fake of ``comfy.clip_model``: ComfyUI's own CLIP text transformer.

State-dict keys follow the Hugging Face names (``text_model.embeddings.*``,
``text_model.encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}``,
``text_model.final_layer_norm``, ``text_projection.weight``). Computation runs in the
``dtype`` passed to ``forward`` (fp32 from the text encoders), with ``operations`` casting
the stored weights on the fly.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),
    "gelu": F.gelu,
}


class CLIPAttention(torch.nn.Module):
    def __init__(self, embed_dim, heads, dtype, device, operations):
        super().__init__()
        self.heads = heads
        self.q_proj = operations.Linear(embed_dim, embed_dim, bias=True, dtype=dtype, device=device)
        self.k_proj = operations.Linear(embed_dim, embed_dim, bias=True, dtype=dtype, device=device)
        self.v_proj = operations.Linear(embed_dim, embed_dim, bias=True, dtype=dtype, device=device)
        self.out_proj = operations.Linear(embed_dim, embed_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x, mask=None):
        b, t, c = x.shape
        head_dim = c // self.heads

        def split(y):
            return y.view(b, t, self.heads, head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class CLIPMLP(torch.nn.Module):
    def __init__(self, embed_dim, intermediate_size, activation, dtype, device, operations):
        super().__init__()
        self.fc1 = operations.Linear(embed_dim, intermediate_size, bias=True, dtype=dtype, device=device)
        self.activation = ACTIVATIONS[activation]
        self.fc2 = operations.Linear(intermediate_size, embed_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPLayer(torch.nn.Module):
    def __init__(self, embed_dim, heads, intermediate_size, activation, eps, dtype, device, operations):
        super().__init__()
        self.layer_norm1 = operations.LayerNorm(embed_dim, eps=eps, dtype=dtype, device=device)
        self.self_attn = CLIPAttention(embed_dim, heads, dtype, device, operations)
        self.layer_norm2 = operations.LayerNorm(embed_dim, eps=eps, dtype=dtype, device=device)
        self.mlp = CLIPMLP(embed_dim, intermediate_size, activation, dtype, device, operations)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(torch.nn.Module):
    def __init__(self, num_layers, embed_dim, heads, intermediate_size, activation, eps, dtype, device, operations):
        super().__init__()
        self.layers = torch.nn.ModuleList([
            CLIPLayer(embed_dim, heads, intermediate_size, activation, eps, dtype, device, operations)
            for _ in range(num_layers)
        ])

    def forward(self, x, mask=None, intermediate_output=None):
        """-> (last output, output of layer ``intermediate_output`` or None); negative
        indices count from the end (-1 = the last layer)."""
        if intermediate_output is not None and intermediate_output < 0:
            intermediate_output = len(self.layers) + intermediate_output
        intermediate = None
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i == intermediate_output:
                intermediate = x.clone()
        return x, intermediate


class CLIPEmbeddings(torch.nn.Module):
    def __init__(self, embed_dim, vocab_size, num_positions, dtype, device, operations):
        super().__init__()
        self.token_embedding = operations.Embedding(vocab_size, embed_dim, dtype=dtype, device=device)
        self.position_embedding = operations.Embedding(num_positions, embed_dim, dtype=dtype, device=device)

    def forward(self, input_tokens, dtype=torch.float32):
        x = self.token_embedding(input_tokens, out_dtype=dtype)
        # The whole position table, as ComfyUI adds it: a sequence of another length (an
        # empty stream's 2 tokens) fails with a size mismatch there too.
        return x + self.position_embedding.weight.to(device=x.device, dtype=dtype)


class CLIPTextModel_(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        embed_dim = config_dict["hidden_size"]
        self.eos_token_id = config_dict.get("eos_token_id", 49407)
        self.embeddings = CLIPEmbeddings(embed_dim, config_dict["vocab_size"], config_dict["max_position_embeddings"],
                                         dtype, device, operations)
        self.encoder = CLIPEncoder(config_dict["num_hidden_layers"], embed_dim, config_dict["num_attention_heads"],
                                   config_dict["intermediate_size"], config_dict["hidden_act"],
                                   config_dict.get("layer_norm_eps", 1e-5), dtype, device, operations)
        self.final_layer_norm = operations.LayerNorm(embed_dim, eps=config_dict.get("layer_norm_eps", 1e-5),
                                                     dtype=dtype, device=device)

    def forward(self, input_tokens=None, attention_mask=None, embeds=None, num_tokens=None,
                intermediate_output=None, final_layer_norm_intermediate=True, dtype=torch.float32):
        if embeds is not None:
            x = embeds.to(dtype) + self.embeddings.position_embedding.weight.to(device=embeds.device, dtype=dtype)
        else:
            x = self.embeddings(input_tokens, dtype=dtype)
        t = x.shape[1]
        causal = torch.full((t, t), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        x, i = self.encoder(x, mask=causal, intermediate_output=intermediate_output)
        x = self.final_layer_norm(x)
        if i is not None and final_layer_norm_intermediate:
            i = self.final_layer_norm(i)
        # Pooled: the first end-of-text position of each sequence.
        eos = (input_tokens.to(device=x.device).round().long() == self.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]
        return x, i, pooled


class CLIPTextModel(torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        self.num_layers = config_dict["num_hidden_layers"]
        self.text_model = CLIPTextModel_(config_dict, dtype, device, operations)
        embed_dim = config_dict["hidden_size"]
        self.text_projection = operations.Linear(embed_dim, config_dict.get("projection_dim", embed_dim), bias=False,
                                                 dtype=dtype, device=device)
        self.dtype = dtype

    def get_input_embeddings(self):
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embeddings):
        self.text_model.embeddings.token_embedding = embeddings

    def forward(self, *args, **kwargs):
        x, i, pooled = self.text_model(*args, **kwargs)
        return x, i, self.text_projection(pooled), pooled
