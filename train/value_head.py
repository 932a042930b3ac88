"""PPO's value head: a linear map from the policy's final-normalised hidden state to a scalar, V(s_t) = w . h_t + b.

Why a head on the policy's trunk rather than a separate critic model (MiniMind's ``train_ppo.py`` trains a
critic model of the policy's size): at tinylm's scale the trunk is the whole model, so a second copy would
double the trained weights, their AdamW states and the rollout-time forward passes for a critic that can only
learn what the trunk already represents; a head adds H + 1 weights and reuses the forward the policy loss runs
anyway. The value loss's gradient flows into the shared trunk, scaled by ``--vf-coef``.

Where it lives. During a PPO run the head is the submodule ``value_head`` of the policy (so DDP reduces its
gradients and the optimizer, its clipping and its states cover it like any other weight). A checkpoint keeps it
apart: ``Checkpoint.save`` moves the ``value_head.*`` tensors of the state dict into the checkpoint's own
``value_head`` field, so the checkpoint's ``model`` (what ``bin/chat``, ``bin/export``, ``bin/serve`` and
``--init-from`` read) is the policy alone. It starts at zero (V = 0 everywhere), the same on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VALUE_HEAD = "value_head"  # the submodule's name on the policy and the checkpoint field that stores it


class ValueHead(nn.Module):
    """``hidden [..., H] -> value [...]`` (float32 out), zero-initialised."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden).squeeze(-1).float()


def value_head_shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The name -> shape of a stored value head (the keys of ``ValueHead.state_dict()``)."""
    return {"proj.weight": (1, hidden_size), "proj.bias": (1,)}


def split_value_head(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A policy state dict with an attached head -> (the policy's tensors, the head's under its own names)."""
    prefix = VALUE_HEAD + "."
    head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(prefix)}, head


def attach_value_head(model: nn.Module, state: dict[str, Tensor] | None = None) -> ValueHead:
    """Give ``model`` (unwrapped, on its device) a zero value head, or the stored ``state``, and return it."""
    device = next(model.parameters()).device
    head = ValueHead(model.config.hidden_size).to(device)
    if state is not None:
        with torch.no_grad():
            head.load_state_dict(state, strict=True)
    setattr(model, VALUE_HEAD, head)
    return head
