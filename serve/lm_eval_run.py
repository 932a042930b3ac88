"""``bin/eval --lm-eval TASK[,TASK...]``: lm-evaluation-harness tasks on a tinylm checkpoint.

The harness (the optional ``lm-eval`` package: ``bin/setup --eval``) does all the evaluation work: task
lookup (its own tasks plus the YAMLs of ``--lm-eval-include DIR``), prompts, few-shot contexts,
``--apply-chat-template``, metrics and the table; :class:`serve.lm_eval_adapter.HarnessModel` answers
its requests with the checkpoint itself (no export step). Before the model is loaded, the task names are
checked against the harness's index and the include folder and results file are checked, so bad input is
one line and nothing is appended. A finished run prints the harness's table and appends one JSON line
``{time, ckpt, step, ckpt_stage, lm_eval: {tasks, options}, lm_eval_results, ...}`` to the results file
(default ``<run folder>/eval_results.jsonl``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import TinyLMError
from core.files import check_file_target
from core.numbers import check_number, parse_number


class HarnessError(TinyLMError):
    """Bad ``--lm-eval`` input (a task name, the include folder, the options) or a dataset the harness
    could not load: one line."""


INSTALL_HINT = ("lm-eval is not installed; install it with bin/setup --eval "
                "(or: .venv/bin/python -m pip install 'lm-eval[hf]')")


def limit_value(text: str) -> int | float:
    """``--limit``: a count of examples per task (an integer >= 1) or a fraction of them (0 < x < 1)."""
    try:
        value = parse_number(text, float, low=0, low_open=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        return value
    if not float(value).is_integer():
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (examples) or a fraction in (0, 1), got {text!r}")
    return int(value)


@dataclass(frozen=True)
class HarnessOptions:
    """What ``bin/eval --lm-eval`` hands the harness."""

    tasks: tuple[str, ...]
    include: str | None = None  # a folder of task YAMLs
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | float | None = None
    apply_chat_template: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        problem = check_number(self.batch_size, int, low=1)
        if problem:
            raise HarnessError(f"--batch-size {problem}")


def parse_tasks(text: str) -> tuple[str, ...]:
    """``TASK[,TASK...]`` -> names; an empty name is refused."""
    names = tuple(t.strip() for t in text.split(","))
    if not names or any(not t for t in names):
        raise HarnessError(f"--lm-eval {text!r}: give task names separated by commas (e.g. arc_easy,piqa)")
    return names


def require_lm_eval() -> None:
    """Refuse, in one line saying how to install it, when the ``lm-eval`` package is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise HarnessError(INSTALL_HINT)


def check_include(folder: str) -> Path:
    """The include folder, which must be a readable directory."""
    path = Path(folder)
    if not path.is_dir():
        raise HarnessError(f"--lm-eval-include {folder}: no such directory")
    try:
        os.listdir(path)
    except OSError as e:
        raise HarnessError(f"--lm-eval-include {folder}: cannot read it ({e.strerror or e})") from None
    return path


def task_manager(opts: HarnessOptions) -> Any:
    """The harness's task index (its own tasks plus ``opts.include``; the include folder's alone when every
    requested name is a task defined there), every requested name checked."""
    require_lm_eval()
    include = check_include(opts.include) if opts.include else None
    from lm_eval.tasks import TaskManager

    manager = None
    if include and not any(c in name for name in opts.tasks for c in "*?["):
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(local.match_tasks([name]) and name in local.all_subtasks for name in opts.tasks):
            manager = local  # only leaf tasks of the include folder: they name no other task, skip the big index
    manager = manager or TaskManager(include_path=str(include) if include else None)
    for name in opts.tasks:
        if not manager.match_tasks([name]):
            where = f" or in {include}" if include else " (local task YAMLs: --lm-eval-include DIR)"
            raise HarnessError(f"--lm-eval: unknown task {name!r}: not among lm-eval's tasks{where}")
    return manager


def run_harness(loaded: Any, opts: HarnessOptions, results: Path, device: Any, quiet: bool = False,
                manager: Any = None) -> tuple[dict[str, Any], str]:
    """Evaluate ``loaded`` on ``opts.tasks``; append and return the results record, with the harness's table."""
    import lm_eval

    from serve.evaluate import append_result
    from serve.lm_eval_adapter import HarnessModel

    check_file_target(results, "results file")
    manager = manager or task_manager(opts)
    model = HarnessModel(loaded, batch_size=opts.batch_size, device=device, progress=not quiet)
    try:
        out = lm_eval.simple_evaluate(model=model, tasks=list(opts.tasks), num_fewshot=opts.num_fewshot,
                                      limit=opts.limit, apply_chat_template=opts.apply_chat_template,
                                      task_manager=manager, batch_size=opts.batch_size, log_samples=False)
    except OSError as e:  # a dataset the harness could not download or read
        raise HarnessError(f"--lm-eval {','.join(opts.tasks)}: lm-eval could not load a dataset: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    table = lm_eval.utils.make_table(out)
    if out.get("groups"):
        table += "\n" + lm_eval.utils.make_table(out, "groups")
    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ckpt": loaded.checkpoint.path, "step": loaded.checkpoint.step, "ckpt_stage": loaded.checkpoint.stage,
        "lm_eval": {**asdict(opts), "tasks": list(opts.tasks), "version": _version()},
        "lm_eval_results": out["results"], "lm_eval_groups": out.get("groups", {}),
        "lm_eval_n_shot": out.get("n-shot", {}), "lm_eval_n_samples": out.get("n-samples", {})}
    append_result(results, record)
    return record, table


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class HarnessCall:
    """One ``bin/eval --lm-eval`` call: the checkpoint and how to read it, the harness's options as typed, where
    results go."""

    ckpt: str
    tasks: str
    include: str | None = None
    num_fewshot: int | None = None
    limit: int | float | None = None
    apply_chat_template: bool = False
    batch_size: int = 8
    results: Path | None = None
    device: str = "auto"
    quiet: bool = False
    model: str | None = None  # the shape of a bare state dict (serve/source_args.py)
    model_arg: tuple[str, ...] = ()
    tokenizer: str | None = None


def run_call(call: HarnessCall) -> int:
    """``bin/eval``'s ``--lm-eval`` branch: check, load, evaluate, print the table; 1 on bad input."""
    from serve.evaluate import resolve_device
    from serve.source_args import source_options
    from train.loading import load_model

    try:
        opts = HarnessOptions(parse_tasks(call.tasks), call.include, call.num_fewshot, call.limit,
                              call.apply_chat_template, call.batch_size)
        manager = task_manager(opts)  # unknown tasks and a bad include folder fail before the model loads
        loaded = load_model(call.ckpt, options=source_options(call.model, list(call.model_arg), call.tokenizer))
        results = call.results or loaded.run_folder / "eval_results.jsonl"
        check_file_target(results, "results file")
        record, table = run_harness(loaded, opts, results, resolve_device(call.device), call.quiet, manager)
    except TinyLMError as e:
        print(f"bin/eval: error: {e}", file=sys.stderr)
        return 1
    if call.quiet:
        print(json.dumps(record, ensure_ascii=False))
        return 0
    print(f"{record['ckpt']} (step {record['step']})")
    print(table)
    print(f"  appended to {results}")
    return 0
