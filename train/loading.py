"""Put weights into a model: every source a tool or a run may name, read into a checked :class:`Checkpoint`,
and a checkpoint made into the model it describes.

:func:`load` dispatches on what the path is: a tinylm checkpoint file or run folder (:func:`resolve`, read
strictly by :func:`train.checkpoint.read`), a transformers folder (``config.json`` + safetensors) or a bare
state dict such as MiniMind's ``.pth`` with its shape given in :class:`SourceOptions` (both mapped by
``train/foreign_weights.py``). Each comes back as a :class:`Checkpoint`, every field and tensor checked
before any model is built.

From a checkpoint: :func:`adapted_model` (its weights, or a LoRA adapter inserted into the base it records,
:func:`load_base`), :func:`dense_model` (the adapter merged), :func:`frozen_model` (a DPO reference, a
distillation teacher), :func:`merged` / :func:`merge_checkpoint` (a LoRA run folded into a dense checkpoint),
:func:`find_tokenizer` / :func:`copy_tokenizer` (the tokenizer it was trained with), and :func:`load_model`
(what chat, serve, export and eval use: dense weights in eval mode with their tokenizer).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from core.chat_families import trained_family
from core.files import atomic_write_bytes, make_dir
from core.tokenizer import TokenizerError, TokenizerInfo, file_fingerprint, load_tokenizer
from model import ModelConfig, TinyLM
from model.lora import apply_lora, load_lora_state_dict, merge_lora
from train import checkpoint, foreign_weights
from train.checkpoint import Checkpoint, TokenizerRecord, latest
from train.weights import (
    CheckpointError,
    load_model_state,
    model_state,
    nonfinite_tensors,
    short_list,
    state_fingerprint,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ---- a source as a checkpoint ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceOptions:
    """What a foreign source may lack: ``config``, the shape of a bare state dict (a MiniMind ``.pth``, which
    holds no config: ``--model`` / ``--model-arg``), and ``tokenizer``, a tokenizer folder or file to use
    instead of the source's own (``--tokenizer``)."""

    config: ModelConfig | None = None
    tokenizer: str | Path | None = None


def load(path: str | Path, resume: bool = False, options: SourceOptions | None = None) -> Checkpoint:
    """A checkpoint file (or a run folder's latest), a transformers folder or (with ``options.config``) a bare
    state dict as a :class:`Checkpoint` on the CPU, checked before anyone uses it. ``resume``: the resume state
    (optimizer, RNG) must be there too. One line naming the file and field on any problem."""
    options = options or SourceOptions()
    if foreign_weights.is_transformers_folder(path):
        if resume:
            raise CheckpointError("a transformers folder holds no training state to resume; start a run from it "
                                  "with --init-from", path=path)
        return foreign_weights.load_transformers(Path(path), options.tokenizer)
    path = resolve(path)
    payload = checkpoint.read_payload(path)
    if checkpoint.is_state_dict(payload) and options.config is not None and not resume:
        return foreign_weights.load_state_dict(payload, options.config, path, options.tokenizer)
    return checkpoint.parse(payload, str(path), resume)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's latest checkpoint; CheckpointError if there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint (ckpt_*.pt) in this folder")
        return found
    raise CheckpointError(f"{path}: no such checkpoint file or run folder")


# ---- a checkpoint as a model --------------------------------------------------------------------------------

def load_base(ckpt: Checkpoint, base_path: str | Path | None = None) -> Checkpoint:
    """The frozen base of a LoRA checkpoint (at ``base_path``, default the recorded path); refused unless its
    weights are the ones the adapter was trained on."""
    if ckpt.lora is None or ckpt.base is None:
        raise CheckpointError("not a LoRA checkpoint (no adapter over a recorded base)", path=ckpt.path)
    if not ckpt.base.fingerprint:
        raise CheckpointError("a LoRA checkpoint needs the base's weight fingerprint", path=ckpt.path,
                              field="base")
    base = load(base_path or ckpt.base.path, options=SourceOptions(ckpt.model_config))  # a .pth base: our shape
    if state_fingerprint(base.model) != ckpt.base.fingerprint:
        raise CheckpointError(f"{base.path}: not the base model adapter {ckpt.path} was trained on (weights "
                              f"fingerprint {ckpt.base.fingerprint[:12]} expected); it changed or moved: "
                              "give the right one (bin/merge --base)")
    return base


def adapted_model(ckpt: Checkpoint, base_path: str | Path | None = None) -> TinyLM:
    """The model ``ckpt`` describes: its weights, or (LoRA) the base with the adapter inserted."""
    if ckpt.lora is None:
        model = TinyLM(ckpt.model_config)
        load_model_state(model, ckpt.model, ckpt.path)
        return model
    base = load_base(ckpt, base_path)
    model = TinyLM(ckpt.model_config)
    load_model_state(model, base.model, base.path)
    apply_lora(model, ckpt.lora)
    try:
        load_lora_state_dict(model, ckpt.model)
    except (ValueError, KeyError) as e:
        raise CheckpointError(str(e), path=ckpt.path, field="model") from None
    return model


def dense_model(ckpt: Checkpoint, base_path: str | Path | None = None) -> TinyLM:
    """A plain TinyLM with the weights of ``ckpt`` (a LoRA adapter merged into its base); eval mode, CPU."""
    model = adapted_model(ckpt, base_path)
    if ckpt.lora is not None:
        model = merge_lora(model)
        bad = nonfinite_tensors(model.state_dict())
        if bad:
            raise CheckpointError(f"non-finite weights after merging the adapter (nan/inf in {short_list(bad, 3)})",
                                  path=ckpt.path)
    return model.eval()


def frozen_model(ckpt: Checkpoint) -> TinyLM:
    """The model with every parameter frozen, in eval mode (a DPO reference, a distillation teacher)."""
    return dense_model(ckpt).requires_grad_(False)


def merged(ckpt: Checkpoint, base_path: str | Path | None = None) -> Checkpoint:
    """A LoRA checkpoint as a dense one: ``W + (alpha / r) * B A`` in every adapted projection, the run's
    counters and records kept, ``merged_from`` noting the adapter; chat, export and --init-from read it like
    any other. A merged checkpoint has no resume state: it starts runs, it does not continue one."""
    if ckpt.lora is None:
        raise CheckpointError("not a LoRA checkpoint (no adapter to merge)", path=ckpt.path)
    model = dense_model(ckpt, base_path)
    base = dataclasses.asdict(ckpt.base) if ckpt.base is not None else None
    merged_from = {"adapter": ckpt.path, "base": base, "lora": ckpt.lora.to_dict()}
    return dataclasses.replace(ckpt, model=model_state(model), lora=None, base=None, training=None,
                               merged_from=merged_from, path="")


def merge_checkpoint(src: str | Path, out: str | Path, base_path: str | Path | None = None) -> Path:
    """Write ``out/ckpt_<step>.pt`` (+ ``out/tokenizer``) with the adapter of the LoRA checkpoint ``src`` merged
    into its base (:func:`merged`); returns its path. A folder this created is removed on failure."""
    ckpt = load(src)
    dense = merged(ckpt, base_path)
    out = Path(out)
    created = not out.exists()
    make_dir(out, "output folder")
    try:
        copy_tokenizer(Path(ckpt.path).parent / "tokenizer", out)
        return dense.save(out)  # written last: its presence means done
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


# ---- its tokenizer --------------------------------------------------------------------------------------------

def find_tokenizer(ckpt: Checkpoint) -> TokenizerInfo:
    """The tokenizer ``ckpt`` was trained with: ``<run folder>/tokenizer/tokenizer.json``, then the recorded
    path; the first whose fingerprint is the recorded one (any file when none is recorded)."""
    record = ckpt.tokenizer or TokenizerRecord()
    candidates = [Path(ckpt.path).parent / "tokenizer" / "tokenizer.json"]
    if record.path:
        candidates.append(Path(record.path))
    for file in candidates:
        found = file_fingerprint(file)
        if found is not None and (not record.fingerprint or found == record.fingerprint):
            try:
                return load_tokenizer(file, trained_family(record.chat_template))
            except TokenizerError as e:
                raise CheckpointError(f"its tokenizer: {e}", path=ckpt.path) from None
    tried = ", ".join(str(c) for c in candidates)
    raise CheckpointError(f"its tokenizer (fingerprint {str(record.fingerprint)[:12]}) was not found (tried "
                          f"{tried})", path=ckpt.path)


def copy_tokenizer(src_dir: Path, run_folder: Path) -> None:
    """Copy the tokenizer files of ``src_dir`` into ``run_folder/tokenizer`` (atomically, file by file), so a
    run folder is self-contained; nothing when ``src_dir`` has no tokenizer.json or is that folder already."""
    dst = run_folder / "tokenizer"
    if not (src_dir / "tokenizer.json").is_file() or (dst.exists() and dst.resolve() == src_dir.resolve()):
        return
    make_dir(dst, "tokenizer folder")
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            atomic_write_bytes(dst / name, [(src_dir / name).read_bytes()])


# ---- a model ready for inference --------------------------------------------------------------------------------

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
    :class:`LoadedModel`: the dense model (a LoRA adapter merged into the base it records) on ``device`` and
    the tokenizer recorded with it. Every problem (missing or foreign source, non-finite weights, a missing or
    mismatched tokenizer, weights that do not fit the config, a tokenizer larger than the model's vocabulary,
    an unusable device) is one CheckpointError line naming the file."""
    ckpt = load(path, options=options)
    info = find_tokenizer(ckpt)
    if info.vocab_size > ckpt.model_config.vocab_size:
        raise CheckpointError(f"tokenizer {info.path} has {info.vocab_size} ids but the model's vocab_size is "
                              f"{ckpt.model_config.vocab_size}", path=ckpt.path)
    model = dense_model(ckpt)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CheckpointError(f"device {device!r} is not usable: {e}") from None
    return LoadedModel(model, info, ckpt)
