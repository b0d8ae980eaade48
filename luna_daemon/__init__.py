"""Luna Daemon: one process that keeps VAE / CLIP / LoRA loaded and serves them over localhost."""

__version__ = "0.1.0"
