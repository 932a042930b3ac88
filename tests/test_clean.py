"""preprocess/clean.py: each filter with exact counts, duplicates (exact, near, chat keys, --exclude), bad input
handled as pack.py does, sampling / shuffling / placeholders, and near-dup recall / false positives measured."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pack_helpers
import pytest
import zstandard
from conftest import SAMPLE
from pack_helpers import jsonl

import core.files
from preprocess import clean, pack
from preprocess.textfilters import DuplicateIndex, Fingerprinter, normalise

CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def cjk(rng: random.Random, n: int) -> str:
    """n random CJK characters with a full-width comma after every 15 (a plain, clean Chinese-like text)."""
    return "".join(rng.choice(CJK) + ("，" if i % 15 == 14 else "") for i in range(n))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = clean.main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *needles: str) -> None:
    pack_helpers.one_line_error(err, *needles, tool="clean.py")


def lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    if path.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return [json.loads(line) for line in data.decode().splitlines()]


def assert_nothing_left(folder: Path, *names: str) -> None:
    present = {p.name for p in folder.iterdir()}
    assert not any(core.files.is_temp_file(n) for n in present), present
    for name in names:
        assert name not in present, present


def test_every_filter_removes_exactly_its_records_and_reports_them(tmp_path, capsys):
    rng = random.Random(0)
    base = [f"ＡＢＣ {cjk(rng, 150)}" for _ in range(10)]
    near = list(base[1])
    for i in (20, 70, 120):
        near[i] = "丁"
    bad = {
        "exact_duplicate": "ABC   " + base[0][4:] + "\n",  # NFKC (full-width letters), whitespace folded
        "near_duplicate": "".join(near),
        "too_short": "短文。",
        "too_long": cjk(rng, 500),
        "control_chars": cjk(rng, 40) + "\x07",
        "mojibake": cjk(rng, 40) + "\ufffd",
        "symbol_ratio": "★☆◆◇■□▲△●○" * 4 + cjk(rng, 20),  # Unicode symbols (punctuation does not count)
        "digit_ratio": "".join(f"{i * 7919 % 100000:05d}" for i in range(20)) + cjk(rng, 20),
        "url_ratio": "https://example.com/" + "abcdefghij" * 10 + " " + cjk(rng, 30),
        "repeated_chars": cjk(rng, 40) + "啊" * 41,
        "repeated_lines": "同一行内容\n" * 4 + cjk(rng, 30),
        "filter:keep": cjk(rng, 40) + "禁止",
    }
    src = jsonl(tmp_path / "in.jsonl", [{"text": t} for t in base[:5] + list(bad.values()) + base[5:]])
    held = jsonl(tmp_path / "heldout.jsonl", [{"text": base[9]}, {"text": base[8][:-2] + "丙丁"}])
    (tmp_path / "myfilter.py").write_text("def keep(record):\n    return '禁止' not in record['text']\n")
    out, report = tmp_path / "o" / "clean.jsonl", tmp_path / "o" / "report.json"
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--report", str(report),
                     "--min-chars", "20", "--max-chars", "400", "--filter", f"{tmp_path / 'myfilter.py'}:keep",
                     "--exclude", str(held))
    assert rc == 0, err
    assert [r["text"] for r in lines(out)] == base[:8]
    assert {r["source"] for r in lines(out)} == {str(src)}
    r = json.loads(report.read_text())
    assert r["counts"]["removed"] == {**dict.fromkeys(bad, 1), "excluded": 2}
    assert r["counts"]["read"] == 22 and r["counts"]["kept"] == r["counts"]["written"] == 8
    assert r["counts"]["skipped"] == {}
    assert r["examples"]["too_short"] == [{"source": str(src), "line": 8, "preview": "短文。"}]
    assert r["dedup_index"] == {"entries": 8, "excluded_entries": 2}
    assert r["per_source"][str(src)] == {"read": 22, "kept": 8, "removed": 14, "skipped": 0}

    # every filter can be switched off: with all off only the duplicates and exclusions go
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--report", str(report),
                     "--max-symbol-ratio", "1", "--max-digit-ratio", "1", "--max-url-ratio", "1", "--max-char-run",
                     "0", "--max-dup-line-ratio", "1", "--allow-control", "--allow-mojibake", "--dedup", "exact")
    assert rc == 0, err
    assert json.loads(report.read_text())["counts"]["removed"] == {"exact_duplicate": 1}


def test_language_and_cjk_share(tmp_path, capsys):
    rng = random.Random(1)
    zh, en, mixed = cjk(rng, 60), "A plain English sentence about cleaning data sets.", "tinylm 是一个小模型 and more"
    src = jsonl(tmp_path / "in.jsonl", [{"text": t} for t in (zh, en, mixed)])
    out, report = tmp_path / "c.jsonl", tmp_path / "r.json"
    for flags, kept, removed in ((["--lang", "zh"], [zh], {"lang": 2}), (["--lang", "en"], [en], {"lang": 2}),
                                 (["--min-cjk-ratio", "0.1"], [zh, mixed], {"low_cjk_ratio": 1})):
        rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--report",
                         str(report), *flags)
        assert rc == 0, err
        assert [r["text"] for r in lines(out)] == kept, flags
        assert json.loads(report.read_text())["counts"]["removed"] == removed, flags


def conversation(user: str, answer: str) -> dict:
    return {"conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_chat_key_is_the_conversation_or_its_first_user_turn(tmp_path, capsys):
    rows = [conversation("你好，请介绍一下你自己。", "我是一个小模型。"),
            conversation("你好，请介绍一下你自己。 ", "我是一个小模型。"),  # same after whitespace folding
            conversation("你好，请介绍一下你自己。", "我叫 tinylm，是一个语言模型。"),
            conversation("今天天气怎么样？", "我无法查看天气。")]
    src = jsonl(tmp_path / "sft.jsonl", rows)
    out, report = tmp_path / "c.jsonl", tmp_path / "r.json"
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(out), "--report", str(report))
    assert rc == 0, err
    assert [r["conversations"] for r in lines(out)] == [rows[i]["conversations"] for i in (0, 2, 3)]
    assert json.loads(report.read_text())["counts"]["removed"] == {"exact_duplicate": 1}
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(out), "--report", str(report),
                     "--dedup-key", "first-user")
    assert rc == 0, err
    assert len(lines(out)) == 2
    assert json.loads(report.read_text())["counts"]["removed"] == {"exact_duplicate": 2}
    with pytest.raises(SystemExit) as e:
        clean.main(["--stage", "pretrain", "--input", str(src), "--out", str(out), "--dedup-key", "first-user"])
    assert e.value.code == 2 and "--dedup-key first-user applies to the chat stages" in capsys.readouterr().err


def test_bad_record_is_one_line_and_leaves_nothing_or_is_counted(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", [{"text": "第一条记录，内容正常。"}, '{"text": "broken', {"txt": "wrong key"}])
    folder = tmp_path / "o"
    out, report = folder / "c.jsonl", folder / "r.json"
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--report", str(report))
    assert rc == 1
    one_line_error(err, f"{src}:2:", "invalid JSON", "--skip-bad")
    assert_nothing_left(folder, "c.jsonl", "r.json")
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--report", str(report),
                     "--skip-bad")
    assert rc == 0, err
    assert len(lines(out)) == 1
    assert json.loads(report.read_text())["counts"]["skipped"] == {"invalid_json": 1, "missing_field": 1}


def test_broken_inputs_and_failing_filter_are_one_line(tmp_path, capsys):
    good = jsonl(tmp_path / "good.jsonl", [{"text": "第一条记录，内容正常。"}])
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "abc"}\n' * 200)[:-7])
    out = tmp_path / "o" / "c.jsonl"
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(cut), "--out", str(out))
    assert rc == 1
    one_line_error(err, str(cut), "truncated zstd stream")
    (tmp_path / "f.py").write_text("def boom(record):\n    raise ValueError('nope')\n")
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(good), "--out", str(out),
                     "--filter", f"{tmp_path / 'f.py'}:boom")
    assert rc == 1
    one_line_error(err, f"{good}:1:", "--filter boom raised ValueError: nope")
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(good), "--out", str(out),
                     "--filter", f"{tmp_path / 'f.py'}:absent")
    assert rc == 1
    one_line_error(err, "has no function 'absent'")
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(tmp_path / "missing.jsonl"), "--out", str(out))
    assert rc == 1
    one_line_error(err, "missing.jsonl: no such file")
    assert_nothing_left(tmp_path / "o", "c.jsonl")


def test_sampling_to_n_records_is_deterministic(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", [{"text": f"记录 {i}"} for i in range(10)])
    out = tmp_path / "c.jsonl"
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", f"{src}@4", "--out", str(out))
    assert rc == 0, err
    first = [r["text"] for r in lines(out)]
    assert len(first) == 4 and first == sorted(first, key=lambda t: int(t.split()[1]))  # file order kept
    assert run(capsys, "--stage", "pretrain", "--input", f"{src}@4", "--out", str(out))[0] == 0
    assert [r["text"] for r in lines(out)] == first
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", f"{src}@25", "--out", str(out), "--dedup", "none")
    assert rc == 0, err
    texts = [r["text"] for r in lines(out)]
    assert len(texts) == 25 and sorted({texts.count(t) for t in texts}) == [2, 3]
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", f"{src}:2@3", "--out", str(out))
    assert rc == 1
    one_line_error(err, "a mixing weight (:W) or a record count (@N), not both")


def test_shuffle_target_size_placeholders_source_and_zst(tmp_path, capsys):
    rows = [conversation(f"问题 {i}：你是谁？", f"我是 {{{{name}}}}，由 {{{{author}}}} 训练。回答 {i}。{{{{other}}}}")
            for i in range(40)]
    src = jsonl(tmp_path / "identity.jsonl", rows)
    args = ["--stage", "sft", "--input", str(src), "--set", "name=tinylm", "--set", "author=tester", "--dedup", "none"]
    plain, a, b, c = (tmp_path / n for n in ("plain.jsonl", "a.jsonl", "b.jsonl", "c.jsonl"))
    assert run(capsys, *args, "--out", str(plain), "--no-source")[0] == 0
    answers = [r["conversations"][1]["content"] for r in lines(plain)]
    assert answers[3] == "我是 tinylm，由 tester 训练。回答 3。{{other}}"
    assert all("source" not in r for r in lines(plain))
    assert run(capsys, *args, "--out", str(a), "--shuffle", "--seed", "1", "--no-source")[0] == 0
    assert run(capsys, *args, "--out", str(b), "--shuffle", "--seed", "1", "--no-source")[0] == 0
    assert run(capsys, *args, "--out", str(c), "--shuffle", "--seed", "2", "--no-source")[0] == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.read_bytes() != plain.read_bytes()
    assert sorted(a.read_bytes().splitlines()) == sorted(plain.read_bytes().splitlines())
    budget = len(plain.read_bytes()) // 4
    report = tmp_path / "r.json"
    rc, _, err = run(capsys, *args, "--out", str(tmp_path / "d.jsonl.zst"), "--target-mb", str(budget / 1e6),
                     "--report", str(report))
    assert rc == 0, err
    cut = lines(tmp_path / "d.jsonl.zst")
    counts = json.loads(report.read_text())["counts"]
    assert 0 < len(cut) == counts["written"] < 40 and counts["cut_by_target_mb"] == 40 - len(cut)
    assert sum(len(json.dumps(r, ensure_ascii=False)) + 1 for r in cut) <= budget * 1.2
    assert {r["source"] for r in cut} == {str(src)}
    assert_nothing_left(tmp_path)


def test_pack_reads_the_cleaned_file(tmp_path, capsys):
    out = tmp_path / "sft.jsonl"
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(SAMPLE / "sft" / "oasst1_zh.jsonl"), "--out", str(out))
    assert rc == 0, err
    assert pack.main(["--stage", "sft", "--input", str(out), "--out", str(tmp_path / "packed"), "--seq-len", "256",
                      "--workers", "1", "--quiet"]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "packed" / "meta.json").read_text())
    assert meta["counts"]["records_read"] == len(lines(out)) and meta["counts"]["skipped"] == {}


def test_output_and_report_do_not_depend_on_workers(tmp_path, capsys):
    bad = jsonl(tmp_path / "bad.jsonl", ['{"text": "broken', {"text": "\u7b2c\u4e00\u6761"}, {"txt": 1}])
    inputs = [str(SAMPLE / "pretrain" / "wiki_zh_cmrc2018.jsonl"), str(bad),
              f"{SAMPLE / 'pretrain' / 'chinese_poetry_classics.jsonl'}@700"]
    reports = []
    for workers in ("1", "2"):
        out, report = tmp_path / f"w{workers}.jsonl", tmp_path / f"w{workers}.json"
        rc, _, err = run(capsys, "--stage", "pretrain", "--input", *inputs, "--out", str(out), "--report", str(report),
                         "--skip-bad", "--workers", workers, "--shuffle",
                         "--exclude", str(SAMPLE / "pretrain" / "wiki_zh_hant_drcd.jsonl"))
        assert rc == 0, err
        r = json.loads(report.read_text())
        del r["seconds"], r["options"]["workers"], r["out"]
        reports.append((out.read_bytes(), r))
    assert reports[0] == reports[1]
    assert reports[0][1]["counts"]["skipped"] == {"invalid_json": 1, "missing_field": 1}
    assert sum(reports[0][1]["counts"]["removed"].values()) > 0


def sample_documents() -> list[str]:
    docs = []
    for path in sorted((SAMPLE / "pretrain").glob("*.jsonl")) + sorted((SAMPLE / "sft").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            text = obj.get("text") or "\n".join(t["content"] for t in obj["conversations"])
            docs.append(normalise(text))
    return [d for d in dict.fromkeys(docs) if len(d) >= 50]


def edited(rng: random.Random, text: str, rate: float) -> str:
    """``text`` with ``rate`` x its length random character substitutions, insertions and deletions."""
    chars = list(text)
    for _ in range(max(1, int(len(chars) * rate))):
        i, op = rng.randrange(len(chars)), rng.randrange(3)
        c = rng.choice(CJK + list("abcdefghijklmnopqrstuvwxyz"))
        if op == 0:
            chars[i] = c
        elif op == 1:
            chars.insert(i, c)
        else:
            del chars[i]
    return "".join(chars)


def test_near_dup_defaults_reach_recall_and_false_positive_targets():
    """Defaults (2-gram shingles, 128 permutations, threshold 0.8): >= 90 % of copies with 3 % character edits
    are found, and <= 1 % of the distinct documents of the shipped sample are taken for near duplicates."""
    docs = sample_documents()
    assert len(docs) > 3000
    fingerprint, index = Fingerprinter(near=True), DuplicateIndex()
    false_positives = 0
    for doc in docs:
        fp = fingerprint(doc)
        if index.match(fp) is None:
            index.add(fp)
        else:
            false_positives += 1
    rng = random.Random(0)
    probes = rng.sample(docs, 400)
    found = sum(index.match(fingerprint(edited(rng, doc, 0.03))) is not None for doc in probes)
    print(f"near-dup recall {found / len(probes):.1%}, false positives {false_positives / len(docs):.2%}")
    assert found / len(probes) >= 0.9
    assert false_positives / len(docs) <= 0.01


@pytest.mark.parametrize("flag, value", [("--near-dup-threshold", "0"), ("--max-symbol-ratio", "2"),
                                         ("--set", "no-equals"), ("--min-chars", "-1")])
def test_bad_options_name_their_flag(tmp_path, capsys, flag, value):
    src = jsonl(tmp_path / "in.jsonl", [{"text": "正常的记录。"}])
    with pytest.raises(SystemExit) as e:
        clean.main(["--stage", "pretrain", "--input", str(src), "--out", str(tmp_path / "c.jsonl"), flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
