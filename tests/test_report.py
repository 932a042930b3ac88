"""bin/report on a finished smoke chain (clean -> pack -> pretrain -> SFT, a held-out eval record, logged
samples): the Markdown names every run and stage, shows the parameter count, data, cleaning, held-out
numbers and samples, and a PNG per run lies beside it; bad inputs are one line, exit 1, nothing written."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.clean import main as clean_main
from serve.evaluate import RESULTS_FILE, append_result
from tests.conftest import run_pack
from train import checkpoint, loading
from train.run import main as train_main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
PNG = b"\x89PNG\r\n\x1a\n"
HELD_OUT = {"loss": 7.123456, "perplexity": 1239.4, "bpb": 3.456789, "tokens": 2048}
ANSWER = "床前明月光 | a `tick` and a\n```fence```"

pytestmark = pytest.mark.usefixtures("one_thread")


def bin_report():
    """bin/report as a module (its main runs in this process)."""
    sys.path.insert(0, str(ROOT / "bin"))
    try:
        loader = importlib.machinery.SourceFileLoader("bin_report", str(ROOT / "bin" / "report"))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bin_report", loader))
        loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bin"))
    return module


def train(stage: str, data: Path, out: Path, *extra: str) -> Path:
    assert train_main(["--stage", stage, "--data", str(data), "--out", str(out), "--batch-size", "4",
                       "--grad-accum", "1", "--optimizer", "adamw", "--lr", "3e-3", "--log-every", "1",
                       "--eval-every", "2", "--val-rows", "4", "--no-progress", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """train.sh's layout: OUT/data/clean/sft.report.json, OUT/packed/{pretrain,sft}, OUT/{pretrain,sft}."""
    out = tmp_path_factory.mktemp("out")
    clean = out / "data" / "clean"
    assert clean_main(["--stage", "sft", "--input", str(SAMPLE / "sft" / "alpaca_zh_demo.jsonl"),
                       "--out", str(clean / "sft" / "sft.jsonl"), "--report", str(clean / "sft.report.json"),
                       "--quiet"]) == 0
    run_pack("--stage", "pretrain", "--input", str(SAMPLE / "pretrain" / "wiki_en_demo.jsonl"),
             "--out", str(out / "packed" / "pretrain"), "--seq-len", "64")
    run_pack("--stage", "sft", "--input", str(clean / "sft" / "*.jsonl"), "--out", str(out / "packed" / "sft"),
             "--seq-len", "64")
    train("pretrain", out / "packed" / "pretrain", out / "pretrain", "--model", "tiny", "--max-steps", "3")
    sft = train("sft", out / "packed" / "sft", out / "sft", "--init-from", str(out / "pretrain"), "--max-steps", "2")
    append_result(sft / RESULTS_FILE, {"time": "2026-01-01T00:00:00+00:00", "ckpt": str(checkpoint.latest(sft)),
                                       "step": 2, "ckpt_stage": "sft", "data": ["heldout/sft.jsonl"],
                                       "stage": "sft", "seq_len": 64, "rows": 32, "metrics": HELD_OUT})
    append_result(sft / RESULTS_FILE, {"kind": "tool-eval", "step": 2, "accuracy": 0.25, "calls": {"well_formed": 3}})
    with (sft / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 2, "samples": [{"prompt": "你好", "answer": ANSWER}]}) + "\n")
    return out


def test_report_of_a_smoke_chain(chain, tmp_path):
    """As a user runs it: one report over both runs, a PNG per run beside it, every stage and the numbers shown."""
    out = tmp_path / "reports" / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "report"), str(chain / "pretrain"), str(chain / "sft"),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    for picture in (out.parent / "report-pretrain.png", out.parent / "report-sft.png"):
        assert picture.read_bytes().startswith(PNG)
        assert f"]({picture.name})" in text
    assert "## pretrain: pretrain" in text and "## sft: sft" in text
    params = loading.load(chain / "sft").model_config.num_params()
    assert f"parameters: {params:,}" in text
    assert "| 7.123 |" in text and "| 3.457 |" in text  # held-out loss and bpb in the runs table
    assert "- held-out sft at step 2: loss 7.123, perplexity 1239, bpb 3.457, tokens 2,048" in text
    assert "#### held-out (1)" in text and "#### tool-eval (1)" in text and "| accuracy | 0.25 |" in text
    assert "## Hardware" in text and "tokens/s:" in text and "training time:" in text
    assert "cleaning (" in text and "sft.report.json" in text  # the clean report found by train.sh's layout
    assert "records: " in text and "wiki_en_demo.jsonl" in text  # from the packed meta.json
    pretrain, sft = text.split("## sft: sft")
    assert "none were logged" in pretrain and "At step 2:" in sft
    assert "床前明月光 | a `tick` and a\n```fence```\n````" in sft  # the answer inside a longer fence, verbatim


@pytest.mark.parametrize("case", ["not_a_run", "missing", "corrupt_metrics", "corrupt_results", "out_is_metrics",
                                  "out_is_tokenizer", "clean_report_of_no_run"])
def test_bad_input_is_one_line_and_writes_nothing(case, chain, tmp_path, capsys):
    run = chain / "pretrain"
    out = tmp_path / "report.md"
    extra = []
    if case == "not_a_run":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "missing":
        run = tmp_path / "nowhere"
    elif case in ("corrupt_metrics", "corrupt_results"):
        run = tmp_path / "run"
        run.mkdir()
        name = "metrics.jsonl" if case == "corrupt_metrics" else RESULTS_FILE
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
        (run / name).write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2}\n', encoding="utf-8")
    elif case == "out_is_metrics":
        out = run / "metrics.jsonl"
    elif case == "out_is_tokenizer":
        out = run / "tokenizer" / "tokenizer.json"
    else:
        extra = ["--clean-report", str(chain / "data" / "clean" / "sft.report.json")]  # pretrain data: no match
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} if run.is_dir() else {}
    assert bin_report().main([str(run), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("report: error: ") and err.count("\n") == 1, err
    if case.startswith("out_is"):
        assert "would replace a file of run folder" in err
    if case == "corrupt_metrics":
        assert "metrics.jsonl:2:" in err
    if case == "corrupt_results":
        assert f"{RESULTS_FILE}:2:" in err
    if case == "clean_report_of_no_run":
        assert "sft.report.json: --clean-report: not the clean report of any run" in err
    if not case.startswith("out_is"):
        assert not out.exists()
    assert not list(tmp_path.glob("report-*.png"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before if run.is_dir() else True


def test_a_report_inside_a_run_folder_can_be_rewritten(chain, capsys):
    """A new file in a run folder is allowed, and a second run of the same command replaces its own outputs."""
    out = chain / "pretrain" / "report.md"
    for _ in range(2):
        assert bin_report().main([str(chain / "pretrain"), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (chain / "pretrain" / "report-pretrain.png").read_bytes().startswith(PNG)
    for path in (out, chain / "pretrain" / "report-pretrain.png"):
        path.unlink()


def test_results_and_metrics_share_one_reader_that_differs_only_on_an_unfinished_last_line(tmp_path):
    """metrics.jsonl is appended while a run may be killed: its unfinished last line is left out. eval_results
    is written a whole line at a time: the same tail there is a corrupt line, named by file and line."""
    from core.errors import TinyLMError
    from serve.report import read_results
    from train.metrics import read_metrics

    tail = '{"step": 1, "loss": 2.0}\n\n{"step": 2, "lo'
    (tmp_path / "metrics.jsonl").write_text(tail, encoding="utf-8")
    (tmp_path / RESULTS_FILE).write_text(tail, encoding="utf-8")
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    with pytest.raises(TinyLMError) as info:
        read_results(tmp_path / RESULTS_FILE)
    assert str(info.value) == f"{tmp_path / RESULTS_FILE}:3: not a JSON object (a corrupt results line)"
    assert read_results(tmp_path / "absent.jsonl") == []
    (tmp_path / RESULTS_FILE).write_bytes(b'{"a": 1}\n\xff\n')
    with pytest.raises(TinyLMError, match=r"cannot read the results \(.*utf-8"):
        read_results(tmp_path / RESULTS_FILE)
