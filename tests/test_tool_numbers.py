"""Numbers in the options and source specs of pack.py, clean.py and train_tokenizer.py: NaN, inf, huge,
negative and 5,000-digit values are one line naming the flag (argparse: exit 2) or the spec (exit 1); a
positive --target-mb never means "no limit"; a --filter whose result has no truth value is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preprocess import clean, pack, train_tokenizer

HUGE = "9" * 5000


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"hello world number {i}"}) + "\n" for i in range(20)))
    return path


def argparse_error(capsys, call, flag: str) -> None:
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be" in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [
    ("--seq-len", "nan"), ("--seq-len", HUGE), ("--workers", "0"), ("--workers", "inf"), ("--shard-tokens", "1e20"),
    ("--tag-weight", "1e9"), ("--max-record-chars", "-1")])
def test_pack_numeric_options(tmp_path, src, capsys, flag, value):
    argparse_error(capsys, lambda: pack.main(["--stage", "pretrain", "--input", str(src), "--out", str(tmp_path / "o"),
                                              flag, value]), flag)


@pytest.mark.parametrize(("flag", "value"), [
    ("--target-mb", "inf"), ("--target-mb", "nan"), ("--target-mb", "-1"), ("--near-dup-threshold", "nan"),
    ("--near-dup-threshold", "0"), ("--seed", "-1"), ("--seed", HUGE), ("--workers", "1.5"), ("--min-chars", "-3"),
    ("--max-symbol-ratio", "inf"), ("--min-cjk-ratio", "2"), ("--max-char-run", "nan"), ("--max-record-chars", "0")])
def test_clean_numeric_options(tmp_path, src, capsys, flag, value):
    argparse_error(capsys, lambda: clean.main(["--stage", "pretrain", "--input", str(src), "--out",
                                               str(tmp_path / "o.jsonl"), flag, value]), flag)


@pytest.mark.parametrize(("flag", "value"), [("--vocab-size", "1e9"), ("--vocab-size", "10"), ("--max-chars", "nan"),
                                             ("--heldout-every", "-1"), ("--model-max-length", HUGE)])
def test_train_tokenizer_numeric_options(tmp_path, src, capsys, flag, value):
    argparse_error(capsys, lambda: train_tokenizer.main(["--input", str(src), "--out", str(tmp_path / "t"), flag,
                                                         value]), flag)


@pytest.mark.parametrize("suffix", ["@1e20", "@" + HUGE, "@-5", "@0", "@nan", ":1e20", ":inf", ":nan", ":-1",
                                    ":" + HUGE])
def test_numbers_in_source_specs_are_one_line(tmp_path, src, capsys, suffix):
    out = tmp_path / "o.jsonl"
    code = clean.main(["--stage", "pretrain", "--input", f"{src}{suffix}", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"clean.py: error: {src}{suffix[:30]}") and "Traceback" not in err
    assert not out.exists()
    if suffix.startswith(":"):
        code = pack.main(["--stage", "pretrain", "--input", f"{src}{suffix}", "--out", str(tmp_path / "p"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and "mixing weight" in err, err


def test_a_tiny_positive_target_is_a_limit_not_no_limit(tmp_path, src, capsys):
    out = tmp_path / "o.jsonl"
    assert clean.main(["--stage", "pretrain", "--input", str(src), "--out", str(out), "--target-mb", "1e-9",
                       "--dedup", "none", "--quiet"]) == 0
    assert out.read_bytes() == b""  # one byte of budget: no record fits


@pytest.mark.parametrize(("body", "needle"), [
    ("import numpy as np\ndef f(record):\n    return np.array([1, 2])\n", "returned a ndarray"),
    ("class Odd:\n    def __bool__(self):\n        raise RuntimeError('no')\ndef f(record):\n    return Odd()\n",
     "returned a Odd")])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_filter_result_without_a_truth_value_is_one_line(tmp_path, src, capsys, body, needle, workers):
    (tmp_path / "filt.py").write_text(body)
    out = tmp_path / "o.jsonl"
    code = clean.main(["--stage", "pretrain", "--input", str(src), "--out", str(out), "--filter",
                       f"{tmp_path / 'filt.py'}:f", "--workers", workers, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"--filter f {needle}" in err and f"{src}:1:" in err and "read 0 = kept 0" in err
    assert not out.exists()
