"""Every error raised after records were read says what became of them: read = kept + dropped + skipped."""

from __future__ import annotations

import json

from preprocess import clean, pack


def test_no_training_row_says_the_accounting(tmp_path, capsys):
    src = tmp_path / "short.jsonl"
    src.write_text("".join(json.dumps({"text": "hi"}) + "\n" for _ in range(3)) + "{broken\n")
    code = pack.main(["--stage", "pretrain", "--input", str(src), "--out", str(tmp_path / "o"), "--seq-len", "512",
                      "--workers", "1", "--skip-bad", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "no training row" in err and "read 4 = kept 3 (0 truncated) + dropped 0 + skipped 1 (invalid_json 1)" in err


def test_a_bad_record_says_what_was_read_before_it(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(5)) + "{broken\n")
    code = pack.main(["--stage", "pretrain", "--input", str(src), "--out", str(tmp_path / "o"), "--seq-len", "8",
                      "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{src}:6:" in err and "(before it: read 5 = kept 5 (0 truncated) + dropped 0 + skipped 0)" in err
    code = clean.main(["--stage", "pretrain", "--input", str(src), "--out", str(tmp_path / "c.jsonl"), "--workers",
                       "1", "--quiet", "--dedup", "none"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{src}:6:" in err and "so far: read 5 = kept 5 + removed 0 + skipped 0" in err
