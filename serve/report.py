"""A Markdown report over finished run folders, with one loss picture per run (``bin/report``).

A run folder is what ``train/run.py --out`` fills: ``metrics.jsonl`` and/or ``ckpt_*.pt``. For each run the
report reads, only through the readers that own those files: the latest checkpoint (``train.loading.load``:
stage, model config, tokenizer, data record, arguments, counters), ``metrics.jsonl``
(``train.metrics.read_metrics``), the packed dataset's ``meta.json`` that the checkpoint names
(``preprocess.shards.read_meta``), the clean report of that dataset when there is one (train.sh's layout
``OUT/data/clean/<name>.report.json`` beside ``OUT/packed/<name>``, or one given with ``--clean-report``) and
``eval_results.jsonl`` (``bin/eval``'s results, shown grouped by kind).

Sections: the hardware the report is written on and the run's recorded device flags; a table of all runs;
per run its data, model and parameter count, training time (the sum of the logged step times, so evaluation
and checkpoint pauses are left out), tokens/s and MFU (when the run knew its peak FLOP/s), last train and
validation numbers, its loss picture, evaluation results and logged sample answers
(``{"step": N, "samples": [{"prompt", "answer"}, ...]}`` lines of metrics.jsonl).

Contract: everything is read and rendered in memory first, so a bad input (not a run folder, an unreadable
metrics or results file, a corrupt checkpoint, an output that would replace one of a run's own files) is one
TinyLMError and nothing is written. Then the pictures and the Markdown are written atomically, the Markdown
last. Missing optional parts (packed data moved away, no evaluation, no samples) are stated in the report.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import TinyLMError
from core.files import atomic_write_bytes, atomic_write_text, check_file_target, read_json
from preprocess.shards import read_meta
from serve.evaluate import RESULTS_FILE
from train import checkpoint, loading
from train.checkpoint import Checkpoint
from train.metrics import METRICS_FILE, loss_png, read_jsonl, read_metrics

MARKER = "<!-- written by bin/report -->"
RUN_FILES = re.compile(r"^(ckpt_\d+\.pt|pre_decay\.pt|metrics\.jsonl|eval_results\.jsonl|loss\.png|\.lock)$")
SAMPLE_ANSWER_CHARS = 600  # an answer longer than this is cut in the report (the metrics line keeps all of it)


class ReportError(TinyLMError):
    """A path that is not a run folder, an unreadable input, or an output that would replace a run's file."""


@dataclass
class Run:
    """What the report shows of one run folder."""

    folder: Path
    records: list[dict[str, Any]]
    ckpt: Checkpoint | None
    results: list[dict[str, Any]]
    meta: dict[str, Any] | None = None
    data_note: str = ""  # why there is no meta (packed folder moved away, RL prompts, ...)
    clean: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)

    @property
    def stage(self) -> str:
        if self.ckpt is not None and self.ckpt.stage:
            return self.ckpt.stage
        args = self.ckpt.args if self.ckpt is not None else None
        return str((args or {}).get("stage") or "?")


# ---- reading --------------------------------------------------------------------------------------------------

def is_run_folder(path: Path) -> bool:
    return path.is_dir() and ((path / METRICS_FILE).is_file() or checkpoint.latest(path) is not None)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of an ``eval_results.jsonl`` (written a whole line at a time, so every line must be a JSON
    object); [] when absent."""
    if not path.exists():
        return []
    return read_jsonl(path, "results", unfinished_last_line=False)


def read_run(folder: str | Path, clean_reports: Iterable[Path] = ()) -> Run:
    """One run folder's records, checkpoint, results, packed-data meta and clean reports."""
    folder = Path(folder)
    if not is_run_folder(folder):
        what = "no such folder" if not folder.exists() else "not a folder" if not folder.is_dir() else \
            f"not a run folder (no {METRICS_FILE}, no ckpt_*.pt)"
        raise ReportError(what, path=folder)
    records = read_metrics(folder) if (folder / METRICS_FILE).exists() else []
    ckpt = loading.load(folder) if checkpoint.latest(folder) is not None else None
    run = Run(folder, records, ckpt, read_results(folder / RESULTS_FILE))
    attach_data(run, list(clean_reports))
    return run


def attach_data(run: Run, clean_reports: list[Path]) -> None:
    """The packed meta.json the checkpoint records, and the clean reports of that dataset."""
    if run.ckpt is None or run.ckpt.data is None:
        run.data_note = "no checkpoint records the run's data"
        return
    data = run.ckpt.data
    packed = Path(data.folder)
    if packed.is_file():  # the RL stage trains on a prompts file
        run.data_note = f"prompts `{packed}`: {data.rows:,} prompts, rows up to {data.seq_len} tokens"
        return
    if not (packed / "meta.json").is_file():
        run.data_note = (f"the run's data `{packed}` is not found here (moved, deleted, or relative to another "
                         f"folder); the run recorded {data.rows:,} rows of {data.seq_len} tokens")
        return
    try:
        run.meta = read_meta(packed)
    except TinyLMError as e:
        run.data_note = f"packed data unreadable: {e}"
        return
    layout = packed.parent.parent / "data" / "clean" / f"{packed.name}.report.json"
    for path in [*clean_reports, layout]:
        if not path.is_file() or any(path.resolve() == seen.resolve() for seen, _ in run.clean):
            continue
        report = read_json(path, "clean report", ReportError)
        if isinstance(report, dict) and report.get("stage") == run.meta["stage"]:
            run.clean.append((path, report))


# ---- numbers --------------------------------------------------------------------------------------------------

def training_speed(records: list[dict[str, Any]]) -> dict[str, float]:
    """Training seconds (sum of step_time_s x steps per logged window), tokens/s and time-weighted MFU."""
    seconds = tokens = mfu_time = mfu_sum = 0.0
    previous = 0
    for r in records:
        if "step_time_s" not in r or "step" not in r:
            continue
        window = r["step_time_s"] * max(r["step"] - previous, 1)
        previous = r["step"]
        seconds += window
        tokens += r.get("tokens_per_s", 0.0) * window
        if isinstance(r.get("mfu"), (int, float)):
            mfu_time += window
            mfu_sum += r["mfu"] * window
    out = {"seconds": seconds}
    if seconds > 0:
        out["tokens_per_s"] = tokens / seconds
    if mfu_time > 0:
        out["mfu"] = mfu_sum / mfu_time
    return out


def last_with(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return next((r for r in reversed(records) if key in r), None)


def result_kind(record: dict[str, Any]) -> str:
    """A results line's kind: its own ``kind`` field, else what bin/eval's record holds."""
    if isinstance(record.get("kind"), str):
        return record["kind"]
    for key, kind in (("metrics", "held-out"), ("reward_metrics", "rewards"), ("answers", "answers")):
        if key in record:
            return kind
    return "other"


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Scalar leaves as ``a.b`` -> text; lists of scalars joined; other lists counted."""
    out: dict[str, str] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            scalar = all(not isinstance(v, (dict, list)) for v in value)
            out[name] = ", ".join(str(v) for v in value) if scalar else f"{len(value)} items"
        else:
            out[name] = number(value)
    return out


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def fenced(text: str) -> list[str]:
    """``text`` in a code fence longer than any backtick run inside it (so nothing in it is Markdown)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


# ---- pictures -------------------------------------------------------------------------------------------------

def picture_names(runs: list[Run], out: Path) -> list[Path]:
    """``<out stem>-<run folder name>.png`` beside the Markdown, numbered when two runs share a name."""
    names, used = [], set()
    for run in runs:
        base, n = f"{out.stem}-{run.folder.name}", 1
        name = f"{base}.png"
        while name in used:
            n += 1
            name = f"{base}-{n}.png"
        used.add(name)
        names.append(out.parent / name)
    return names


# ---- rendering ------------------------------------------------------------------------------------------------

def hardware_lines(runs: list[Run]) -> list[str]:
    """This machine, then each run's recorded device flags and process count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory"
    except (ValueError, OSError, AttributeError):
        memory = ""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    lines = ["## Hardware", "",
             f"- report written on: {cpu}, {os.cpu_count()} CPU cores{memory}; "
             f"{', '.join(gpus) if gpus else 'no CUDA GPU'}; {platform.system()} {platform.release()}, "
             f"Python {platform.python_version()}, torch {torch.__version__}"]
    for run in runs:
        args = (run.ckpt.args or {}) if run.ckpt is not None else {}
        world = run.ckpt.training.world if run.ckpt is not None and run.ckpt.training is not None else None
        flags = ", ".join(f"--{k} {args[k]}" for k in ("device", "dtype", "compile")
                          if args.get(k) is not None)
        lines.append(f"- run `{run.folder.name}` recorded: {flags or 'no device flags'}"
                     + (f"; {world} process(es)" if world else ""))
    return [*lines, ""]


def summary_table(runs: list[Run]) -> list[str]:
    lines = ["## Runs", "",
             "| run | stage | params | steps | train time | tokens/s | last loss | val loss | held-out loss | "
             "held-out bpb |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        speed = training_speed(run.records)
        last = last_with(run.records, "loss") or {}
        val = last_with(run.records, "val_loss") or {}
        held = next((r["metrics"] for r in reversed(run.results) if result_kind(r) == "held-out"
                     and isinstance(r.get("metrics"), dict)), {})
        params = f"{run.ckpt.model_config.num_params() / 1e6:.2f}M" if run.ckpt is not None else "?"
        steps = run.ckpt.step if run.ckpt is not None else (last.get("step") or "?")
        row = [run.folder.name, run.stage, params, steps, f"{speed['seconds']:.1f} s",
               number(speed["tokens_per_s"]) if "tokens_per_s" in speed else "–",
               number(last["loss"]) if "loss" in last else "–", number(val["val_loss"]) if val else "–",
               number(held["loss"]) if "loss" in held else "–", number(held["bpb"]) if "bpb" in held else "–"]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return [*lines, ""]


def data_lines(run: Run) -> list[str]:
    lines = ["### Data", ""]
    if run.meta is None:
        return [*lines, f"- {run.data_note}", ""]
    m, c = run.meta, run.meta["counts"]
    packed = run.ckpt.data.folder if run.ckpt is not None and run.ckpt.data is not None else "?"
    dropped = sum(c["dropped"].values()) + sum(c["skipped"].values())
    lines += [f"- packed `{packed}`: {m['stage']} rows of {m['seq_len']} tokens, tokenizer "
              f"`{m['tokenizer']['path']}` (vocab {m['tokenizer']['vocab_size']:,})",
              f"- records: {c['records_read']:,} read, {c['records_kept']:,} kept ({c['truncated']:,} truncated), "
              f"{dropped:,} dropped or skipped"
              + "".join(f"; {k} {v:,}" for k, v in {**c["dropped"], **c["skipped"]}.items()),
              f"- tokens: {c['tokens']:,} in {c['documents']:,} documents, {c['supervised_tokens']:,} with loss; "
              f"{c['rows']:,} rows, packing efficiency {m['packing']['efficiency']:.1%}"]
    lines += [f"- source `{s['path']}`: {s['bytes']:,} bytes, weight {s['weight']:g}"
              + (f", {s['records']:,} records" if "records" in s else "") for s in m["sources"]]
    for path, report in run.clean:
        counts = report.get("counts", {})
        removed = counts.get("removed") or {}
        skipped = counts.get("skipped") or {}
        lines.append(f"- cleaning (`{path}`): {number(counts.get('read', '?'))} read, "
                     f"{number(counts.get('written', counts.get('kept', '?')))} written; removed "
                     + (", ".join(f"{k} {number(v)}" for k, v in removed.items()) or "none")
                     + ("; skipped " + ", ".join(f"{k} {number(v)}" for k, v in skipped.items()) if skipped else ""))
    if not run.clean:
        lines.append("- cleaning: no clean report found for this dataset")
    return [*lines, ""]


def model_lines(run: Run) -> list[str]:
    lines = ["### Model", ""]
    if run.ckpt is None:
        return [*lines, "- no checkpoint written yet", ""]
    cfg, ck = run.ckpt.model_config, run.ckpt
    lines.append(f"- {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
                 f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, vocab {cfg.vocab_size:,}, "
                 f"context {cfg.max_position_embeddings:,}")
    lines.append(f"- parameters: {cfg.num_params():,} ({cfg.num_params() / 1e6:.2f}M)"
                 + (f", {cfg.num_params(active=True):,} active per token" if cfg.is_moe else ""))
    if ck.lora is not None:
        adapter = sum(t.numel() for t in ck.model.values())
        lines.append(f"- LoRA rank {ck.lora.rank}: {adapter:,} adapter parameters over `{ck.base.path}`"
                     if ck.base is not None else f"- LoRA rank {ck.lora.rank}: {adapter:,} adapter parameters")
    for what, source in (("started from", ck.init_from), ("reference", ck.reference), ("teacher", ck.teacher)):
        if source is not None:
            lines.append(f"- {what} `{source.path}` (step {source.step})")
    lines.append(f"- checkpoint `{ck.path}`: step {ck.step:,}, {ck.tokens_seen:,} tokens seen, "
                 f"{ck.supervised_seen:,} with loss")
    return [*lines, ""]


def training_lines(run: Run, picture: Path | None) -> list[str]:
    speed = training_speed(run.records)
    lines = ["### Training", "", f"- training time: {speed['seconds']:.1f} s (logged step times; evaluation and "
             "checkpoints excluded)"]
    if "tokens_per_s" in speed:
        lines.append(f"- tokens/s: {number(speed['tokens_per_s'])}")
    lines.append(f"- MFU: {speed['mfu']:.1%}" if "mfu" in speed else
                 "- MFU: not known (the run had no peak FLOP/s for its device)")
    last = last_with(run.records, "loss")
    if last is not None:
        lines.append(f"- last train loss: {number(last['loss'])} at step {last['step']}")
    val = last_with(run.records, "val_loss")
    if val is not None:
        shown = ", ".join(f"{k} {number(v)}" for k, v in val.items() if k.startswith("val_"))
        lines.append(f"- last validation: {shown} at step {val['step']}")
    skipped = last_with(run.records, "skipped_nonfinite")
    if skipped is not None:
        lines.append(f"- non-finite steps skipped: {skipped['skipped_nonfinite']}")
    lines.append("")
    lines += [f"![{run.folder.name} loss]({picture.name})", ""] if picture is not None else \
        ["(no loss picture: no loss lines logged, or matplotlib is not installed)", ""]
    return lines


def results_lines(run: Run) -> list[str]:
    lines = ["### Evaluations", ""]
    if not run.results:
        return [*lines, f"- none (no {RESULTS_FILE})", ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in run.results:
        groups.setdefault(result_kind(record), []).append(record)
    for record in groups.get("held-out", []):
        m = record.get("metrics")
        if isinstance(m, dict):
            shown = ", ".join(f"{k} {number(m[k])}" for k in ("loss", "perplexity", "bpb", "tokens") if k in m)
            lines.append(f"- held-out {record.get('stage', '')} at step {record.get('step', '?')}: {shown} "
                         f"({', '.join(f'`{d}`' for d in record.get('data') or [])})")
    if "held-out" in groups:
        lines.append("")
    for kind, records in groups.items():
        flat = [flatten({k: v for k, v in r.items() if k != "kind"}) for r in records]
        keys = list(dict.fromkeys(k for f in flat for k in f))
        lines += [f"#### {kind} ({len(records)})", "",
                  "| field | " + " | ".join(f"#{i + 1}" for i in range(len(records))) + " |",
                  "|---|" + "---|" * len(records)]
        lines += ["| " + " | ".join(cell(c) for c in [key, *(f.get(key, "") for f in flat)]) + " |" for key in keys]
        lines.append("")
    return lines


def sample_lines(run: Run) -> list[str]:
    """The first and last logged sample answers (``samples`` lines of metrics.jsonl)."""
    lines = ["### Sample answers", ""]
    logged = [r for r in run.records if isinstance(r.get("samples"), list)]
    if not logged:
        return [*lines, "- none were logged (train with --sample-every N to log answers to fixed prompts)", ""]
    shown = [logged[0]] if len(logged) == 1 else [logged[0], logged[-1]]
    for record in shown:
        lines += [f"At step {record.get('step', '?')}:", ""]
        for sample in record["samples"]:
            if not isinstance(sample, dict):
                continue
            answer = str(sample.get("answer", ""))
            if len(answer) > SAMPLE_ANSWER_CHARS:
                answer = answer[:SAMPLE_ANSWER_CHARS] + " …"
            lines += ["Prompt:", "", *fenced(str(sample.get("prompt", ""))), "", "Answer:", "", *fenced(answer), ""]
    return lines


def render(runs: list[Run], pictures: list[Path | None]) -> str:
    lines = [MARKER, "# tinylm run report", "",
             "Runs: " + ", ".join(f"`{r.folder}` ({r.stage})" for r in runs), "",
             *hardware_lines(runs), *summary_table(runs)]
    for run, picture in zip(runs, pictures, strict=True):
        lines += [f"## {run.folder.name}: {run.stage}", "", f"Run folder `{run.folder}`.", "",
                  *data_lines(run), *model_lines(run), *training_lines(run, picture), *results_lines(run),
                  *sample_lines(run)]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---- writing --------------------------------------------------------------------------------------------------

def check_outputs(paths: list[Path], runs: list[Run], markdown: Path) -> None:
    """Refuse an output that is one of a run's own files (its name or an existing file inside a run folder),
    unless it is an earlier bin/report output (the Markdown starts with MARKER; its pictures share its stem)."""
    ours = markdown.is_file() and markdown.read_bytes()[:len(MARKER)] == MARKER.encode()
    for path in paths:
        resolved = path.resolve()
        for run in runs:
            folder = run.folder.resolve()
            if folder not in resolved.parents:
                continue
            earlier = ours and (path == markdown or path.name.startswith(f"{markdown.stem}-"))
            if RUN_FILES.match(path.name) or RUN_FILES.match(resolved.name) or (path.exists() and not earlier):
                raise ReportError(f"--out would replace a file of run folder {run.folder}; write the report "
                                  "elsewhere", path=path)


def write_report(run_dirs: list[str | Path], out: str | Path, clean_reports: Iterable[str | Path] = ()) -> list[Path]:
    """Read every run, render the Markdown and pictures in memory, then write them; returns the paths written."""
    out = Path(out)
    reports = [Path(p) for p in clean_reports]
    for path in reports:
        if not path.is_file():
            raise ReportError("no such clean report file", path=path)
    runs = [read_run(d, reports) for d in run_dirs]
    for path in reports:
        if not any(path.resolve() == shown.resolve() for run in runs for shown, _ in run.clean):
            raise ReportError("--clean-report: not the clean report of any run's packed data (a JSON object "
                              "whose stage is that data's stage)", path=path)
    images = [loss_png(run.records, f"{run.folder.name} ({run.stage})") for run in runs]
    names = picture_names(runs, out)
    pictures = [name if image is not None else None for name, image in zip(names, images, strict=True)]
    check_outputs([out, *(p for p in pictures if p is not None)], runs, out)
    text = render(runs, pictures)
    check_file_target(out, "report file")
    written = []
    try:
        for path, image in zip(pictures, images, strict=True):
            if path is not None and image is not None:
                atomic_write_bytes(path, [image])
                written.append(path)
        atomic_write_text(out, text)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return [*written, out]
