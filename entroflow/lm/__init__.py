"""Language models: loading (Hugging Face, GGUF, checkpoints), the entropy scorer and its fused head,
forward-mode tangents, hub downloads and the tiny demo model."""
