"""The weights policy of a run: which weights train and what a checkpoint stores of them, all weights
(:class:`FullWeights`) or LoRA adapters over a frozen base (:class:`LoRAWeights`).

Chosen once by ``train/run.py`` from ``--lora-*`` and handed to the loop; stages never see it, so every
stage trains with LoRA the same way. :class:`FullWeights`: every parameter trains and is saved.
:class:`LoRAWeights`: :meth:`apply` freezes the model and inserts rank-r adapters (``model/lora.py``), only
the adapter parameters train, and a checkpoint's ``model`` holds only the adapter tensors (its ``lora``
and ``base`` fields say what they apply to).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from model.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_parameters, lora_state_dict
from train.weights import CheckpointError, load_model_state, model_state, unwrap


class FullWeights:
    """Every parameter trains; checkpoints hold the whole state dict."""

    lora: LoRAConfig | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        """Change the model before the optimizer sees it (here: nothing)."""
        return model

    def trainable(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        """Named parameters the optimizer updates."""
        return model.named_parameters()

    def state(self, model: nn.Module) -> dict[str, Tensor]:
        """What a checkpoint stores of the model."""
        return model_state(model)

    def load_state(self, model: nn.Module, state: dict[str, Tensor], source: str) -> None:
        """Inverse of :meth:`state` (strict: missing, unexpected or mis-shaped keys are refused)."""
        load_model_state(model, state, source)


class LoRAWeights(FullWeights):
    """Rank-r adapters on a frozen base: only they train, only they are saved."""

    def __init__(self, lora: LoRAConfig) -> None:
        self.lora = lora

    def apply(self, model: nn.Module) -> nn.Module:
        return apply_lora(model, self.lora)

    def trainable(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return lora_parameters(model)

    def state(self, model: nn.Module) -> dict[str, Tensor]:
        return lora_state_dict(unwrap(model))

    def load_state(self, model: nn.Module, state: dict[str, Tensor], source: str) -> None:
        try:
            load_lora_state_dict(unwrap(model), state)
        except ValueError as e:
            raise CheckpointError(str(e), path=source, field="model") from None


def weights_for(lora: LoRAConfig | None) -> FullWeights:
    """The weights policy of a run: LoRA adapters when ``--lora-rank`` was given, else all weights."""
    return FullWeights() if lora is None else LoRAWeights(lora)
