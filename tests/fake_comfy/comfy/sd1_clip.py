"""Fake of ``comfy.sd1_clip``: the CLIP text-encoder wrapper, its tokenizer and the
token-weight encoder shared by every CLIP family.

Facts implemented:

* tokens are ``{short_name: [chunk, ...]}``, a chunk is ``max_length`` (77) ``(id, weight)``
  tuples: start 49406, up to 75 tokens, end 49407, padding (49407 for CLIP-L, 0 for G/H).
  ``return_word_ids=True`` adds the word index (0 for start/end/padding).
* ``(text:1.2)`` sets a weight, ``(text)`` multiplies by 1.1 per bracket level, ``\\(`` escapes;
  ``disable_weights=True`` turns parsing off.
* ``embedding:name`` loads a textual-inversion file from ``embedding_directory``; each of
  its vectors becomes one token whose id is a float tensor.
* weights != 1 are applied as ``empty + (z - empty) * w`` with ``empty`` the encoding of the
  empty prompt; chunks are concatenated on the token axis; pooled comes from chunk 0.
* ``set_clip_options`` / ``reset_clip_options`` mutate layer state on the (shared) module.

Simplification: words are split on spaces, and a word of fewer than 8 tokens that does not
fit in the current chunk moves whole to the next one (longer words are split).
"""

import json
import logging
import numbers
import os

import torch
from transformers import CLIPTokenizer

import comfy.clip_model
import comfy.model_management
import comfy.ops

_HERE = os.path.dirname(os.path.realpath(__file__))


def gen_empty_tokens(special_tokens, length):
    start = special_tokens.get("start")
    end = special_tokens.get("end")
    pad = special_tokens.get("pad", end)
    out = []
    if start is not None:
        out.append(start)
    if end is not None:
        out.append(end)
    return out + [pad] * (length - len(out))


class ClipTokenWeightEncoder:
    def encode_token_weights(self, token_weight_pairs):
        sections = [[pair[0] for pair in chunk] for chunk in token_weight_pairs]
        weights = [[float(pair[1]) for pair in chunk] for chunk in token_weight_pairs]
        count = len(sections)
        longest = max((len(s) for s in sections), default=0)
        weighted = any(w != 1.0 for row in weights for w in row)
        to_encode = list(sections)
        if weighted or count == 0:
            # No chunks at all (an empty stream): the empty sequence of length 0, i.e. just
            # the start / end tokens -- CLIP gives 2 positions, T5 1. A model may define its
            # own empty tokens (PixArt: pad only).
            empty_tokens = getattr(self, "gen_empty_tokens", None) or gen_empty_tokens
            to_encode.append(empty_tokens(self.special_tokens, longest))

        result = self.encode(to_encode)
        out, pooled = result[:2]
        first_pooled = pooled[0:1].to(comfy.model_management.intermediate_device()) if pooled is not None else None

        chunks = []
        for k in range(count):
            z = out[k:k + 1]
            if weighted:
                empty = out[-1:]
                w = torch.tensor(weights[k], dtype=z.dtype, device=z.device).reshape(1, -1, 1)
                z = torch.where(w != 1.0, empty + (z - empty) * w, z)
            chunks.append(z)
        cond = torch.cat(chunks, dim=-2) if chunks else out[-1:]
        cond = cond.to(comfy.model_management.intermediate_device())
        if len(result) > 2:
            # Extras (the attention mask) cover the given chunks only, as one [1, T] row.
            extra = {}
            for key, value in result[2].items():
                if key == "attention_mask":
                    value = value[:count].flatten().unsqueeze(dim=0).to(comfy.model_management.intermediate_device())
                extra[key] = value
            return cond, first_pooled, extra
        return cond, first_pooled


class SDClipModel(torch.nn.Module, ClipTokenWeightEncoder):
    LAYERS = ("last", "pooled", "hidden", "all")

    def __init__(self, device="cpu", max_length=77, freeze=True, layer="last", layer_idx=None,
                 textmodel_json_config=None, dtype=None, model_class=comfy.clip_model.CLIPTextModel,
                 special_tokens={"start": 49406, "end": 49407, "pad": 49407}, layer_norm_hidden_state=True,
                 enable_attention_masks=False, zero_out_masked=False, return_projected_pooled=True,
                 return_attention_masks=False, model_options={}):
        super().__init__()
        assert layer in self.LAYERS
        if textmodel_json_config is None:
            textmodel_json_config = os.path.join(_HERE, "sd1_clip_config.json")
        if isinstance(textmodel_json_config, dict):
            config = dict(textmodel_json_config)
        else:
            with open(textmodel_json_config) as f:
                config = json.load(f)
        model_name = model_options.get("model_name")
        if model_name is not None:
            config.update(model_options.get(f"{model_name}_model_config", {}))

        operations = model_options.get("custom_operations", None) or comfy.ops.manual_cast
        self.operations = operations
        self.transformer = model_class(config, dtype, device, operations)
        projection = getattr(self.transformer, "text_projection", None)  # T5 / LLM encoders have none
        with torch.no_grad():
            proj = projection.weight if projection is not None else None
            if proj is not None and proj.shape[0] == proj.shape[1]:
                proj.copy_(torch.eye(proj.shape[0], dtype=proj.dtype, device=proj.device))
        self.num_layers = self.transformer.num_layers
        self.max_length = max_length
        if freeze:
            for p in self.parameters():
                p.requires_grad = False
            self.eval()
        self.layer = layer
        self.layer_idx = None
        self.special_tokens = special_tokens
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        self.enable_attention_masks = enable_attention_masks
        self.zero_out_masked = zero_out_masked
        self.layer_norm_hidden_state = layer_norm_hidden_state
        self.return_projected_pooled = return_projected_pooled
        self.return_attention_masks = return_attention_masks
        if layer == "hidden":
            assert layer_idx is not None
            assert abs(layer_idx) < self.num_layers + 1
            self.set_clip_options({"layer": layer_idx})
        self.options_default = (self.layer, self.layer_idx, self.return_projected_pooled)

    def freeze(self):
        self.transformer = self.transformer.eval()
        for p in self.parameters():
            p.requires_grad = False

    def set_clip_options(self, options):
        layer_idx = options.get("layer", self.layer_idx)
        self.return_projected_pooled = options.get("projected_pooled", self.return_projected_pooled)
        if layer_idx is None or abs(layer_idx) > self.num_layers:
            self.layer = "last"
        else:
            self.layer = "hidden"
            self.layer_idx = layer_idx

    def reset_clip_options(self):
        self.layer, self.layer_idx, self.return_projected_pooled = self.options_default

    def process_tokens(self, tokens, device):
        """-> (input embeddings [B, T, D] float32, token ids [B, T] for pooling, attention
        mask [B, T] int64).

        Integer tokens are looked up; the mask is 1 up to and including the first end token
        (no end token: up to the first pad, which gets 0) and 0 after it. Anything else is
        an embedding inserted at its place: a tensor (textual inversion, one row per vector),
        ``{"type": "embedding", "data": tensor}``, or another dict the transformer's
        ``preprocess_embed`` turns into rows (images); one it cannot use is dropped, one of
        the wrong width is dropped with a warning and padding appended instead. Inserted rows
        count as attended; their ids are 0 (never an end token, so CLIP's pooling skips them)."""
        token_embedding = self.transformer.get_input_embeddings()
        end = self.special_tokens.get("end")
        stop = end if end is not None else self.special_tokens.get("pad", -1)
        pad = self.special_tokens.get("pad", 0)
        ids_out, embeds_out, masks_out = [], [], []
        for section in tokens:
            ids, mask, others = [], [], []
            eos = False
            for pos, token in enumerate(section):
                if isinstance(token, numbers.Integral) and not isinstance(token, bool):
                    token = int(token)
                    mask.append(0 if eos else 1)
                    ids.append(token)
                    if not eos and token == stop:
                        if end is None:
                            mask[-1] = 0
                        eos = True
                else:
                    others.append((pos, token))
            emb = token_embedding(torch.tensor([ids], dtype=torch.long, device=device), out_dtype=torch.float32)
            shift = 0
            pad_extra = 0
            for pos, other in others:
                rows = None
                if isinstance(other, torch.Tensor):
                    rows = other
                elif isinstance(other, dict) and other.get("type") == "embedding":
                    rows = other.get("data")
                elif isinstance(other, dict) and hasattr(self.transformer, "preprocess_embed"):
                    rows = self.transformer.preprocess_embed(other, device)
                if rows is None:
                    shift -= 1
                    continue
                rows = rows.reshape(1, -1, rows.shape[-1]).to(device=device, dtype=torch.float32)
                at = pos + shift
                if rows.shape[-1] != emb.shape[-1]:
                    logging.warning(f"WARNING: shape mismatch when trying to apply embedding, embedding will be ignored {rows.shape[-1]} != {emb.shape[-1]}")
                    shift -= 1
                    pad_extra += rows.shape[1]
                    continue
                emb = torch.cat([emb[:, :at], rows, emb[:, at:]], dim=1)
                ids = ids[:at] + [0] * rows.shape[1] + ids[at:]
                mask = mask[:at] + [1] * rows.shape[1] + mask[at:]
                shift += rows.shape[1] - 1
            if pad_extra:
                filler = torch.tensor([[pad] * pad_extra], dtype=torch.long, device=device)
                emb = torch.cat([emb, token_embedding(filler, out_dtype=torch.float32)], dim=1)
                ids += [pad] * pad_extra
                mask += [0] * pad_extra
            ids_out.append(torch.tensor([ids], dtype=torch.long, device=device))
            embeds_out.append(emb)
            masks_out.append(torch.tensor([mask], dtype=torch.long, device=device))
        return torch.cat(embeds_out), torch.cat(ids_out), torch.cat(masks_out)

    def forward(self, tokens):
        device = self.transformer.get_input_embeddings().weight.device
        embeds, ids, mask = self.process_tokens(tokens, device)
        intermediate_output = self.layer_idx if self.layer == "hidden" else None
        outputs = self.transformer(ids, mask if self.enable_attention_masks else None, embeds=embeds, num_tokens=None,
                                   intermediate_output=intermediate_output,
                                   final_layer_norm_intermediate=self.layer_norm_hidden_state, dtype=torch.float32)
        z = outputs[0] if self.layer == "last" else outputs[1]
        pooled = outputs[2] if self.return_projected_pooled else outputs[3]
        z, pooled = z.float(), (pooled.float() if pooled is not None else None)
        if self.zero_out_masked:  # Wan's umT5: padded positions of the output are zeros
            z = z * mask.unsqueeze(-1).float()
        if self.return_attention_masks:
            return z, pooled, {"attention_mask": mask}
        return z, pooled

    def encode(self, tokens):
        return self(tokens)

    def load_sd(self, sd):
        return self.transformer.load_state_dict(sd, strict=False)


# --------------------------------------------------------------------------- tokenizer


def parse_parentheses(string):
    """Split into top-level pieces: plain text runs and balanced ``( ... )`` groups."""
    pieces, current, depth = [], "", 0
    for char in string:
        if char == "(":
            if depth == 0 and current:
                pieces.append(current)
                current = ""
            depth += 1
            current += char
        elif char == ")" and depth > 0:
            depth -= 1
            current += char
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def token_weights(string, current_weight):
    out = []
    for piece in parse_parentheses(string):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            weight = current_weight * 1.1
            head, sep, tail = inner.rpartition(":")
            if sep:
                try:
                    weight = current_weight * float(tail)
                    inner = head
                except ValueError:
                    pass
            out += token_weights(inner, weight)
        else:
            out.append((piece, current_weight))
    return out


def escape_important(text):
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def unescape_important(text):
    return text.replace("\0\1", ")").replace("\0\2", "(")


def safe_load_embed_zip(embed_path):
    raise RuntimeError("the fake comfy does not load legacy zip embeddings")


def expand_directory_list(directories):
    dirs = set()
    for x in directories:
        dirs.add(x)
        for root, subdir, _files in os.walk(x, followlinks=True):
            dirs.add(root)
    return list(dirs)


def load_embed(embedding_name, embedding_directory, embedding_size, embed_key=None):
    if isinstance(embedding_directory, str):
        embedding_directory = [embedding_directory]
    found = None
    for directory in sorted(expand_directory_list(embedding_directory)):
        directory = os.path.abspath(directory)
        candidate = os.path.abspath(os.path.join(directory, embedding_name))
        try:
            if os.path.commonpath((directory, candidate)) != directory:
                continue
        except ValueError:
            continue
        options = [candidate] + [candidate + ext for ext in (".safetensors", ".pt", ".bin")]
        found = next((p for p in options if os.path.isfile(p)), None)
        if found is not None:
            break
    if found is None:
        return None
    try:
        if found.lower().endswith(".safetensors"):
            import safetensors.torch

            data = safetensors.torch.load_file(found, device="cpu")
        else:
            data = torch.load(found, weights_only=True, map_location="cpu")
    except Exception:
        logging.warning(f"failed to load embedding file {found}", exc_info=True)
        return None
    if isinstance(data, torch.Tensor):
        tensor = data
    elif "string_to_param" in data:
        tensor = next(iter(data["string_to_param"].values()))
    elif embed_key is not None and embed_key in data:
        tensor = data[embed_key]
    else:
        tensor = torch.cat([v.reshape(-1, embedding_size) for v in data.values() if isinstance(v, torch.Tensor)])
    return tensor.reshape(-1, embedding_size)


class SDTokenizer:
    def __init__(self, tokenizer_path=None, max_length=77, pad_with_end=True, embedding_directory=None,
                 embedding_size=768, embedding_key="clip_l", tokenizer_class=CLIPTokenizer, has_start_token=True,
                 has_end_token=True, pad_to_max_length=True, min_length=None, pad_token=None, end_token=None,
                 min_padding=None, tokenizer_data={}, tokenizer_args={}):
        if tokenizer_path is None:
            tokenizer_path = os.path.join(_HERE, "sd1_tokenizer")
        self.tokenizer = tokenizer_class.from_pretrained(tokenizer_path, **tokenizer_args)
        self.max_length = tokenizer_data.get(f"{embedding_key}_max_length", max_length)
        self.min_length = tokenizer_data.get(f"{embedding_key}_min_length", min_length)
        self.min_padding = min_padding
        empty = self.tokenizer("")["input_ids"]
        self.tokenizer_adds_end_token = has_end_token
        if has_start_token:
            self.tokens_start = 1
            self.start_token = empty[0]
            self.end_token = end_token if end_token is not None else (empty[1] if has_end_token else None)
        else:
            self.tokens_start = 0
            self.start_token = None
            # No end token at all (LLM tokenizers: has_end_token=False) unless one is given.
            self.end_token = end_token if end_token is not None else (empty[0] if has_end_token else None)
        self.pad_token = pad_token
        self.pad_with_end = pad_with_end
        self.pad_to_max_length = pad_to_max_length
        vocab = self.tokenizer.get_vocab()
        self.inv_vocab = {v: k for k, v in vocab.items()}
        self.embedding_directory = embedding_directory
        self.max_word_length = 8
        self.embedding_identifier = "embedding:"
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key

    def _try_get_embedding(self, embedding_name):
        embed = load_embed(embedding_name, self.embedding_directory, self.embedding_size, self.embedding_key)
        if embed is None:
            stripped = embedding_name.strip(",")
            if len(stripped) < len(embedding_name):
                embed = load_embed(stripped, self.embedding_directory, self.embedding_size, self.embedding_key)
                return embed, embedding_name[len(stripped):]
        return embed, ""

    def _word_ids(self, word):
        ids = self.tokenizer(word)["input_ids"]
        return ids[self.tokens_start:-1] if self.tokenizer_adds_end_token else ids[self.tokens_start:]

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        min_length = tokenizer_options.get(f"{self.embedding_key}_min_length", self.min_length)
        min_padding = tokenizer_options.get(f"{self.embedding_key}_min_padding", self.min_padding)
        pad_token = self.pad_token if self.pad_token is not None else (self.end_token if self.pad_with_end else 0)

        text = escape_important(text)
        if kwargs.get("disable_weights", False):
            segments = [(text, 1.0)]
        else:
            segments = token_weights(text, 1.0)

        groups = []  # one list of (token, weight) per word / embedding
        for segment, weight in segments:
            for word in unescape_important(segment).replace("\n", " ").split(" "):
                if not word:
                    continue
                if word.startswith(self.embedding_identifier) and self.embedding_directory is not None:
                    name = word[len(self.embedding_identifier):]
                    embed, leftover = self._try_get_embedding(name)
                    if embed is None:
                        logging.warning(f"warning, embedding:{name} does not exist, ignoring")
                    else:
                        groups.append([(embed[i], weight) for i in range(embed.shape[0])])
                    if not leftover:
                        continue
                    word = leftover
                groups.append([(t, weight) for t in self._word_ids(word)])

        has_start = self.start_token is not None
        has_end = self.end_token is not None
        content = self.max_length - (1 if has_start else 0) - (1 if has_end else 0)  # room between start and end

        def new_chunk():
            return [(self.start_token, 1.0, 0)] if has_start else []

        def close(chunk):
            if has_end:
                chunk.append((self.end_token, 1.0, 0))
            if self.pad_to_max_length:
                chunk.extend([(pad_token, 1.0, 0)] * (self.max_length - len(chunk)))

        chunks = [new_chunk()]
        for index, group in enumerate(groups, start=1):
            splittable = len(group) >= self.max_word_length
            while group:
                chunk = chunks[-1]
                used = len(chunk) - (1 if has_start else 0)
                room = content - used
                if len(group) <= room:
                    chunk.extend((t, w, index) for t, w in group)
                    group = []
                    continue
                if splittable and room > 0:
                    chunk.extend((t, w, index) for t, w in group[:room])
                    group = group[room:]
                close(chunk)
                chunks.append(new_chunk())
        close(chunks[-1])

        if min_length is not None and len(chunks[-1]) < min_length:
            chunks[-1].extend([(pad_token, 1.0, 0)] * (min_length - len(chunks[-1])))
        if min_padding is not None:
            chunks[-1].extend([(pad_token, 1.0, 0)] * min_padding)

        if not return_word_ids:
            chunks = [[(t, w) for t, w, _ in chunk] for chunk in chunks]
        return chunks

    def untokenize(self, token_weight_pair):
        return [(a, self.inv_vocab.get(a[0])) for a in token_weight_pair]

    def state_dict(self):
        return {}


def _tiny_hidden_size(config_name):
    with open(os.path.join(_HERE, config_name)) as f:
        return json.load(f)["hidden_size"]


class SD1Tokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}, clip_name="l", tokenizer=SDTokenizer, name=None):
        if name is not None:
            self.clip_name = name
            self.clip = f"{self.clip_name}"
        else:
            self.clip_name = clip_name
            self.clip = f"clip_{self.clip_name}"
        tokenizer = tokenizer_data.get(f"{self.clip}_tokenizer_class", tokenizer)
        kwargs = {}
        if tokenizer is SDTokenizer:
            # The fake's CLIP-L is tiny: its embeddings have the tiny hidden size.
            kwargs["embedding_size"] = _tiny_hidden_size("sd1_clip_config.json")
        setattr(self, self.clip, tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, **kwargs))

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {self.clip_name: getattr(self, self.clip).tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return getattr(self, self.clip).untokenize(token_weight_pair)

    def state_dict(self):
        return getattr(self, self.clip).state_dict()


class SD1CheckpointClipModel(SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, return_projected_pooled=False, dtype=dtype, model_options=model_options)


class SD1ClipModel(torch.nn.Module):
    def __init__(self, device="cpu", dtype=None, model_options={}, clip_name="l", clip_model=SDClipModel, name=None,
                 **kwargs):
        super().__init__()
        if name is not None:
            self.clip_name = name
            self.clip = f"{self.clip_name}"
        else:
            self.clip_name = clip_name
            self.clip = f"clip_{self.clip_name}"
        clip_model = model_options.get(f"{self.clip}_class", clip_model)
        model_options = {**model_options, "model_name": self.clip}
        setattr(self, self.clip, clip_model(device=device, dtype=dtype, model_options=model_options, **kwargs))
        self.dtypes = set()
        if dtype is not None:
            self.dtypes.add(dtype)

    def set_clip_options(self, options):
        getattr(self, self.clip).set_clip_options(options)

    def reset_clip_options(self):
        getattr(self, self.clip).reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        return getattr(self, self.clip).encode_token_weights(token_weight_pairs[self.clip_name])

    def load_sd(self, sd):
        return getattr(self, self.clip).load_sd(sd)
