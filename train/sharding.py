"""Sharded data parallelism (``--fsdp``): FSDP2 over the decoder blocks, and the gathered checkpoint state.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every block of ``model.model.layers``
and then to the whole model (embeddings, final norm and head form the root group), in place: each rank keeps
1/world of every parameter (a ``DTensor`` sharded on dim 0), gathers a block's weights just before its
forward and backward, frees them after, and reduce-scatters the gradients (averaged over ranks, as DDP does),
so the optimizer states are sharded too. Under bfloat16 the :class:`MixedPrecisionPolicy` computes in
bfloat16 over fp32 master shards and reduces gradients in fp32. Activation checkpointing (the model's own
per-block ``torch.utils.checkpoint``) and ``torch.compile`` of the sharded model compose with it.

Checkpoints stay the ordinary single-file tinylm format: :func:`full_model_state` and
:func:`full_optimizer_state` gather the full (unsharded) state dicts onto rank 0 (every rank calls them:
they are collectives), the optimizer state converted from torch's parameter-name keys to the positional
ids a plain ``optimizer.state_dict()`` has, so any run, sharded or not, resumes from them.
:func:`load_optimizer_state` is the inverse (every rank passes the full state it loaded from the file;
each keeps its shard). The model's weights are loaded before sharding, as in any run.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU only


def shard_model(model: nn.Module, dtype: str) -> nn.Module:
    """Shard ``model`` (a TinyLM already on its device, identical on every rank) block by block, then the
    root; ``dtype`` ``bfloat16`` computes in bfloat16 with fp32 master weights and fp32 gradient reduction."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    # the forward's head path returns a view of lm_head.weight (for DDP's unused-parameter search); nothing
    # writes into it in place, the case that warning is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_tensor(value: Tensor) -> Tensor:
    """A ``DTensor`` gathered into a plain tensor (a collective: every rank calls it); a plain tensor as is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on rank 0 (plain CPU tensors, the keys of the unsharded model); ``{}``
    on the other ranks. Every rank calls it."""
    return get_model_state_dict(model, options=GATHERED)


def param_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> its first name in ``model`` (a tied weight is one parameter under one name)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return names


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s full state on rank 0 in the layout of a plain ``optimizer.state_dict()`` (states keyed
    by the parameter's position over the param groups); ``{}`` on the other ranks. Every rank calls it."""
    named = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    if not named:
        return {}
    order = [name for group in named["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(order)}
    groups = [{**group, "params": [position[name] for name in group["params"]]} for group in named["param_groups"]]
    return {"state": {position[name]: value for name, value in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`full_optimizer_state`: ``state`` (positional, the full tensors, given on every rank)
    into the sharded ``optimizer``; each rank keeps its shard."""
    names = param_names(model)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    named = {"state": {order[i]: value for i, value in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
