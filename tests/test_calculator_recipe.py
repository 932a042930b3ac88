"""RECIPE=calculator: the synthetic corpus (preprocess/make_calculator.py) is deterministic, covers every
phrasing family and operator word, and keeps its held-out questions out of training; the calculator_call
reward reads calls from generated ids; the recipe runs end to end in smoke mode (corpus -> pack -> SFT ->
tool eval -> GRPO -> tool eval, final link)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from core import tools
from core.calculator import evaluate
from core.tokenizer import load_tokenizer
from preprocess import make_calculator as mc
from train import loading
from train.rewards import CALL_BONUS, calculator_call, load_rewards

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calc") / "data"
    mc.write_corpus(out, train=3000, heldout=300, grpo=50, seed=1)
    return out


def test_the_corpus_depends_on_its_seed_only(corpus, tmp_path):
    mc.write_corpus(tmp_path / "again", train=3000, heldout=300, grpo=50, seed=1)
    mc.write_corpus(tmp_path / "other", train=3000, heldout=300, grpo=50, seed=2)
    for name in ("sft/calculator.jsonl", "heldout.jsonl", "grpo.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (corpus / name).read_bytes()
    assert (tmp_path / "other" / "sft/calculator.jsonl").read_bytes() != (corpus / "sft/calculator.jsonl").read_bytes()
    assert (tmp_path / "other" / "heldout.jsonl").read_bytes() == (corpus / "heldout.jsonl").read_bytes()


@pytest.mark.parametrize("heldout", [False, True])
def test_every_family_operator_and_operator_word_is_drawn(heldout):
    rng = random.Random(0)
    drawn = [mc.question(rng, heldout) for _ in range(3000)]
    assert {q.family for q in drawn} == {f.name for f in mc.FAMILIES}
    assert {q.op for q in drawn} == set(mc.OPS)
    for lang, words in mc.OPERATOR_WORDS.items():
        for op, options in words.items():
            assert set(options) <= {q.word for q in drawn if q.lang == lang and q.op == op}, (lang, op)
    assert {q.lang for q in drawn} == {"zh", "en"}
    assert {len(q.offered) for q in drawn} == {1, 2, 3}


@pytest.mark.parametrize("heldout", [False, True])
def test_questions_are_phrased_as_their_family_says(heldout):
    rng = random.Random(3)
    for _ in range(500):
        q = mc.question(rng, heldout)
        family = next(f for f in mc.FAMILIES if f.name == q.family)
        assert str(q.a) in q.text and str(q.b) in q.text
        if family.op is None:
            assert q.word in q.text
        assert family.name in q.text.lower()  # each family is named by its phrase


def test_operands_have_up_to_four_digits_and_division_is_exact():
    rng = random.Random(5)
    for _ in range(2000):
        q = mc.question(rng, heldout=False)
        assert 1 <= q.a <= 9999 and 1 <= q.b <= 9999
        value = evaluate(q.expression)
        if q.op == "/":
            assert value == int(value) and q.a % q.b == 0


def test_a_training_conversation_calls_calculate_math_and_states_the_tools_result(corpus):
    for record in _lines(corpus / "sft/calculator.jsonl")[:200]:
        user, call, result, answer = record["conversations"]
        offered = [t["function"]["name"] for t in record["tools"]]
        assert "calculate_math" in offered and 1 <= len(offered) <= 3 and set(offered) <= set(tools.BUILTIN)
        function = call["tool_calls"][0]["function"]
        assert function["name"] == "calculate_math"
        expression = json.loads(function["arguments"])["expression"]
        assert result["content"] == tools.run_call("calculate_math", {"expression": expression})
        assert json.loads(result["content"])["result"] in answer["content"]


def test_follow_up_questions_share_the_first_ones_tools_and_every_question_is_used(tmp_path):
    counts = mc.write_corpus(tmp_path, train=300, heldout=5, grpo=0, seed=4, questions_per_conversation=4)
    records = _lines(tmp_path / "sft/calculator.jsonl")
    assert counts[str(tmp_path / "sft/calculator.jsonl")] == len(records) < 300
    sizes = [len(r["conversations"]) // 4 for r in records]
    assert sum(sizes) == 300 and set(sizes) == {1, 2, 3, 4}
    mc.write_corpus(tmp_path / "one", train=300, heldout=5, grpo=0, seed=4)
    single = _lines(tmp_path / "one" / "sft/calculator.jsonl")
    assert not (tmp_path / "one" / "pretrain").exists()  # no pretrain texts unless asked
    asked = [t["content"] for r in records for t in r["conversations"] if t["role"] == "user"]
    assert asked == [r["conversations"][0]["content"] for r in single]  # the same questions, grouped
    for record in records:
        turns = record["conversations"]
        for i in range(0, len(turns), 4):
            user, call, result, answer = turns[i:i + 4]
            assert [t["role"] for t in (user, call, result, answer)] == ["user", "assistant", "tool", "assistant"]
            assert call["tool_calls"][0]["id"] == result["tool_call_id"] == f"call_{i // 4}"
            assert json.loads(result["content"])["result"] in answer["content"]


def test_pretrain_texts_write_each_number_again_and_hold_no_held_out_question(tmp_path):
    mc.write_corpus(tmp_path, train=10, heldout=50, grpo=0, seed=2, pretrain=400)
    texts = [r["text"] for r in _lines(tmp_path / "pretrain/calculator.jsonl")]
    assert len(texts) == 400 == len(set(texts))
    heldout = {r["conversations"][0]["content"] for r in _lines(tmp_path / "heldout.jsonl")}
    for text in texts:
        question, worked, answer = text.split("\n")
        expression, result = worked.split(" = ")
        assert question not in heldout
        assert result == tools.execute("calculate_math", {"expression": expression})["result"]
        assert result in answer and result.lstrip("-").isdigit()  # exact integer arithmetic


def test_held_out_questions_never_appear_in_training(corpus):
    train = _lines(corpus / "sft/calculator.jsonl") + _lines(corpus / "grpo.jsonl")
    train_texts = {r["conversations"][0]["content"] for r in train}
    heldout = _lines(corpus / "heldout.jsonl")
    assert len(heldout) == 300 and all(r["gt"] for r in heldout)
    for r in heldout:
        text = r["conversations"][0]["content"]
        assert text not in train_texts
        assert not any(text in t or t in text for t in train_texts)
    train_sentences = {s for f in mc.FAMILIES for s in f.sentences[:-1]}
    rng = random.Random(1)
    for _ in range(300):  # held-out numbers and sentences are disjoint from training ones
        q = mc.question(rng, heldout=True)
        assert mc.is_heldout(q.op, q.a, q.b)
        family = next(f for f in mc.FAMILIES if f.name == q.family)
        assert family.sentences[-1] not in train_sentences


def test_held_out_records_are_tool_eval_records(corpus):
    from serve.tool_eval import read_cases
    cases = read_cases(corpus / "heldout.jsonl")
    assert len(cases) == 300
    assert all(c.expected == frozenset({"calculate_math"}) for c in cases)


def _ids(tok, text: str) -> list[int]:
    return list(tok.tokenizer.encode(text).ids)


def test_calculator_call_reward_reads_the_call_from_ids():
    tok = load_tokenizer(ROOT / "data" / "tokenizer")
    prompt = [{"role": "system", "content": "", "tools": tools.tools_schema(["calculate_math", "random_number"])},
              {"role": "user", "content": "12乘以3是多少？"}]
    call = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "%s"}}\n</tool_call>'
    completions = [call % "12*3", call % "12+3", "36",
                   '<tool_call>\n{"name": "random_number", "arguments": {}}\n</tool_call>']
    ids = [_ids(tok, c) for c in completions]
    n = len(completions)
    got = calculator_call([prompt] * n, [[{"role": "assistant", "content": c}] for c in completions],
                          gt=[["36"]] * n, completion_ids=ids, tokenizer=[str(tok.path)] * n)
    assert got == [1.0 + CALL_BONUS, CALL_BONUS, 0.0, CALL_BONUS]
    # the same characters as plain text pieces are no call: structure comes from control ids only
    plain = [t for piece in ("<", "tool", "_", "call", ">") for t in _ids(tok, piece)] + _ids(tok, "12*3")
    assert calculator_call([prompt], [[]], gt=[["36"]], completion_ids=[plain], tokenizer=[str(tok.path)]) == [0.0]
    assert calculator_call([prompt], [[]], gt=[["tea"]], completion_ids=[ids[0]], tokenizer=[str(tok.path)]) == [None]
    assert [r.name for r in load_rewards(["calculator_call"])] == ["calculator_call"]


def test_the_recipe_runs_end_to_end_in_smoke_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "OUT_DIR": str(tmp_path),
           "RECIPE": "calculator"}
    proc = subprocess.run(["bash", str(ROOT / "train.sh"), "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "calculator"
    assert (out / "final").resolve() == (out / "grpo").resolve()
    for run in ("sft", "grpo"):
        results = _lines(out / run / "eval_results.jsonl")
        assert results[-1]["kind"] == "tool-eval" and results[-1]["metrics"]["cases"] == 4
    assert loading.load(out / "final").model_config.max_position_embeddings >= 1024  # three tool rounds fit
    grpo_metrics = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/tool_answer" in m and "reward/tool_format" in m for m in grpo_metrics)  # tools ran in rollouts
