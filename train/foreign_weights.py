"""Weights from elsewhere as a :class:`~train.checkpoint.Checkpoint`: a transformers folder (Llama, Qwen3,
Qwen2-MoE, Qwen3-MoE) and a bare state dict of a given shape (MiniMind2 / minimind-3 / MiniMind-3-MoE ``.pth``:
:func:`load_state_dict`).

A transformers folder is ``config.json`` + ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), usually with ``tokenizer.json`` beside them. :func:`load_transformers`:

- reads the config with :func:`model.hf_config.config_from_hf` (anything tinylm cannot represent is refused
  naming the field);
- reads every tensor and maps them strictly (dtypes and shapes checked against the config before any model
  is built): tinylm's parameter names are transformers' names, so the mapping is the identity (MoE experts,
  fused or per expert: :func:`model.moe_hf.unfuse_experts`), plus the tied head (a tied file has no
  ``lm_head.weight``; one that holds a *different* head is refused). A missing, unexpected or mis-shaped
  tensor is one line naming it;
- records the folder's ``tokenizer.json`` (if any) as the checkpoint's tokenizer, so
  :func:`train.loading.find_tokenizer` and the dataset-tokenizer check treat it like a run's own.

The Checkpoint's ``path`` is the folder, so :func:`train.loading.load` of a recorded path (a LoRA base, a DPO
reference) reads it again, and its weights fingerprint is that of the mapped state dict (tensors kept in the
file's dtype, so a re-read gives the same fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.files import read_json
from core.tokenizer import TokenizerError, load_tokenizer
from model.config import ModelConfig
from model.hf_config import UnsupportedConfig, config_from_hf
from model.moe_hf import MoeInteropError, unfuse_experts
from model.transformer import state_shapes
from train.checkpoint import Checkpoint, TokenizerRecord
from train.weights import CheckpointError, nonfinite_tensors, state_problems, tensor_problems

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def is_transformers_folder(path: str | Path) -> bool:
    """A folder with a ``config.json`` (a tinylm run folder has none)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def load_transformers(folder: Path, tokenizer: str | Path | None = None) -> Checkpoint:
    """The Checkpoint of a transformers folder (CheckpointError naming the file and field on any problem);
    ``tokenizer`` replaces the folder's own."""
    conf_file = folder / CONFIG
    try:
        cfg = config_from_hf(_read_json(conf_file, "transformers config"))
    except UnsupportedConfig as e:  # the model layer does not know the file: name it
        raise CheckpointError(e.message, path=conf_file, field=e.field) from None
    state = map_state(read_safetensors(folder), cfg, folder)
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"non-finite weights (nan/inf in {', '.join(bad[:5])})", path=folder)
    record = tokenizer_record(Path(tokenizer) if tokenizer else folder / "tokenizer.json", folder)
    return Checkpoint(model=state, model_config=cfg, tokenizer=record, path=str(folder))


def load_state_dict(state: dict[str, Tensor], cfg: ModelConfig, path: Path,
                    tokenizer: str | Path | None = None) -> Checkpoint:
    """The Checkpoint of a bare state dict (a MiniMind2 / minimind-3 ``.pth``) of the shape ``cfg``.

    MiniMind's ``MiniMindForCausalLM`` names its tensors as transformers does (``model.embed_tokens``,
    ``model.layers.N.self_attn.{q,k,v,o}_proj`` (+ ``q_norm`` / ``k_norm`` in minimind-3),
    ``model.layers.N.mlp.{gate,up,down}_proj``, the two layer norms, ``model.norm``, ``lm_head``), and its tied
    state dict holds ``lm_head.weight`` as a copy of the embedding; so the mapping is :func:`map_state`'s, and
    every tensor's shape is checked against ``cfg``. MiniMind-3-MoE's ``MOEFeedForward`` names its router
    ``mlp.gate`` and its experts ``mlp.experts.E.{gate,up,down}_proj`` (tinylm's names; no shared expert) and
    routes top-1 with the weight renormalised to 1: the ``minimind3-moe`` preset; a state dict saved from
    transformers 5's Qwen3-MoE (fused experts) is read too."""
    state = map_state(state, cfg, path, "the --model / --model-arg shape")
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"non-finite weights (nan/inf in {', '.join(bad[:5])})", path=path)
    record = tokenizer_record(Path(tokenizer), path) if tokenizer else None
    return Checkpoint(model=state, model_config=cfg, tokenizer=record, path=str(path))


def read_safetensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards ``model.safetensors.index.json`` lists (each
    tensor where the index says, none twice)."""
    if (folder / WEIGHTS).is_file():
        return _read_file(folder / WEIGHTS)
    if not (folder / INDEX).is_file():
        raise CheckpointError(f"no {WEIGHTS} nor {INDEX} (tinylm reads safetensors weights)", path=folder)
    index = _read_json(folder / INDEX, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError("expected an object of tensor name -> shard file", path=folder / INDEX,
                              field="weight_map")
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise CheckpointError(f"shard {shard!r} is not a file name in this folder", path=folder / INDEX,
                                  field="weight_map")
        tensors = _read_file(folder / shard)
        for name, tensor in tensors.items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"tensor {name} is in {shard} but the index puts it in "
                                      f"{weight_map.get(name)}", path=folder / INDEX, field="weight_map")
            state[name] = tensor
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"tensor {absent[0]} is listed but not in {weight_map[absent[0]]}",
                              path=folder / INDEX, field="weight_map")
    return state


def _read_json(path: Path, what: str) -> Any:
    """``read_json``, and a number too long to convert (``ValueError`` past 4300 digits) is one line too."""
    try:
        return read_json(path, what, CheckpointError)
    except ValueError as e:
        raise CheckpointError(f"the {what} is corrupt: {e}", path=path) from None


def _read_file(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError("the safetensors file is missing", path=file)
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a readable safetensors file ({' '.join(str(e).split())})", path=file) from None


def map_state(state: dict[str, Tensor], cfg: ModelConfig, source: Path,
              shape_from: str = "its config.json") -> dict[str, Tensor]:
    """transformers' tensors -> tinylm's state dict for ``cfg`` (the same names; a tied head added), strictly:
    refused unless it is exactly the model's tensors with the model's shapes and float weight dtypes, each
    storing every element it claims. Nothing is allocated: the shapes come from the config."""
    problems = tensor_problems(state)
    if problems:
        raise CheckpointError(problems[0], path=source)
    out = dict(state)
    if cfg.is_moe:
        try:
            out = unfuse_experts(out, cfg)
        except MoeInteropError as e:
            raise CheckpointError(e.message, path=source, field=e.field) from None
    if cfg.tie_word_embeddings:
        if HEAD in out and EMBED in out and not torch.equal(out[HEAD], out[EMBED]):
            raise CheckpointError(f"{HEAD} differs from {EMBED} but the config ties them", path=source,
                                  field="tie_word_embeddings")
        if EMBED in out:
            out[HEAD] = out[EMBED]
    problems = state_problems(state_shapes(cfg), out)
    if problems:
        raise CheckpointError(f"the weights do not fit {shape_from}: " + "; ".join(problems), path=source)
    return out


def tokenizer_record(file: Path, source: Path) -> TokenizerRecord | None:
    """The tokenizer ``file`` (or folder) as a TokenizerRecord; None when a source's own ``tokenizer.json`` is
    absent (then the dataset's or ``--tokenizer`` serves). ``load_tokenizer`` refuses one whose ``<|endoftext|>``
    is not a single id; one without the ChatML tokens serves pretraining and is refused where a chat is rendered."""
    if file.name == "tokenizer.json" and not file.is_file() and file.parent == source:
        return None
    try:
        info = load_tokenizer(file)
    except TokenizerError as e:
        raise CheckpointError(f"its tokenizer: {e}", path=source) from None
    return TokenizerRecord(info.fingerprint, str(info.path), info.vocab_size, dict(info.special_ids),
                           info.chat.record())
