"""The default noise filters of clean.py on text that only looks noisy, and on the shipped sample."""

from __future__ import annotations

import json
import re
import unicodedata

import pytest
from conftest import SAMPLE

from preprocess import clean
from preprocess import textfilters as tf
from preprocess.textfilters import SYMBOL_PLANES_END, Measures, _symbols

LATEX = r"Let \( g(x) = \frac{x^2 + 1}{x^2 - 1} \). Then for \( x^2 \neq 1 \), \( g(-x) = g(x) \)."
ANNOTATED = "逢師須安拜，（「禮拜」，伯三七一六卷作「頂禮」。）過道向前行。（「過」，伯三六五六卷作「遇」。）"
URL = "https://www.facebook.com/events/154761701328646/"
URL_IN_ZH = ("详见 " + URL + "该校被指以「教师专业发展」名义，要求全体教师参与游行。") * 3
FLOWCHART = "流程图：\n```\n+------+\n| 加载 |\n+------+\n   |\n   v\n+------+\n| 训练 |\n+------+\n```"


def visible(text: str) -> int:
    return sum(not c.isspace() for c in text)


def symbol_share(text: str) -> float:
    """The reference: Unicode category S* characters among non-space ones, one character at a time."""
    return sum(unicodedata.category(c).startswith("S") for c in text) / visible(text)


def reference_measures(text: str) -> Measures:
    """The definition: every share counted by running its regular expression over the text itself."""
    letters, visible_chars = tf._count(tf._LETTER, text), max(1, len(text) - tf._count(tf._SPACE, text))
    lines = [s for s in (line.strip() for line in text.splitlines()) if tf._WORD.search(s)]
    return Measures(
        cjk_ratio=tf._count(tf._CJK, text) / letters if letters else 0.0,
        ascii_ratio=tf._count(tf._ASCII_LETTER, text) / letters if letters else 0.0,
        symbol_ratio=tf._count(_symbols(), text) / visible_chars,
        digit_ratio=tf._count(tf._DIGIT, text) / visible_chars,
        url_ratio=sum(len(m) for m in tf._URL.findall(text)) / visible_chars,
        longest_run=max((len(m.group()) for m in re.finditer(r"(.)\1*", text, re.S)), default=0),
        dup_line_ratio=(len(lines) - len(set(lines))) / len(lines) if len(lines) >= 3 else 0.0,
        control_chars=tf._count(tf._CONTROL, text), mojibake=len(tf._MOJIBAKE.findall(text)))


EDGES = ["", " ", "a", "_", "😀😀😀 emoji", "𠀀𠀁 CJK Extension B", "\x00\x07\x85\x9f control", "１２３ ٣٤ ½ Ⅻ",
         "\u3000ideographic space\u2028line sep\xa0nbsp", "e\u0301 combining", "Ã© â€™ Â \ufffd", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚",
         "\U0001f600" * 50, "a" * 45 + "b", "www.example.com/x 好", "\ud7ff\ue000\uffff\U0010ffff"]


def test_measures_count_what_the_expressions_count():
    """The table lookup (BMP) and the expressions (above it) give exactly the regex-defined measures on
    every text of the shipped sample and on edge cases (astral symbols and CJK, controls, odd digits)."""
    texts = list(EDGES)
    for stage in ("pretrain", "sft", "dpo"):
        parse = clean.Preparer(clean.CleanOptions(stage, [], SAMPLE, dedup="none")).parse
        texts += [clean.text_of(parse(item))
                  for item in clean.iter_items(clean.parse_input_args([str(SAMPLE / stage / "*.jsonl")]))]
    assert len(texts) > 4_000
    assert [t for t in texts if Measures.of(t) != reference_measures(t)] == []


def test_the_symbol_class_is_exactly_unicode_category_s():
    pattern = _symbols()
    wrong = [cp for cp in range(0x30000) if (pattern.fullmatch(chr(cp)) is not None)
             != unicodedata.category(chr(cp)).startswith("S")]
    assert wrong == [] and SYMBOL_PLANES_END == 0x20000


def test_punctuation_latex_urls_and_layout_are_not_noise():
    for text in (LATEX, ANNOTATED, FLOWCHART, "★☆◆◇■□▲△●○" + "好" * 10):
        assert Measures.of(text).symbol_ratio == pytest.approx(symbol_share(text))
    assert Measures.of(LATEX).symbol_ratio == pytest.approx(6 / 67)  # = + ^ only: brackets are punctuation
    assert Measures.of(ANNOTATED).symbol_ratio == 0.0
    assert Measures.of("★☆◆◇■□▲△●○" + "好" * 10).symbol_ratio == 0.5
    assert Measures.of(URL_IN_ZH).url_ratio == pytest.approx(3 * len(URL) / visible(URL_IN_ZH))
    assert Measures.of(FLOWCHART).dup_line_ratio == 0.0  # the box edges are layout, "加载" / "训练" differ
    assert Measures.of("同一行\n同一行\n同一行\n另一行").dup_line_ratio == 0.5


@pytest.mark.parametrize("stage,folder,removed", [
    ("pretrain", "pretrain", {"symbol_ratio": 1}),  # a poem whose lost characters are U+25A1 squares
    ("sft", "sft", {"repeated_lines": 1}),  # an answer that repeats its paragraphs three times
    ("reason", "reasoning", {}),
    ("dpo", "dpo", {"mojibake": 2, "repeated_lines": 1}),  # U+FFFD inside words, the same tripled answer
])
def test_default_noise_filters_on_the_shipped_sample(tmp_path, capsys, stage, folder, removed):
    report = tmp_path / "report.json"
    rc = clean.main(["--stage", stage, "--input", str(SAMPLE / folder / "*.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                     "--report", str(report), "--dedup", "none", "--workers", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["counts"]["removed"] == removed
