"""The checkpoint type: :class:`Checkpoint`, its one writer (:meth:`Checkpoint.save`) and one loader (:func:`load`).

A checkpoint file ``OUT/ckpt_<step>.pt`` is one ``torch.save`` dict readable with ``torch.load(weights_only=True)``
(tensors and plain Python values; numpy's RNG state is stored as a tensor): ``{"format": FORMAT, <the fields of
Checkpoint>}``, nested records as dicts. The schema is the dataclasses below; nothing else reads the payload.

Invariants:
- a file named ``ckpt_*.pt`` is always complete: written to a temp name, fsync-ed and renamed into place
  (``core.files.atomic_open``), so a kill at any instant leaves the previous one;
- ``model`` is the state dict of the *unwrapped* module (no DDP ``module.`` / compile ``_orig_mod.`` prefix);
  with ``lora`` set it holds only the adapter, and ``base`` names the frozen weights it applies to;
- :func:`load` is the one reader (``weights_only=True``, never anything else). It is strict: a file that is
  not a tinylm checkpoint, an unknown format version, an unknown or missing field, a field of the wrong
  type, non-finite weights are refused in one line naming the file and field. So every tool (training's
  ``--init-from`` / ``--resume`` / ``--teacher`` / ``--ref-from``, chat, serve, export, merge, eval) refuses it;
- :meth:`Checkpoint.save` never writes non-finite weights.

Versions. ``tinylm-checkpoint-1`` (flat: optimizer / rng / ... at the top, ``dpo`` / ``distill`` records) is
still read and converted; version 2 groups the resume state in ``training`` and the stage's hyper-parameters
in ``stage_options``. A field added later gets a default, so older files keep loading.

Sources. :func:`load` dispatches on what the path is: a tinylm checkpoint file or run folder, a transformers
folder (``config.json`` + safetensors) or a bare state dict such as MiniMind's ``.pth`` with its shape given
(:class:`SourceOptions`); the last two are mapped by ``train/imported.py``. Each comes back as a Checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import random
import re
import shutil
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from core.errors import TinyLMError
from core.files import atomic_open, atomic_write_bytes, make_dir
from core.tokenizer import TokenizerError, TokenizerInfo, file_fingerprint, load_tokenizer
from model import ModelConfig, TinyLM
from model.lora import LoRAConfig, apply_lora, load_lora_state_dict, merge_lora

FORMAT = "tinylm-checkpoint-2"
VERSION = 2
_FORMAT_PREFIX = "tinylm-checkpoint-"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
PRE_DECAY = "pre_decay.pt"  # a WSD run's checkpoint at its decay start: never pruned, never "latest"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# version 1 kept the resume state and the stage's options at the top level
_V1_TRAINING = ("optimizer", "schedule", "scaler", "rng", "world")
_V1_DROPPED = ("stage_state",)  # always empty in version 1
_V1_STAGE_OPTIONS = ("dpo", "distill")


class CheckpointError(TinyLMError):
    """A missing, unreadable or incompatible checkpoint; the message names the file."""


# ---- the type --------------------------------------------------------------------------------------------

@dataclass
class SourceRecord:
    """Another checkpoint a run depends on (init, LoRA base, DPO reference, teacher): where it was and which
    weights it held (:func:`state_fingerprint`), so it is recognised wherever it was copied to."""

    path: str
    step: int | None = None
    stage: str | None = None
    fingerprint: str | None = None


@dataclass
class TokenizerRecord:
    """The tokenizer the model was trained with (from the dataset's meta.json)."""

    fingerprint: str | None = None
    path: str | None = None
    vocab_size: int | None = None
    special_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class DataRecord:
    """The packed dataset and batch geometry of the run."""

    folder: str
    stage: str
    seq_len: int
    rows: int
    val_rows: int
    global_batch: int


@dataclass
class ResumeState:
    """What ``--resume`` restores besides weights and counters (one RNG entry per rank). ``optimizer`` is the
    AdamW state; a Muon run (``optimizer_name`` "muon") adds the Muon part's state in ``muon``. ``schedule`` is
    the schedule record (``train/schedule.py``: kind, warmup, max_steps, ...; no ``kind``: cosine)."""

    optimizer: dict[str, Any]
    rng: list[Any]
    schedule: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    world: int = 1
    optimizer_name: str = "adamw"
    muon: dict[str, Any] | None = None


@dataclass
class Checkpoint:
    """One checkpoint: weights, model config, provenance, counters and (for a run's own files) resume state.

    ``path`` is where it was loaded from (not stored). Counters are non-negative; ``step`` names the file."""

    model: dict[str, Tensor]
    model_config: ModelConfig
    stage: str | None = None
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0  # input positions processed (padding included)
    supervised_seen: int = 0  # positions with loss weight > 0
    nonfinite_skipped: int = 0
    tokenizer: TokenizerRecord | None = None
    data: DataRecord | None = None
    args: dict[str, Any] | None = None
    training: ResumeState | None = None
    lora: LoRAConfig | None = None  # set: ``model`` holds only this adapter, over ``base``
    base: SourceRecord | None = None
    init_from: SourceRecord | None = None
    reference: SourceRecord | None = None  # DPO
    teacher: SourceRecord | None = None  # distillation
    stage_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"beta": 0.1}
    merged_from: dict[str, Any] | None = None
    path: str = field(default="", metadata={"stored": False})

    @classmethod
    def of(cls, model: nn.Module, tokenizer: TokenizerInfo | None = None, **fields: Any) -> Checkpoint:
        """A checkpoint of ``model``'s weights and config (recording ``tokenizer``), e.g. for tests and benches."""
        record = TokenizerRecord(tokenizer.fingerprint, str(tokenizer.path), tokenizer.vocab_size,
                                 dict(tokenizer.special_ids)) if tokenizer is not None else None
        return cls(model=model_state(model), model_config=unwrap(model).config, tokenizer=record, **fields)

    # ---- writing -------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, keep_last: int = 0, name: str | None = None) -> Path:
        """Write atomically as ``folder/ckpt_<step>.pt`` (or ``folder/name``); then keep only the newest
        ``keep_last`` ``ckpt_*.pt`` (all when ``<= 0``). Refuses (CheckpointError, nothing written) non-finite
        weights; a full disk, a read-only or file-blocked folder is one FileWriteError naming the path, and the
        previous checkpoints stay."""
        folder = make_dir(folder, "run folder")
        path = folder / (name or checkpoint_name(self.step))
        bad = nonfinite_tensors(self.model)
        if bad:
            raise CheckpointError(f"refusing to write a checkpoint with non-finite weights (nan/inf in "
                                  f"{_short(bad)})", path=path)
        with atomic_open(path) as f:
            writer = _Writer(f)
            try:
                torch.save({"format": FORMAT, **_to_plain(self)}, writer)
            except RuntimeError:
                if writer.error is not None:  # torch's zip writer hides the OSError of a full disk
                    raise writer.error from None
                raise
        if keep_last > 0:
            for old in list_checkpoints(folder)[:-keep_last]:
                old.unlink(missing_ok=True)
        self.path = str(path)
        return path

    # ---- using ---------------------------------------------------------------------------------------------
    def source_record(self) -> SourceRecord:
        """This checkpoint as the runs that use it record it (with the weights' fingerprint)."""
        return SourceRecord(self.path, self.step, self.stage, state_fingerprint(self.model))

    def load_base(self, base_path: str | Path | None = None) -> Checkpoint:
        """The frozen base of a LoRA checkpoint (at ``base_path``, default the recorded path); refused unless
        its weights are the ones the adapter was trained on. The one place LoRA bases are resolved."""
        if self.lora is None or self.base is None:
            raise CheckpointError("not a LoRA checkpoint (no adapter over a recorded base)", path=self.path)
        if not self.base.fingerprint:
            raise CheckpointError("a LoRA checkpoint needs the base's weight fingerprint", path=self.path,
                                  field="base")
        base = load(base_path or self.base.path, options=SourceOptions(self.model_config))  # a .pth base: our shape
        if state_fingerprint(base.model) != self.base.fingerprint:
            raise CheckpointError(f"{base.path}: not the base model adapter {self.path} was trained on (weights "
                                  f"fingerprint {self.base.fingerprint[:12]} expected); it changed or moved: "
                                  "give the right one (bin/merge --base)")
        return base

    def adapted_model(self, base_path: str | Path | None = None) -> TinyLM:
        """The model this checkpoint describes: its weights, or (LoRA) the base with the adapter inserted."""
        model = TinyLM(self.model_config)
        if self.lora is None:
            load_model_state(model, self.model, self.path)
            return model
        base = self.load_base(base_path)
        load_model_state(model, base.model, base.path)
        apply_lora(model, self.lora)
        try:
            load_lora_state_dict(model, self.model)
        except (ValueError, KeyError) as e:
            raise CheckpointError(str(e), path=self.path, field="model") from None
        return model

    def dense_model(self, base_path: str | Path | None = None) -> TinyLM:
        """A plain TinyLM with these weights (a LoRA adapter merged into its base); eval mode, CPU."""
        model = self.adapted_model(base_path)
        if self.lora is not None:
            model = merge_lora(model)
            bad = nonfinite_tensors(model.state_dict())
            if bad:
                raise CheckpointError(f"non-finite weights after merging the adapter (nan/inf in {_short(bad, 3)})",
                                      path=self.path)
        return model.eval()

    def merged(self, base_path: str | Path | None = None) -> Checkpoint:
        """A LoRA checkpoint as a dense one: ``W + (alpha / r) * B A`` in every adapted projection, the run's
        counters and records kept, ``merged_from`` noting the adapter; chat, export and --init-from read it
        like any other. (A merged checkpoint has no resume state: it starts runs, it does not continue one.)"""
        if self.lora is None:
            raise CheckpointError("not a LoRA checkpoint (no adapter to merge)", path=self.path)
        model = self.dense_model(base_path)
        merged_from = {"adapter": self.path, "base": _to_plain(self.base), "lora": self.lora.to_dict()}
        return dataclasses.replace(self, model=model_state(model), lora=None, base=None, training=None,
                                   merged_from=merged_from, path="")

    def frozen_model(self) -> TinyLM:
        """The model with every parameter frozen, in eval mode (a DPO reference, a distillation teacher)."""
        return self.dense_model().requires_grad_(False)

    def check_tokenizer(self, fingerprint: str, dataset: str, role: str = "checkpoint",
                        required: bool = False) -> None:
        """Refuse a dataset packed with another tokenizer than this model was trained with (the one
        tokenizer-fingerprint check); ``required``: a checkpoint without a recorded tokenizer is refused too."""
        mine = self.tokenizer.fingerprint if self.tokenizer is not None else None
        if mine == fingerprint or (mine is None and not required):
            return
        where = self.tokenizer.path if self.tokenizer is not None else None
        raise CheckpointError(
            f"tokenizer mismatch: {role} {self.path} uses another tokenizer ({where}, fingerprint {str(mine)[:12]}) "
            f"than dataset {dataset} (fingerprint {fingerprint[:12]}); re-pack the data with the model's tokenizer")

    def find_tokenizer(self) -> TokenizerInfo:
        """The tokenizer it was trained with: ``<run folder>/tokenizer/tokenizer.json``, then the recorded path;
        the first whose fingerprint is the recorded one (any file when none is recorded)."""
        record = self.tokenizer or TokenizerRecord()
        candidates = [Path(self.path).parent / "tokenizer" / "tokenizer.json"]
        if record.path:
            candidates.append(Path(record.path))
        for file in candidates:
            found = file_fingerprint(file)
            if found is not None and (not record.fingerprint or found == record.fingerprint):
                try:
                    return load_tokenizer(file)
                except TokenizerError as e:
                    raise CheckpointError(f"its tokenizer: {e}", path=self.path) from None
        tried = ", ".join(str(c) for c in candidates)
        raise CheckpointError(f"its tokenizer (fingerprint {str(record.fingerprint)[:12]}) was not found (tried "
                              f"{tried})", path=self.path)


def merge_checkpoint(src: str | Path, out: str | Path, base_path: str | Path | None = None) -> Path:
    """Write ``out/ckpt_<step>.pt`` (+ ``out/tokenizer``) with the adapter of the LoRA checkpoint ``src`` merged
    into its base (:meth:`Checkpoint.merged`); returns its path. A folder this created is removed on failure."""
    ckpt = load(src)
    merged = ckpt.merged(base_path)
    out = Path(out)
    created = not out.exists()
    make_dir(out, "output folder")
    try:
        copy_tokenizer(Path(ckpt.path).parent / "tokenizer", out)
        return merged.save(out)  # written last: its presence means done
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


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


# ---- plain values <-> the type ---------------------------------------------------------------------------

def _to_plain(value: Any) -> Any:
    """Dataclasses as dicts of their stored fields (shallow: tensors are not copied), configs as dicts."""
    if isinstance(value, (ModelConfig, LoRAConfig)):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("stored", True)}
    return value


def _from_plain(cls: type, data: Any, path: str, where: str = "") -> Any:
    """``cls`` from a dict, strictly: unknown and missing fields, and fields of the wrong type, are refused."""
    if not isinstance(data, dict):
        raise CheckpointError(f"expected a record, got {type(data).__name__}", path=path, field=where or None)
    hints = typing.get_type_hints(cls)
    stored = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("stored", True)}
    unknown = sorted(str(k) for k in set(data) - set(stored))
    if unknown:
        raise CheckpointError("unknown field (written by a newer tinylm?)", path=path,
                              field=_join(where, unknown[0]))
    values = {}
    for name, f in stored.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], path, _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CheckpointError("missing", path=path, field=_join(where, name))
    return cls(**values)


def _convert(value: Any, hint: Any, path: str, where: str) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint in (ModelConfig, LoRAConfig):
        try:
            return hint.from_dict(value) if isinstance(value, dict) else _wrong(hint, value, path, where)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(str(e), path=path, field=where) from None
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, path, where)
    kind = typing.get_origin(hint) or hint
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _wrong(kind, value, path, where)
    if kind is int and value < 0:
        raise CheckpointError(f"must be >= 0, got {value}", path=path, field=where)
    return value


def _wrong(kind: type, value: Any, path: str, where: str) -> typing.NoReturn:
    raise CheckpointError(f"expected {kind.__name__}, got {type(value).__name__}", path=path, field=where)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _upgrade_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """A ``tinylm-checkpoint-1`` payload in the version-2 layout."""
    out = {k: v for k, v in payload.items() if k not in (*_V1_TRAINING, *_V1_STAGE_OPTIONS, *_V1_DROPPED)}
    if "optimizer" in payload:
        out["training"] = {k: payload[k] for k in _V1_TRAINING if k in payload}
    options = [payload.get(k) for k in _V1_STAGE_OPTIONS if isinstance(payload.get(k), dict)]
    out["stage_options"] = {k: v for record in options for k, v in record.items()}
    return out


# ---- reading -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceOptions:
    """What a foreign source may lack: ``config``, the shape of a bare state dict (a MiniMind ``.pth``, which
    holds no config: ``--model`` / ``--model-arg``), and ``tokenizer``, a tokenizer folder or file to use
    instead of the source's own (``--tokenizer``)."""

    config: ModelConfig | None = None
    tokenizer: str | Path | None = None


def load(path: str | Path, resume: bool = False, options: SourceOptions | None = None) -> Checkpoint:
    """A checkpoint file (or a run folder's latest) as a :class:`Checkpoint` on the CPU, checked before anyone
    uses it. ``resume``: the resume state (optimizer, RNG) must be there too. One line naming the file and
    field on any problem. The one loader: a transformers folder (``config.json`` beside safetensors) and a bare
    state dict with ``options.config`` (a MiniMind ``.pth``) are mapped by :mod:`train.imported`."""
    from train import imported  # the other sources; imported.py builds on this module

    options = options or SourceOptions()
    if imported.is_transformers_folder(path):
        if resume:
            raise CheckpointError("a transformers folder holds no training state to resume; start a run from it "
                                  "with --init-from", path=path)
        return imported.load_transformers(Path(path), options.tokenizer)
    path = resolve(path)
    payload = _read(path)
    if _is_state_dict(payload) and options.config is not None and not resume:
        return imported.load_state_dict(payload, options.config, path, options.tokenizer)
    return _parse(payload, str(path), resume)


def _is_state_dict(payload: Any) -> bool:
    """A plain mapping of names to tensors (no tinylm format record): what ``torch.save(model.state_dict())``
    writes, e.g. MiniMind's ``.pth`` files."""
    return isinstance(payload, dict) and bool(payload) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in payload.items())


def _parse(payload: Any, path: str, resume: bool) -> Checkpoint:
    """The strict checks of :func:`load`, in the order a reader would want them: format, model, fields."""
    version = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(version, str) or not version.startswith(_FORMAT_PREFIX):
        if _is_state_dict(payload) and not resume:
            raise CheckpointError("not a tinylm checkpoint: a bare state dict (a MiniMind .pth?), which holds no "
                                  "config: give its shape with "
                                  "--model PRESET / --model-arg KEY=VALUE (and its tokenizer with --tokenizer)",
                                  path=path)
        kind = "a bare state dict" if _is_state_dict(payload) else f"a {type(payload).__name__}"
        raise CheckpointError(f"not a tinylm checkpoint: {kind}, without the format {FORMAT!r} record", path=path)
    if version not in (FORMAT, _FORMAT_PREFIX + "1"):
        raise CheckpointError(f"format {version!r} is not one this tinylm reads (it reads {FORMAT!r} and older); "
                              "update tinylm", path=path, field="format")
    model = payload.get("model")
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in model.items()):
        raise CheckpointError("is not a mapping of parameter names to tensors", path=path, field="model")
    fields = {k: v for k, v in payload.items() if k != "format"}
    ckpt: Checkpoint = _from_plain(Checkpoint, fields if version == FORMAT else _upgrade_v1(fields), path)
    ckpt.path = path
    if resume:
        _check_resume_state(ckpt)
    bad = nonfinite_tensors(model)
    if bad:
        raise CheckpointError(f"non-finite weights (nan/inf in {_short(bad)}): this checkpoint is unusable; take an "
                              "earlier one", path=path)
    return ckpt


def _check_resume_state(ckpt: Checkpoint) -> None:
    """What ``--resume`` restores must be there: optimizer state and one RNG state per rank."""
    training = ckpt.training
    if training is None:
        raise CheckpointError("missing; cannot resume from this file (not written by a training run)",
                              path=ckpt.path, field="training")
    if "state" not in training.optimizer:
        raise CheckpointError("missing optimizer state; cannot resume from this file", path=ckpt.path,
                              field="training.optimizer")
    if not training.rng or not all(isinstance(r, dict) and "torch" in r for r in training.rng):
        raise CheckpointError("missing RNG state; cannot resume from this file", path=ckpt.path, field="training.rng")


def _read(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of one file; every failure is one line that says what the file is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4" for a foreign pickle
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        with path.open("rb") as f:
            head = f.read(2)
        what = ("a torch file holding other objects than tensors and plain values" if head == b"PK"
                else "a pickle of other objects than tensors and plain values" if head[:1] == b"\x80"
                else "not a torch checkpoint file")
        raise CheckpointError(f"not a tinylm checkpoint: {what} (checkpoints are only read as tensors and "
                              "plain values)", path=path) from None
    except (EOFError, RuntimeError, ValueError, OSError, IndexError, KeyError, TypeError, AttributeError):
        # truncated / corrupt zip archives raise RuntimeError; an empty file EOFError; others vary by torch version
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"not a readable checkpoint: the file is truncated or corrupt ({size} bytes)",
                              path=path) from None


class _Writer(io.RawIOBase):
    """A write-only file wrapper that remembers the OSError its writes raised (torch turns it into a bare
    RuntimeError)."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 (bytes-like)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise


# ---- files of a run folder -----------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def step_of(path: Path) -> int:
    """The step in a ``ckpt_<step>.pt`` name."""
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(step_of(p), p) for p in folder.iterdir() if _NAME.match(p.name) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


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


# ---- weights ---------------------------------------------------------------------------------------------------

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
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    shapes = [f"{k} {tuple(state[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    if shapes:
        problems.append(f"shape mismatch {_short(shapes)}")
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


def _short(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ---- RNG state -------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's torch / numpy / python (and CUDA when present) generator states."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
