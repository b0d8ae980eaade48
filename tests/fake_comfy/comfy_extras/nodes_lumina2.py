"""Fake of ``comfy_extras/nodes_lumina2.py``: the v3 CLIPTextEncodeLumina2.

Inputs ``system_prompt`` (combo ``superior`` / ``alignment``), ``user_prompt`` (multiline),
``clip``; the prompt sent to ``clip.tokenize`` is ``f"{system prompt} <Prompt Start> {user
prompt}"``, then ``encode_from_tokens_scheduled``; no CLIP raises the v3 error for a missing
clip input. Simplification: the two system prompts are short stand-ins for Lumina 2's own texts.
"""

from typing import ClassVar

from comfy_api.latest import ComfyExtension, io


class CLIPTextEncodeLumina2(io.ComfyNode):
    SYSTEM_PROMPT: ClassVar[dict[str, str]] = {
        "superior": "You are an assistant designed to generate superior images (fake stand-in).",
        "alignment": "You are an assistant designed to generate high-quality images (fake stand-in).",
    }

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CLIPTextEncodeLumina2", display_name="CLIP Text Encode for Lumina2", category="conditioning",
            inputs=[io.Combo.Input("system_prompt", options=list(cls.SYSTEM_PROMPT.keys())),
                    io.String.Input("user_prompt", multiline=True, dynamic_prompts=True), io.Clip.Input("clip")],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, clip, user_prompt, system_prompt):
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        prompt = f"{cls.SYSTEM_PROMPT[system_prompt]} <Prompt Start> {user_prompt}"
        tokens = clip.tokenize(prompt)
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))


class Lumina2Extension(ComfyExtension):
    async def get_node_list(self):
        return [CLIPTextEncodeLumina2]


async def comfy_entrypoint():
    return Lumina2Extension()
