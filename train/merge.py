"""Fold a LoRA run's adapter into its base model and write a normal dense checkpoint.

The LoRA checkpoint holds only the adapter (``model``), its config (``lora``) and the base it was trained
on (``base``: path, step, weight fingerprint). The merged checkpoint has the base model's keys with
``W + (alpha / r) * B A`` in every adapted projection, so chat, export and ``--init-from`` read it like any
other; it keeps the run's counters and tokenizer record and notes ``merged_from``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core.files import atomic_write_bytes, make_dir
from model import ModelConfig, TinyLM
from model.lora import LoRAConfig, apply_lora, load_lora_state_dict, merge_lora
from train import checkpoint
from train.checkpoint import CheckpointError

KEPT = ("step", "samples_seen", "tokens_seen", "supervised_seen", "model_config", "stage", "tokenizer", "data",
        "args", "init_from")


def lora_model(ckpt: dict, base_path: str | Path | None = None) -> TinyLM:
    """The base model of a loaded LoRA checkpoint with its adapter applied (not merged)."""
    if not ckpt.get("lora") or not ckpt.get("base"):
        raise CheckpointError(f"{ckpt['path']}: not a LoRA checkpoint (no adapter to merge)")
    record = ckpt["base"]
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not isinstance(
            record.get("fingerprint"), str) or not isinstance(ckpt["lora"], dict):
        raise CheckpointError("a LoRA checkpoint needs 'base' {path, fingerprint} and a 'lora' config",
                              path=ckpt["path"], field="base")
    base = checkpoint.load(base_path or record["path"])
    if checkpoint.state_fingerprint(base["model"]) != record["fingerprint"]:
        raise CheckpointError(f"{base['path']}: not the base model adapter {ckpt['path']} was trained on "
                              f"(weights fingerprint {record['fingerprint'][:12]} expected)")
    model = TinyLM(ModelConfig.from_dict(ckpt["model_config"]))
    checkpoint.load_model_state(model, base["model"], base["path"])
    try:
        apply_lora(model, LoRAConfig.from_dict(ckpt["lora"]))
        load_lora_state_dict(model, ckpt["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{ckpt['path']}: {e}") from None
    return model


def merge_checkpoint(src: str | Path, out: str | Path, base_path: str | Path | None = None) -> Path:
    """Write ``out/ckpt_<step>.pt`` (+ ``out/tokenizer``) with the adapter of ``src`` merged; returns its path."""
    ckpt = checkpoint.load(src)
    model = merge_lora(lora_model(ckpt, base_path))
    out = Path(out)
    payload = {k: ckpt[k] for k in KEPT if k in ckpt}
    payload["model"] = checkpoint.model_state(model)
    payload["merged_from"] = {"adapter": ckpt["path"], "base": ckpt["base"], "lora": ckpt["lora"]}
    bad = checkpoint.nonfinite_tensors(payload["model"])
    if bad:
        raise CheckpointError(f"merging gives non-finite weights (nan/inf in {', '.join(bad[:3])}); nothing written",
                              path=ckpt["path"])
    created = not out.exists()
    make_dir(out, "output folder")
    try:
        tokenizer = Path(ckpt["path"]).parent / "tokenizer"
        if tokenizer.is_dir() and tokenizer.resolve() != (out / "tokenizer").resolve():
            copy = make_dir(out / "tokenizer", "tokenizer folder")
            for file in sorted(tokenizer.iterdir()):
                if file.is_file():
                    atomic_write_bytes(copy / file.name, [file.read_bytes()])
        return checkpoint.save(out, int(ckpt.get("step") or 0), payload)  # written last: its presence = done
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
