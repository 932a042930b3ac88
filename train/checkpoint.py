"""The checkpoint file: its record types (:class:`Checkpoint` and the records it holds), its one writer
(:meth:`Checkpoint.save`), its strict reader (:func:`read`) and the names of the files in a run folder.

A checkpoint file ``OUT/ckpt_<step>.pt`` is one ``torch.save`` dict readable with ``torch.load(weights_only=True)``
(tensors and plain Python values; numpy's RNG state is stored as a tensor): ``{"format": FORMAT, <the fields of
Checkpoint>}``, nested records as dicts. The schema is the dataclasses below; nothing else reads the payload.

Invariants:
- a file named ``ckpt_*.pt`` is always complete: written to a temp name, fsync-ed and renamed into place
  (``core.files.atomic_open``), so a kill at any instant leaves the previous one;
- ``model`` is the state dict of the *unwrapped* module (no DDP ``module.`` / compile ``_orig_mod.`` prefix);
  with ``lora`` set it holds only the adapter, and ``base`` names the frozen weights it applies to;
- :func:`read` is strict (``weights_only=True``, never anything else): a file that is not a tinylm checkpoint,
  an unknown format version, an unknown or missing field, a field of the wrong type or out of range, a model
  config that does not validate, tensors that claim more elements than they store or are not float weights,
  weights whose shapes do not match the config, non-finite weights are refused in one line naming the file
  and field, before any model is built;
- :meth:`Checkpoint.save` never writes non-finite weights.

Versions. ``tinylm-checkpoint-1`` (flat: optimizer / rng / ... at the top, ``dpo`` / ``distill`` records) is
read and converted; version 2 groups the resume state in ``training`` and the stage's hyper-parameters in
``stage_options``. A field added later gets a default, so older files keep loading.

A PPO run's value head (``train/value_head.py``) is a submodule of the policy while it trains; :meth:`save`
stores its tensors in the ``value_head`` field, never in ``model``, so ``model`` is always the policy alone.

Other sources (transformers folders, bare state dicts) and building models from a checkpoint live in
``train/loading.py``.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from core.files import atomic_open, make_dir
from core.tokenizer import TokenizerInfo
from model import ModelConfig
from model.config import ConfigError
from model.lora import LoRAConfig
from model.transformer import state_shapes
from train.value_head import split_value_head, value_head_shapes
from train.weights import (
    CheckpointError,
    model_state,
    nonfinite_tensors,
    overclaimed,
    short_list,
    state_fingerprint,
    state_problems,
    tensor_problems,
    unwrap,
)

FORMAT = "tinylm-checkpoint-2"
VERSION = 2
_FORMAT_PREFIX = "tinylm-checkpoint-"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
PRE_DECAY = "pre_decay.pt"  # a WSD run's checkpoint at its decay start: never pruned, never "latest"
# version 1 kept the resume state and the stage's options at the top level
_V1_TRAINING = ("optimizer", "schedule", "scaler", "rng", "world")
_V1_DROPPED = ("stage_state",)  # always empty in version 1
_V1_STAGE_OPTIONS = ("dpo", "distill")


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
    chat_template: dict | None = None  # meta.json's chat_template: family, template_sha256, declared, augment


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
    value_head: dict[str, Tensor] | None = None  # PPO: its value head (train/value_head.py), never part of ``model``
    path: str = field(default="", metadata={"stored": False})

    @classmethod
    def of(cls, model: nn.Module, tokenizer: TokenizerInfo | None = None, **fields: Any) -> Checkpoint:
        """A checkpoint of ``model``'s weights and config (recording ``tokenizer``), e.g. for tests and benches."""
        record = None if tokenizer is None else TokenizerRecord(
            tokenizer.fingerprint, str(tokenizer.path), tokenizer.vocab_size, dict(tokenizer.special_ids),
            tokenizer.chat.record())
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
                                  f"{short_list(bad)})", path=path)
        plain = _to_plain(self)
        plain["model"], head = split_value_head(self.model)  # an attached PPO value head is stored on its own
        if head:
            plain["value_head"] = head
        with atomic_open(path) as f:
            writer = _Writer(f)
            try:
                torch.save({"format": FORMAT, **plain}, writer)
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

    def check_tokenizer(self, fingerprint: str, dataset: str, role: str = "checkpoint",
                        required: bool = False) -> None:
        """Refuse a dataset packed with another tokenizer than this model was trained with (by fingerprint);
        ``required``: a checkpoint without a recorded tokenizer is refused too."""
        mine = self.tokenizer.fingerprint if self.tokenizer is not None else None
        if mine == fingerprint or (mine is None and not required):
            return
        where = self.tokenizer.path if self.tokenizer is not None else None
        raise CheckpointError(
            f"tokenizer mismatch: {role} {self.path} uses another tokenizer ({where}, fingerprint {str(mine)[:12]}) "
            f"than dataset {dataset} (fingerprint {fingerprint[:12]}); re-pack the data with the model's tokenizer")



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
        except ConfigError as e:
            raise CheckpointError(e.message, path=path, field=_join(where, e.field)) from None
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


def read(path: str | Path, resume: bool = False) -> Checkpoint:
    """The tinylm checkpoint file ``path`` as a :class:`Checkpoint` on the CPU, checked before anyone uses it
    (:func:`parse`). ``resume``: the resume state (optimizer, RNG) must be there too."""
    return parse(read_payload(Path(path)), str(path), resume)


def is_state_dict(payload: Any) -> bool:
    """A plain mapping of names to tensors (no tinylm format record): what ``torch.save(model.state_dict())``
    writes, e.g. MiniMind's ``.pth`` files."""
    return isinstance(payload, dict) and bool(payload) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in payload.items())


def parse(payload: Any, path: str, resume: bool) -> Checkpoint:
    """The strict checks of :func:`read`, in the order a reader would want them: format, the weights as
    tensors (no value read), the fields (the model config validated), the weights' shapes against the config,
    then their values (non-finite)."""
    version = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(version, str) or not version.startswith(_FORMAT_PREFIX):
        if is_state_dict(payload) and not resume:
            raise CheckpointError("not a tinylm checkpoint: a bare state dict (a MiniMind .pth?), which holds no "
                                  "config: give its shape with "
                                  "--model PRESET / --model-arg KEY=VALUE (and its tokenizer with --tokenizer)",
                                  path=path)
        kind = "a bare state dict" if is_state_dict(payload) else f"a {type(payload).__name__}"
        raise CheckpointError(f"not a tinylm checkpoint: {kind}, without the format {FORMAT!r} record", path=path)
    if version not in (FORMAT, _FORMAT_PREFIX + "1"):
        raise CheckpointError(f"format {version!r} is not one this tinylm reads (it reads {FORMAT!r} and older); "
                              "update tinylm", path=path, field="format")
    model = payload.get("model")
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in model.items()):
        raise CheckpointError("is not a mapping of parameter names to tensors", path=path, field="model")
    problems = tensor_problems(model)
    if problems:
        raise CheckpointError(problems[0], path=path, field="model")
    fields = {k: v for k, v in payload.items() if k != "format"}
    ckpt: Checkpoint = _from_plain(Checkpoint, fields if version == FORMAT else _upgrade_v1(fields), path)
    ckpt.path = path
    expected = state_shapes(ckpt.model_config)
    if ckpt.lora is not None:
        expected = adapter_shapes(expected, ckpt.lora)
    problems = state_problems(expected, model)
    if problems:
        what = "the adapter does not fit its model_config and lora" if ckpt.lora else \
            "the weights do not fit its model_config"
        raise CheckpointError(f"{what}: " + "; ".join(problems), path=path, field="model")
    if ckpt.value_head is not None:
        head, hidden = ckpt.value_head, ckpt.model_config.hidden_size
        problems = ["holds other values than tensors"] if not all(isinstance(v, Tensor) for v in head.values()) \
            else tensor_problems(head) or state_problems(value_head_shapes(hidden), head)
        if problems or nonfinite_tensors(head):
            raise CheckpointError("not a value head of this model: " + "; ".join(problems or ["non-finite weights"]),
                                  path=path, field="value_head")
    if resume:
        _check_resume_state(ckpt)
    bad = nonfinite_tensors(model)
    if bad:
        raise CheckpointError(f"non-finite weights (nan/inf in {short_list(bad)}): this checkpoint is unusable; "
                              "take an earlier one", path=path)
    return ckpt


def adapter_shapes(shapes: dict[str, tuple[int, ...]], lora: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """The name -> shape of a LoRA adapter's tensors over a model of ``shapes``: ``lora_A`` [r, in] and
    ``lora_B`` [out, r] for every targeted projection (``model/lora.py``)."""
    out = {}
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in lora.targets and len(shape) == 2:
            out[f"{module}.lora_A"] = (lora.rank, shape[1])
            out[f"{module}.lora_B"] = (shape[0], lora.rank)
    return out


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
    for rank, entry in enumerate(training.rng):
        bad = _rng_problem(entry)
        if bad:
            raise CheckpointError(f"{bad}; cannot resume from this file", path=ckpt.path,
                                  field=f"training.rng.{rank}")


def _rng_problem(entry: dict[str, Any]) -> str | None:
    """What keeps one rank's RNG record (``train.dist.rng_state``) from being restored, or None."""
    state = entry["torch"]
    want = torch.get_rng_state()
    if not isinstance(state, Tensor) or state.dtype != want.dtype or state.shape != want.shape:
        return f"torch: not a torch generator state ({want.dtype} [{want.numel()}])"
    npy = entry.get("numpy")
    if npy is not None and not (
            isinstance(npy, dict) and isinstance(npy.get("name"), str) and isinstance(npy.get("keys"), Tensor)
            and npy["keys"].dtype == torch.int64 and npy["keys"].shape == (624,)
            and all(isinstance(npy.get(k), int) for k in ("pos", "has_gauss"))
            and isinstance(npy.get("cached_gaussian"), float)):
        return "numpy: not a numpy generator state"
    py = entry.get("python")
    if py is not None and not (
            isinstance(py, (tuple, list)) and len(py) == 3 and isinstance(py[0], int)
            and isinstance(py[1], (tuple, list)) and len(py[1]) == 625 and all(isinstance(i, int) for i in py[1])
            and (py[2] is None or isinstance(py[2], float))):
        return "python: not a python generator state"
    return None


def read_payload(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of one file; every failure is one line that says what the file is. A
    tensor anywhere in it that claims more elements than its storage holds is refused here, before anyone
    reads it (reading would materialise every claimed element)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4" for a foreign pickle
            payload = torch.load(path, map_location="cpu", weights_only=True)
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
    for where, t in _tensors(payload):
        if overclaimed(t):
            raise CheckpointError(f"claims {t.numel()} elements over a storage of {t.untyped_storage().nbytes()} "
                                  "bytes (an expanded view); refused", path=path, field=where)
    return payload


def _tensors(value: Any, where: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in a payload of dicts, lists and tuples, with its place (``model.lm_head.weight``)."""
    if isinstance(value, Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, _join(where, str(k)))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, _join(where, str(i)))


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
