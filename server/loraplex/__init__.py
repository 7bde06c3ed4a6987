"""loraplex: one base model, many LoRA adapters, batched in one forward pass."""

__version__ = "0.1.0"
