"""LoRA: low-rank adapters on the linear projections of a model (Hu et al. 2021).

A targeted ``nn.Linear`` of weight ``W`` [out, in] becomes a :class:`LoRALinear` that keeps ``W`` (same
parameter, same state-dict key ``...weight``, frozen) and adds ``lora_A`` [r, in] and ``lora_B`` [out, r]:

    y = x W^T + scaling * (x A^T) B^T,        scaling = alpha / r

``A`` starts Kaiming-uniform and ``B`` at zero, so a freshly adapted model computes exactly the base
function. :func:`merge_lora` folds the adapter back: ``W <- W + scaling * B A`` and swaps every
:class:`LoRALinear` for a plain ``nn.Linear``, so the merged model has the base model's state-dict keys.
Adapter state-dict keys are the module path plus ``.lora_A`` / ``.lora_B``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 2**16


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = ALL_TARGETS  # module-name suffixes (the last path component)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool):
            raise ValueError(f"LoRA rank must be an integer, got {repr(self.rank)[:40]}")
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"LoRA rank must be >= 1 and <= {MAX_RANK}, got {repr(self.rank)[:40]}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {repr(self.alpha)[:40]}")
        if not all(isinstance(t, str) for t in self.targets):
            raise ValueError("LoRA targets must be names of projections")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {', '.join(unknown) or '(none)'} unknown; choose from "
                             f"{', '.join(ALL_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: dict) -> LoRAConfig:
        """Inverse of :meth:`to_dict`; a value of the wrong type or range raises ValueError."""
        targets = values["targets"]
        if not isinstance(targets, (list, tuple)):
            raise ValueError(f"LoRA targets must be a list, got {type(targets).__name__}")
        alpha = values["alpha"]
        return cls(values["rank"], float(alpha) if isinstance(alpha, int) and not isinstance(alpha, bool) else alpha,
                   tuple(targets))


class LoRALinear(nn.Linear):
    """A bias-free linear layer with a frozen base weight and a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        if base.bias is not None:
            raise ValueError("LoRALinear supports bias-free linear layers only")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: shared storage, same key in the state dict
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        self.scaling = scaling
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> Tensor:
        """``scaling * B A``, the change the adapter makes to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def _targets(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    wanted = set(names)
    found = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if child_name in wanted and type(child) is nn.Linear:
                found.append((module, child_name, child))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap the target linears with adapters (in place)."""
    model.requires_grad_(False)
    targets = _targets(model, cfg.targets)
    if not targets:
        raise ValueError(f"no linear layer named {', '.join(cfg.targets)} in the model")
    for parent, name, linear in targets:
        setattr(parent, name, LoRALinear(linear, cfg.rank, cfg.scaling))
    return model


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only (detached copies of ``lora_A`` / ``lora_B``)."""
    return {n: p.detach().clone() for n, p in lora_parameters(model)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors into an adapted model; ValueError unless keys and shapes match exactly."""
    own = dict(lora_parameters(model))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the adapter ({len(state)} tensors) does not fit this LoRA model ({len(own)} adapter "
                         f"tensors; missing {missing[:2]}, unexpected {unexpected[:2]}, shapes differ {shapes[:2]}): "
                         "another --lora-rank / --lora-targets or another base model?")
    for k, p in own.items():
        p.copy_(state[k])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain ``nn.Linear`` layers (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False,
                                  device=child.weight.device, dtype=child.weight.dtype)
                plain.weight.copy_(child.weight + child.delta().to(child.weight.dtype))
                setattr(module, name, plain)
    return model
