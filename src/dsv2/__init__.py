"""dsv2: DeepSeek-V2 end to end in PyTorch (model, checkpoints, training, inference).

    import dsv2
    model = dsv2.DeepseekV2(dsv2.ModelConfig.from_preset("tiny"))
    dsv2.save_checkpoint(model, "ckpt")            # HF layout, loadable by transformers
    model = dsv2.load_checkpoint("ckpt")
    new_tokens = dsv2.generate(model, [[1, 2, 3]], max_new_tokens=8)
"""

from dsv2.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dsv2.config import PRESETS, ModelConfig
from dsv2.infer.generate import generate
from dsv2.model import DeepseekV2, LatentCache, count_parameters

__version__ = "0.1.0"
__all__ = ["PRESETS", "CheckpointError", "DeepseekV2", "LatentCache", "ModelConfig", "count_parameters",
           "generate", "load_checkpoint", "save_checkpoint"]
