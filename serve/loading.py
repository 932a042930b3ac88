"""Load a trained model for use (chat, serve, export, eval): :func:`load_model` -> :class:`LoadedModel`.

The checkpoint (file or run folder) is read by ``train.checkpoint.load``; a LoRA checkpoint comes back with
its adapter merged into the base it records, as ``bin/merge`` would write it. The tokenizer is the one
recorded in the checkpoint. Every problem (missing file or folder, unreadable or foreign checkpoint,
non-finite weights, missing or mismatched tokenizer, weights that do not fit the config, a tokenizer larger
than the model's vocabulary, an unusable device) is a CheckpointError with one line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import TinyLMError
from core.tokenizer import TokenizerInfo
from model import ModelConfig, TinyLM
from train import checkpoint
from train.checkpoint import Checkpoint, CheckpointError, SourceOptions


class ToolError(TinyLMError):
    """A user-facing problem of a tool that uses a trained model (bin/export, bin/eval): one line naming the
    file or field."""


@dataclass
class LoadedModel:
    """A trained model ready for inference: dense weights in eval mode, its tokenizer and its checkpoint."""

    model: TinyLM  # eval mode, on the requested device, LoRA adapters merged
    tokenizer: TokenizerInfo
    checkpoint: Checkpoint  # ``path`` = the file read; its weights are in ``model``

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def name(self) -> str:
        """A model id for APIs: ``<run folder>/<file name>``."""
        path = Path(self.checkpoint.path)
        return f"{path.parent.name}/{path.stem}"

    @property
    def run_folder(self) -> Path:
        return Path(self.checkpoint.path).parent

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn (``core.chat_template.STOP_TOKENS``)."""
        return self.tokenizer.stop_ids

    def state(self) -> dict[str, torch.Tensor]:
        """The dense weights (our = transformers' names), detached."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}


def load_model(path: str | Path, device: str | torch.device = "cpu",
               options: SourceOptions | None = None) -> LoadedModel:
    """Checkpoint file, run folder, transformers folder or (with ``options.config``) a bare state dict ->
    :class:`LoadedModel` (CheckpointError with one line on any problem)."""
    ckpt = checkpoint.load(path, options=options)
    info = ckpt.find_tokenizer()
    if info.vocab_size > ckpt.model_config.vocab_size:
        raise CheckpointError(f"tokenizer {info.path} has {info.vocab_size} ids but the model's vocab_size is "
                              f"{ckpt.model_config.vocab_size}", path=ckpt.path)
    model = ckpt.dense_model()
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CheckpointError(f"device {device!r} is not usable: {e}") from None
    return LoadedModel(model, info, ckpt)
