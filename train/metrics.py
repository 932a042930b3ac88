"""Run outputs on rank 0: ``metrics.jsonl``, optional TensorBoard / W&B, the loss-curve PNG, the
throughput window of the log lines, the console line of a step, the GPU peak FLOP/s table behind MFU, and
the per-token byte lengths that bits-per-byte needs.

``metrics.jsonl`` holds one JSON object per line, flushed as written (a ``kill -9`` loses at most the
line being written). Training lines carry ``step`` and ``loss``; evaluation lines ``step``, ``val_loss``
and ``val_bpb``. On resume from step s the file is first rewritten without the lines of steps > s,
so it always describes one unbroken run.

(Named ``metrics`` rather than ``logging``: ``python train/run.py`` puts ``train/`` first on sys.path,
where a ``logging.py`` would shadow the standard library for torch itself.)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import TinyLMError
from core.files import FileWriteError, atomic_write_bytes, atomic_write_text, make_dir, os_reason

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLogger:
    """Appends JSON lines; mirrors numeric values to TensorBoard / W&B when those were asked for."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = False, wandb: dict | None = None):
        self.path = out / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._tb = self._wandb = None
        if not enabled:
            return
        make_dir(out, "run folder")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("note: --tensorboard asked for but tensorboard is not installed (pip install tensorboard)",
                      file=sys.stderr)
        if wandb is not None:
            try:
                import wandb as wandb_lib
                self._wandb = wandb_lib.init(**wandb)
            except ImportError:
                print("note: --wandb asked for but wandb is not installed (pip install wandb)", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps > ``step`` (left by a run killed after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        steps = [_line_step(line) for line in lines]
        kept = [line for line, s in zip(lines, steps, strict=True) if s is not None and s <= step]
        unreadable = sum(s is None for s in steps[:-1])  # the last line may be half-written by a kill: not news
        if unreadable:
            print(f"note: {self.path}: dropped {unreadable} unreadable line(s) while rewinding to step {step}",
                  file=sys.stderr)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
        except OSError as e:
            raise FileWriteError(f"cannot append a metrics line ({os_reason(e)})", path=self.path) from None
        step = record.get("step", 0)
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Throughput:
    """Speed over the window since the last log line, and the run's ETA.

    :meth:`advance` counts one step of ``tokens`` input positions; :meth:`report` returns ``tokens_per_s``,
    ``supervised_per_s``, ``step_time_s``, ``eta_s`` (and ``mfu`` when the peak FLOP/s are known) and starts a
    new window. Time inside :meth:`paused` (evaluation, checkpoints) counts neither for the window nor the
    ETA, so the numbers are training speed only.
    """

    def __init__(self, step: int, supervised_seen: int, flops_per_token: float | None = None,
                 peak_flops: float | None = None) -> None:
        self.window_start = self.run_start = time.perf_counter()
        self.run_start_step = step
        self.window_supervised = supervised_seen
        self.window_tokens = 0
        self.window_steps = 0
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # of all processes together

    def advance(self, tokens: int) -> None:
        self.window_tokens += tokens
        self.window_steps += 1

    def is_first_step(self, step: int) -> bool:
        """The first step of this process (logged always: the first line shows the start speed)."""
        return step == self.run_start_step + 1

    def report(self, step: int, end: int, supervised_seen: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        out = {"tokens_per_s": self.window_tokens / elapsed,
               "supervised_per_s": (supervised_seen - self.window_supervised) / elapsed,
               "step_time_s": elapsed / max(self.window_steps, 1)}
        if self.flops_per_token and self.peak_flops:
            out["mfu"] = self.flops_per_token * out["tokens_per_s"] / self.peak_flops
        out["eta_s"] = (now - self.run_start) / max(step - self.run_start_step, 1) * (end - step)
        self.window_start = now
        self.window_supervised = supervised_seen
        self.window_tokens = 0
        self.window_steps = 0
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            pause = time.perf_counter() - started
            self.window_start += pause
            self.run_start += pause


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_jsonl(path: Path, what: str, unfinished_last_line: bool) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per non-blank line; ``what`` names the records in errors.

    With ``unfinished_last_line`` a last line that is not JSON and has no newline after it (the line being
    written when its writer was killed) is left out; every other line that is not a JSON object is a
    TinyLMError naming file and line (``not a JSON object (a corrupt <what> line)``). An unreadable file
    (or bytes that are not UTF-8) is a TinyLMError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = os_reason(e) if isinstance(e, OSError) else str(e)
        raise TinyLMError(f"cannot read the {what} ({reason})", path=path) from None
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if unfinished_last_line and n == len(lines):
                break
            record = None
        if not isinstance(record, dict):
            raise TinyLMError(f"not a JSON object (a corrupt {what} line)", path=path, line=n)
        out.append(record)
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of a run folder's). An unfinished last line (a killed run) is left
    out; any other line that is not a JSON object is a TinyLMError naming file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return read_jsonl(path, "metrics", unfinished_last_line=True)


def loss_png(records: list[dict[str, Any]], title: str) -> bytes | None:
    """Train loss (line) and validation loss (markers) against step as PNG bytes; None without either, or
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float)) and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    return image.getvalue()


def plot_losses(out: Path) -> Path | None:
    """Write ``out/loss.png`` (:func:`loss_png` of the run's metrics); None without a loss or matplotlib."""
    png = loss_png(read_metrics(out / METRICS_FILE), out.name)
    if png is None:
        return None
    path = out / PLOT_FILE
    atomic_write_bytes(path, [png])
    return path


# ---- bits per byte ------------------------------------------------------------------------------

def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable-characters map used by ByteLevel tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_byte_lengths(tokenizer_file: str | Path, vocab_size: int) -> np.ndarray:
    """UTF-8 byte length of every token id's text (int64 [vocab_size]); 0 for special/added tokens and
    for ids the tokenizer does not have (they are left out of bits-per-byte).

    ByteLevel tokenizers: the token string maps char-by-char onto bytes, so a token that holds part of
    a multi-byte character still counts its own bytes. Other tokenizers: length of the decoded text.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_file)
    spec = json.loads(path.read_text(encoding="utf-8"))
    tok = Tokenizer.from_str(json.dumps(spec))
    added = {t["id"] for t in spec.get("added_tokens", [])}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    inverse = _byte_level_decoder() if byte_level else {}
    out = np.zeros(vocab_size, dtype=np.int64)
    for token, tid in tok.get_vocab(with_added_tokens=True).items():
        if tid >= vocab_size or tid in added:
            continue
        if byte_level and all(c in inverse for c in token):
            out[tid] = len(token)
        else:
            out[tid] = len(tok.decode([tid]).encode("utf-8"))
    return out


def bits_per_byte(nats: float, n_bytes: float) -> float:
    return nats / (math.log(2) * n_bytes) if n_bytes > 0 else float("nan")


# Dense bf16 peak FLOP/s per GPU, by a substring of the device name (for MFU).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "4090": 165e12,
              "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s from :data:`PEAK_FLOPS` (None: not a CUDA device, or unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def format_line(record: dict[str, Any], max_steps: int, parts: list[str] | tuple[str, ...] = ()) -> str:
    """One human line: ``step 20/200 | loss 5.1234 | lr 4.2e-04 | 12.3k tok/s | mfu 31.0% | eta 1m20s``.

    ``parts`` are the stage's own metrics (e.g. DPO ``margin``, ``acc``), printed after the loss; an
    evaluation record prints every ``val_*`` value the stage reported."""
    width = len(str(max_steps))
    out = [f"step {record['step']:>{width}}/{max_steps}"]
    if "loss" not in record:  # an evaluation record (the RL stage's has no val_loss)
        if "val_loss" in record:
            out.append(f"val_loss {record['val_loss']:.4f}")
        for key, value in record.items():
            if key.startswith("val_") and key != "val_loss" and isinstance(value, float):
                out.append(f"{key} {value:.4f}")
        return " | ".join(out)
    out.append(f"loss {record['loss']:.4f}")
    out.extend(f"{key} {record[key]:.4f}" for key in parts)
    out.append(f"lr {record['lr']:.2e}")
    out.append(f"{_si(record['tokens_per_s'])} tok/s")
    if record.get("supervised_per_s", math.inf) < 0.99 * record["tokens_per_s"]:  # packed data: show both
        out.append(f"{_si(record['supervised_per_s'])} sup/s")
    if "mfu" in record:
        out.append(f"mfu {100 * record['mfu']:.1f}%")
    out.append(f"eta {_duration(record['eta_s'])}")
    return " | ".join(out)


def _si(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
