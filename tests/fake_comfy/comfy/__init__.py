"""Fake of ComfyUI's ``comfy`` package for Luna Daemon's tests (see ../README.md)."""
