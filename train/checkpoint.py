"""Checkpoints: atomic files ``OUT/ckpt_<step>.pt``, keep-last-K, strict loading, RNG capture.

A checkpoint is one ``torch.save`` dict readable with ``torch.load(weights_only=True)`` (tensors and
plain Python values only; numpy's RNG state is stored as a tensor). Keys written by the loop:
``format, step, samples_seen, tokens_seen, supervised_seen, model, model_config, stage, stage_state,
optimizer, schedule, scaler, rng (one entry per rank), tokenizer {fingerprint, path}, data, args``.

Invariants:
- a file named ``ckpt_*.pt`` is always complete: it is written to a hidden temp name, fsync-ed and
  renamed into place (the folder is fsync-ed too), so a kill at any instant leaves the previous one;
- ``model`` is the state dict of the *unwrapped* module: neither DDP's ``module.`` nor
  ``torch.compile``'s ``_orig_mod.`` prefix ever reaches a file;
- loading into a model refuses missing or unexpected keys and shape mismatches, naming them;
- :func:`load` is the one reader (``weights_only=True``, never anything else): a file that is not a tinylm
  checkpoint, or one with non-finite weights, is refused in one line naming it, so every tool (training's
  ``--init-from`` / ``--resume`` / ``--teacher`` / ``--ref-from``, chat, serve, export, merge, eval) refuses it;
- :func:`save` never writes non-finite weights.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from core.errors import TinyLMError
from core.files import atomic_open, make_dir
from core.tokenizer import TokenizerError, TokenizerInfo, load_tokenizer

FORMAT = "tinylm-checkpoint-1"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(TinyLMError):
    """A missing, unreadable or incompatible checkpoint; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
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


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = unwrap(module).state_dict()
    bad = [k for k in state if "_orig_mod." in k or k.startswith("module.")]
    if bad:
        raise CheckpointError(f"wrapper prefixes in the state dict: {bad[:3]}")
    return state


def save(folder: str | Path, step: int, payload: dict[str, Any], keep_last: int = 0) -> Path:
    """Write ``payload`` atomically as ``folder/ckpt_<step>.pt``; then keep only the newest ``keep_last``
    (all when ``keep_last <= 0``). Returns the path. Refuses (CheckpointError, nothing written) a payload
    whose ``model`` holds non-finite values; a full disk, a read-only or file-blocked folder is one
    FileWriteError naming the path, and the previous checkpoints stay as they were."""
    folder = make_dir(folder, "run folder")
    path = folder / checkpoint_name(step)
    bad = nonfinite_tensors(payload.get("model") or {})
    if bad:
        raise CheckpointError(f"refusing to write a checkpoint with non-finite weights (nan/inf in {_short(bad)})",
                              path=path)
    with atomic_open(path) as f:
        writer = _Writer(f)
        try:
            torch.save({"format": FORMAT, **payload}, writer)
        except RuntimeError:
            if writer.error is not None:  # torch's zip writer hides the OSError of a full disk
                raise writer.error from None
            raise
    if keep_last > 0:
        for old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


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


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a nan or an inf (one host sync in all)."""
    names = [k for k, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(state[k]).all().cpu() for k in names]).tolist()
    return [k for k, ok in zip(names, flags, strict=True) if not ok]


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


def load(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """Read a checkpoint file (or a run folder's latest) onto the CPU and check it before anyone uses it.

    Always ``weights_only=True``. Refused with one line naming the file: anything that is not a readable
    torch file, a payload that is not a tinylm checkpoint (format, a ``model`` mapping of tensors, a valid
    ``model_config``), non-finite weights, and with ``resume`` missing resume state (optimizer, counters, RNG).
    """
    path = resolve(path)
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        kind = ("a bare state dict" if isinstance(payload, dict) and payload
                and all(isinstance(v, torch.Tensor) for v in payload.values()) else f"a {type(payload).__name__}")
        raise CheckpointError(f"not a tinylm checkpoint: {kind}, without the format {FORMAT!r} record", path=path)
    model = payload.get("model")
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise CheckpointError("is not a mapping of parameter names to tensors", path=path, field="model")
    _check_config(payload.get("model_config"), path)
    for key, kind in (("step", int), ("stage", str), ("tokenizer", dict), ("data", dict), ("args", dict),
                      ("lora", dict), ("base", dict), ("reference", dict), ("teacher", dict), ("init_from", dict)):
        if key in payload and payload[key] is not None and not isinstance(payload[key], kind):
            raise CheckpointError(f"expected {kind.__name__}, got {type(payload[key]).__name__}", path=path,
                                  field=key)
    if resume:
        _check_resume_state(payload, path)
    bad = nonfinite_tensors(model)
    if bad:
        raise CheckpointError(f"non-finite weights (nan/inf in {_short(bad)}): this checkpoint is unusable; take an "
                              "earlier one", path=path)
    payload["path"] = str(path)
    return payload


def _check_config(config: Any, path: Path) -> None:
    from model import ModelConfig  # train -> model; imported here so checkpoint stays light for readers

    if not isinstance(config, dict):
        raise CheckpointError("missing or not a mapping", path=path, field="model_config")
    try:
        ModelConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e), path=path, field="model_config") from None


def _check_resume_state(payload: dict[str, Any], path: Path) -> None:
    """What ``--resume`` restores must be there with the right types."""
    for key in ("step", "samples_seen", "tokens_seen", "supervised_seen"):
        if not isinstance(payload.get(key), int) or isinstance(payload.get(key), bool) or payload[key] < 0:
            raise CheckpointError("missing or not a non-negative integer; cannot resume from this file", path=path,
                                  field=key)
    if not isinstance(payload.get("optimizer"), dict) or "state" not in payload["optimizer"]:
        raise CheckpointError("missing optimizer state; cannot resume from this file", path=path, field="optimizer")
    rng = payload.get("rng")
    if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) and "torch" in r for r in rng):
        raise CheckpointError("missing RNG state; cannot resume from this file", path=path, field="rng")


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` (unwrapped); refuse any missing, unexpected or mis-shaped key."""
    target = unwrap(model)
    own = target.state_dict()
    if state and all(k.endswith((".lora_A", ".lora_B")) for k in state) and not any("lora_" in k for k in own):
        raise CheckpointError(f"{source}: holds only a LoRA adapter, not a whole model; fold it into its base "
                              f"first: bin/merge --ckpt {source} --out DIR")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if shapes:
        problems.append(f"shape mismatch {_short(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: the checkpoint does not fit this model: " + "; ".join(problems))
    target.load_state_dict(state, strict=True)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of a state dict: names the weights (not the
    file), so a reference or a LoRA base is recognised wherever its checkpoint was copied to."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_record(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``{path, step, stage, fingerprint}`` of a loaded checkpoint, as stored in the runs that use it."""
    return {"path": ckpt["path"], "step": ckpt.get("step"), "stage": ckpt.get("stage"),
            "fingerprint": state_fingerprint(ckpt["model"])}


def _short(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def find_tokenizer(ckpt: dict[str, Any]) -> TokenizerInfo:
    """The tokenizer a loaded checkpoint was trained with: ``<run folder>/tokenizer/tokenizer.json``, then
    the recorded ``tokenizer.path``; the first whose sha256 equals the recorded fingerprint (any file when
    none is recorded). CheckpointError (one line naming what was tried) when none fits."""
    record = ckpt.get("tokenizer") or {}
    want = record.get("fingerprint")
    candidates = [Path(ckpt["path"]).parent / "tokenizer" / "tokenizer.json"]
    if record.get("path"):
        candidates.append(Path(record["path"]))
    for file in candidates:
        if file.is_file() and (not want or hashlib.sha256(file.read_bytes()).hexdigest() == want):
            try:
                return load_tokenizer(file)
            except TokenizerError as e:
                raise CheckpointError(str(e)) from None
    tried = ", ".join(str(c) for c in candidates)
    raise CheckpointError(f"{ckpt['path']}: its tokenizer (fingerprint {str(want)[:12]}) was not found "
                          f"(tried {tried})")


def check_tokenizer(ckpt: dict[str, Any], fingerprint: str, dataset: str) -> None:
    """Refuse a dataset packed with another tokenizer than the checkpoint's model was trained with."""
    tok = ckpt.get("tokenizer") or {}
    if tok.get("fingerprint") and tok["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"tokenizer mismatch: checkpoint {ckpt.get('path', '?')} was trained with tokenizer "
            f"{tok.get('path')} (fingerprint {tok['fingerprint'][:12]}), but dataset {dataset} was packed "
            f"with fingerprint {fingerprint[:12]}; re-pack the data with the checkpoint's tokenizer")


# ---- RNG state ---------------------------------------------------------------------------------

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
