"""Outputs never destroy inputs: every tool, every path-taking output option, pointed at each of the tool's own
inputs (the same path, a symlink, a ``..`` spelling, a hard link) is refused in one line naming the path, with
exit 1, and no file under the test folder changes (sha256 of every file before and after)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOKENIZER

from core.files import OutputClash, check_output_folder, mark_output_folder, refuse_inputs, same_path
from preprocess import clean, pack, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SFT = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！很高兴见到你。"}]}


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks as their target's name)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def spellings(path: Path, kind: str) -> Path:
    """Another name of ``path``: itself, a symlink to it, a ``..`` detour, or (files) a hard link."""
    if kind == "same":
        return path
    if kind == "dotdot":
        return path.parent / ".." / path.parent.name / path.name
    alias = path.parent / f"alias_{kind}_{path.name}"
    if kind == "symlink":
        alias.symlink_to(path)
    else:
        os.link(path, alias)
    return alias


def one_line(err: str, tool: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{tool}: error: ") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    sft = tmp_path / "in" / "a.jsonl"
    sft.parent.mkdir()
    sft.write_text("".join(json.dumps(SFT | {"i": i}, ensure_ascii=False) + "\n" for i in range(4)))
    held = tmp_path / "in" / "held.jsonl"
    held.write_text(json.dumps(SFT, ensure_ascii=False) + "\n")
    filt = tmp_path / "in" / "keep.py"
    filt.write_text("def keep(record):\n    return True\n")
    return {"input": sft, "exclude": held, "filter": filt}


# ---- clean.py: --out and --report against --input, --exclude, --filter and each other ----------------------

CLEAN_CASES = [("--out", "input"), ("--out", "exclude"), ("--out", "filter"), ("--report", "input"),
               ("--report", "exclude"), ("--report", "out")]


@pytest.mark.parametrize("kind", ["same", "symlink", "dotdot", "hardlink"])
@pytest.mark.parametrize(("flag", "target"), CLEAN_CASES)
def test_clean_never_writes_over_what_it_reads(tmp_path, data, capsys, flag, target, kind):
    out = tmp_path / "out.jsonl"
    if target == "out":
        out.write_text("{}\n")
    victim = out if target == "out" else data[target]
    path = spellings(victim, kind)
    paths = {"--out": out, "--report": tmp_path / "report.json", flag: path}
    before = hashes(tmp_path)
    code = clean.main(["--stage", "sft", "--input", str(data["input"]), "--exclude", str(data["exclude"]),
                       "--filter", f"{data['filter']}:keep", "--out", str(paths["--out"]),
                       "--report", str(paths["--report"]), "--quiet", "--workers", "1"])
    assert code == 1
    one_line(capsys.readouterr().err, "clean.py", str(path))
    assert hashes(tmp_path) == before


# ---- pack.py: --out against --input and --tokenizer, and a folder of other files ---------------------------

@pytest.mark.parametrize("case", ["input_folder", "tokenizer_folder", "foreign_file", "symlink_to_input_folder"])
def test_pack_never_writes_into_a_folder_of_inputs_or_foreign_files(tmp_path, data, capsys, case):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok / name).write_bytes((TOKENIZER / name).read_bytes())
    out = {"input_folder": data["input"].parent, "tokenizer_folder": tok, "foreign_file": tmp_path / "mine",
           "symlink_to_input_folder": tmp_path / "link"}[case]
    if case == "foreign_file":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    if case == "symlink_to_input_folder":
        out.symlink_to(data["input"].parent)
    before = hashes(tmp_path)
    code = pack.main(["--stage", "sft", "--input", str(data["input"]), "--tokenizer", str(tok), "--out", str(out),
                      "--seq-len", "64", "--workers", "1", "--quiet"])
    assert code == 1
    one_line(capsys.readouterr().err, "pack.py", str(out))
    assert hashes(tmp_path) == before


def test_pack_rerun_into_its_own_folder_is_allowed(tmp_path, data, capsys):
    argv = ["--stage", "sft", "--input", str(data["input"]), "--out", str(tmp_path / "p"), "--seq-len", "64",
            "--workers", "1", "--quiet"]
    assert pack.main(argv) == 0
    before = hashes(tmp_path)
    assert pack.main(argv) == 0  # complete already: nothing written
    assert hashes(tmp_path) == before
    assert pack.main([*argv[:-1], "--overwrite", "--quiet", "--shard-tokens", "100"]) == 0  # its own files: fine


# ---- train_tokenizer.py: an output file that is an input -------------------------------------------------

def test_train_tokenizer_never_writes_over_an_input(tmp_path, capsys):
    src = tmp_path / "in" / "tokenizer_config.json"  # a JSONL input with the name of an output file
    src.parent.mkdir()
    src.write_text('{"text": "hello world"}\n' * 20)
    before = hashes(tmp_path)
    code = train_tokenizer.main(["--input", str(src), "--out", str(src.parent), "--vocab-size", "300"])
    assert code == 1
    one_line(capsys.readouterr().err, "train_tokenizer.py", str(src))
    assert hashes(tmp_path) == before


# ---- bin/merge, bin/eval, train/run.py (subprocesses: their CLIs) -------------------------------------------

def load_script(name: str):
    """A ``bin/`` script as a module (its ``main`` called in-process)."""
    if str(ROOT / "bin") not in sys.path:
        sys.path.insert(0, str(ROOT / "bin"))
    loader = importlib.machinery.SourceFileLoader(name.replace("/", "_"), str(ROOT / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict[str, Path]:
    import dataclasses

    import torch

    from core.tokenizer import load_tokenizer
    from model import ModelConfig, TinyLM
    from model.lora import LoRAConfig, apply_lora, lora_state_dict
    from train.checkpoint import Checkpoint

    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny"))
    Checkpoint.of(model, load_tokenizer(TOKENIZER), step=5, stage="sft").save(root / "base")
    from train import loading

    base = loading.load(root / "base")
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj",))
    apply_lora(model, lora)
    adapter = dataclasses.replace(base, model=lora_state_dict(model), lora=lora, base=base.source_record(), step=5)
    adapter.save(root / "lora")
    return {"base": root / "base", "lora": root / "lora", "root": root}


@pytest.mark.parametrize("case", ["lora_run", "base_run", "foreign_folder"])
def test_merge_never_replaces_the_runs_it_reads(lora_run, tmp_path, capsys, case):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(lora_run["root"], work)
    lora = work / "lora"
    # the copied adapter records the original base path: point --base at the copy
    out = {"lora_run": lora, "base_run": work / "base", "foreign_folder": work / "mine"}[case]
    if case == "foreign_folder":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    before = hashes(work)
    merge = load_script("bin/merge")
    code = merge.main(["--ckpt", str(lora), "--base", str(work / "base"), "--out", str(out)])
    assert code == 1
    one_line(capsys.readouterr().err, "bin/merge", str(out))
    assert hashes(work) == before


def test_merge_may_rerun_into_its_own_output(lora_run, tmp_path, capsys):
    merge = load_script("bin/merge")
    argv = ["--ckpt", str(lora_run["lora"]), "--out", str(tmp_path / "m")]
    assert merge.main(argv) == 0
    assert merge.main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize(("flag", "target"), [("--answers", "prompts"), ("--results", "prompts"),
                                              ("--answers", "results")])
def test_eval_outputs_never_replace_its_inputs(lora_run, tmp_path, flag, target):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    results = tmp_path / "r.jsonl"
    paths = {"--answers": tmp_path / "a.jsonl", "--results": results}
    paths[flag] = prompts if target == "prompts" else results
    before = hashes(tmp_path)
    proc = subprocess.run([PY, str(ROOT / "bin" / "eval"), "--ckpt", str(lora_run["base"]), "--prompts", str(prompts),
                           "--answers", str(paths["--answers"]), "--results", str(paths["--results"]), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    one_line(proc.stderr, "bin/eval", str(paths[flag]))
    assert hashes(tmp_path) == before


def test_training_never_writes_into_its_data_folder(tmp_path, data, capsys):
    packed = tmp_path / "packed"
    assert pack.main(["--stage", "sft", "--input", str(data["input"]), "--out", str(packed), "--seq-len", "64",
                      "--workers", "1", "--quiet"]) == 0
    before = hashes(tmp_path)
    proc = subprocess.run([PY, str(ROOT / "train" / "run.py"), "--stage", "sft", "--data", str(packed), "--out",
                           str(packed), "--model", "tiny", "--max-steps", "1"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    one_line(proc.stderr, "train/run.py", str(packed))
    assert hashes(tmp_path) == before


# ---- the mechanism itself --------------------------------------------------------------------------------

def test_same_path_sees_through_symlinks_dotdot_and_hard_links(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    for kind in ("same", "symlink", "dotdot", "hardlink"):
        assert same_path(spellings(f, kind), f), kind
    assert not same_path(tmp_path / "g", f)
    with pytest.raises(OutputClash, match="holds the input"):
        refuse_inputs(tmp_path, [("--input", f)], folder=True)


def test_a_folder_is_replaced_only_when_missing_empty_marked_or_own(tmp_path):
    own = {"a.bin"}.__contains__
    assert check_output_folder(tmp_path / "missing", "tool", own) == tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", "tool", own)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "a.bin").write_text("")
    check_output_folder(tmp_path / "own", "tool", own)
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "x").write_text("")
    with pytest.raises(OutputClash, match=r"holds files tool did not write \(x\)"):
        check_output_folder(tmp_path / "marked", "tool", own)
    mark_output_folder(tmp_path / "marked", "tool")
    check_output_folder(tmp_path / "marked", "tool", own)
    with pytest.raises(OutputClash, match="other did not write"):
        check_output_folder(tmp_path / "marked", "other", own)
