"""dsv2: DeepSeek-V2 end to end in PyTorch (model, checkpoints, training, inference)."""

__version__ = "0.1.0"
