"""Model layer: engines (how weights run), registry (what is loaded), LoRA cache."""
