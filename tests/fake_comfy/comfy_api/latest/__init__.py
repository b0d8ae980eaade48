"""Fake of ``comfy_api.latest``: just enough of the v3 node API for ``comfy_extras`` nodes."""

from comfy_api.latest import _io as io


class ComfyExtension:
    async def on_load(self):
        return None

    async def get_node_list(self):
        return []


__all__ = ["ComfyExtension", "io"]
