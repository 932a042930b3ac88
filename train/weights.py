"""State-dict utilities shared by every reader and writer of weights; they know tensors and modules, not files.

- :func:`unwrap` strips the DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, and
  :func:`model_state` is the unwrapped module's state dict, so no stored key carries a wrapper prefix;
- :func:`load_model_state` copies a state dict into a model strictly (:func:`state_problems`: missing,
  unexpected or mis-shaped keys are refused, all named);
- :func:`tensor_problems` refuses, before anything reads their values, tensors whose dtype is not a float
  weight dtype and tensors that claim more elements than their storage holds (an expanded, stride-0 view);
- :func:`nonfinite_tensors` names the tensors holding a nan or an inf; :func:`state_fingerprint` names the
  weights themselves (not a file), so a LoRA base or a DPO reference is recognised wherever it was copied.

:class:`CheckpointError` is the error of everything that reads or writes weights (format, sources,
these checks): one line naming the file and, where there is one, the field or tensor.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import TinyLMError

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CheckpointError(TinyLMError):
    """A missing, unreadable or incompatible checkpoint or state dict; the message names the file."""


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def model_state(module: nn.Module) -> dict[str, Tensor]:
    """The unwrapped module's state dict (tensors shared, not copied)."""
    state = unwrap(module).state_dict()
    bad = [k for k in state if "_orig_mod." in k or k.startswith("module.")]
    if bad:
        raise CheckpointError(f"wrapper prefixes in the state dict: {bad[:3]}")
    return state


def load_model_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` (unwrapped); refuse any missing, unexpected or mis-shaped key."""
    target = unwrap(model)
    own = target.state_dict()
    if state and all(k.endswith((".lora_A", ".lora_B")) for k in state) and not any("lora_" in k for k in own):
        raise CheckpointError(f"{source}: holds only a LoRA adapter, not a whole model; fold it into its base "
                              f"first: bin/merge --ckpt {source} --out DIR")
    problems = state_problems({k: tuple(v.shape) for k, v in own.items()}, state)
    if problems:
        raise CheckpointError(f"{source}: the checkpoint does not fit this model: " + "; ".join(problems))
    target.load_state_dict(state, strict=True)


def state_problems(expected: dict[str, tuple[int, ...]], state: dict[str, Tensor]) -> list[str]:
    """What keeps ``state`` from being exactly the tensors ``expected`` (name -> shape): missing and unexpected
    names, then each shape mismatch; empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {short_list(unexpected)}")
    shapes = [f"{k} {tuple(state[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    if shapes:
        problems.append(f"shape mismatch {short_list(shapes)}")
    return problems


def overclaimed(t: Tensor) -> bool:
    """Whether ``t`` addresses more elements than its storage holds (an expanded or overlapping view, e.g.
    a stride-0 tensor of 10^12 logical elements over one stored value): reading it would materialise them."""
    if t.numel() == 0:
        return False
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    stored = t.untyped_storage().nbytes() // t.element_size()
    return t.numel() > extent or t.storage_offset() + extent > stored  # overlapping, or past the storage


def tensor_problems(state: dict[str, Tensor], dtypes: tuple[torch.dtype, ...] = WEIGHT_DTYPES) -> list[str]:
    """The tensors of ``state`` that cannot be weights, one phrase each: a view claiming more elements than
    its storage holds, or a dtype outside ``dtypes`` (float8, complex, integer, bool). Reads no values."""
    problems = []
    for name, t in state.items():
        if overclaimed(t):
            problems.append(f"tensor {name} claims {t.numel()} elements over a storage of "
                            f"{t.untyped_storage().nbytes()} bytes (an expanded view)")
        elif t.dtype not in dtypes:
            problems.append(f"tensor {name} is {str(t.dtype).removeprefix('torch.')}, not a weight dtype "
                            f"({', '.join(str(d).removeprefix('torch.') for d in dtypes)})")
    return problems


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a nan or an inf (one host sync in all)."""
    names = [k for k, t in state.items() if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(state[k]).all().cpu() for k in names]).tolist()
    return [k for k, ok in zip(names, flags, strict=True) if not ok]


def state_fingerprint(state: dict[str, Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of a state dict: names the weights (not the
    file), so a reference or a LoRA base is recognised wherever its checkpoint was copied to."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def short_list(items: list[str], n: int = 5) -> str:
    """The first ``n`` items joined, with how many more there are."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
