"""tinylm model: config, Llama-compatible Transformer (dense or MoE), attention backends."""

from model.config import PRESETS, ModelConfig
from model.transformer import ModelOutput, TinyLM

__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "TinyLM"]
