"""Load a checkpoint for inference: the model (LoRA adapters merged in memory) and its recorded tokenizer.

Shared by ``bin/chat``, ``bin/serve`` (and available to ``bin/eval``/``bin/export``). Every problem
(missing file or folder, unreadable or foreign checkpoint, non-finite weights, missing or mismatched
tokenizer, weights that do not fit the config, a tokenizer larger than the model's vocabulary) raises
:class:`CheckpointError` with one line naming the file, so the tools print it and exit 1 without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.chat_template import ENDOFTEXT, IM_END
from core.tokenizer import TokenizerInfo
from model import ModelConfig, TinyLM
from train import checkpoint
from train.checkpoint import CheckpointError


@dataclass
class InferenceModel:
    model: TinyLM  # eval mode, on the requested device
    tokenizer: TokenizerInfo
    ckpt: dict[str, Any]  # the loaded checkpoint (``path`` = the file); weights are in ``model``

    @property
    def name(self) -> str:
        """A model id for APIs: ``<run folder>/<file name>``."""
        path = Path(self.ckpt["path"])
        return f"{path.parent.name}/{path.stem}"

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn: ``<|im_end|>`` and ``<|endoftext|>``."""
        return [self.tokenizer.special_ids[t] for t in (IM_END, ENDOFTEXT) if t in self.tokenizer.special_ids]


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> InferenceModel:
    """Checkpoint file or run folder -> :class:`InferenceModel` (CheckpointError with one line on any problem)."""
    ckpt = checkpoint.load(path)
    for key in ("model", "model_config"):
        if key not in ckpt:
            raise CheckpointError(f"{ckpt['path']}: checkpoint has no {key!r} field")
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt['path']}: field 'model_config': {e}") from None
    info = checkpoint.find_tokenizer(ckpt)
    if info.vocab_size > config.vocab_size:
        raise CheckpointError(f"{ckpt['path']}: tokenizer {info.path} has {info.vocab_size} ids but the model's "
                              f"vocab_size is {config.vocab_size}")
    if ckpt.get("lora"):
        from model.lora import merge_lora
        from train.merge import lora_model

        model = merge_lora(lora_model(ckpt))
        bad = checkpoint.nonfinite_tensors(model.state_dict())
        if bad:
            raise CheckpointError(f"non-finite weights after merging the adapter (nan/inf in {', '.join(bad[:3])})",
                                  path=ckpt["path"])
    else:
        model = TinyLM(config)
        checkpoint.load_model_state(model, ckpt["model"], ckpt["path"])
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CheckpointError(f"device {device!r} is not usable: {e}") from None
    return InferenceModel(model.eval(), info, ckpt)
