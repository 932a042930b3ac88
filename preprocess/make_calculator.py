"""A deterministic synthetic tool-use corpus: integer arithmetic asked as people ask it, answered through
``calculate_math`` (the calculator recipe of train.sh, ``RECIPE=calculator``).

Contract: :func:`question` draws one question from a ``random.Random``: a language (Chinese or English), a
phrasing family (:data:`FAMILIES`: question forms such as 是多少 / what is, command forms such as 帮我算一下 /
please compute / add … and …, and the 的乘积 form), an operator and one of its words (:data:`OPERATOR_WORDS`:
加 / 加上 / plus / ``+`` …) and two operands of 1 to 4 digits (division is exact: the dividend is a multiple of
the divisor and has at most 4 digits). The call is ``calculate_math`` with the ASCII expression
(``1234*56``); its result is exactly what ``core/tools.py`` answers; the final answer states the number.
Every prompt offers one to three tools: ``calculate_math`` and distractors from ``core.tools.BUILTIN``, in a
drawn order.

Held out: an operand triple whose hash falls in bucket 0 of :data:`HELDOUT_BUCKETS` (:func:`is_heldout`) and
the last sentence of every family are used only by the held-out questions, so no held-out question (its
numbers, or its sentence) is seen in training. :func:`write_corpus` writes ``sft/calculator.jsonl`` (SFT
conversations: the tools, then per question the user turn, the assistant's call, the tool's result and the
answer; ``--questions-per-conversation`` adds follow-up questions), ``heldout.jsonl`` (``bin/eval --tool-eval``
records with ``gt``) and ``grpo.jsonl`` (RL prompts with ``gt``, training sentences and numbers). The
training files depend on ``seed`` only; the held-out file on ``heldout_seed`` only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import tools  # noqa: E402
from core.errors import run_main  # noqa: E402
from core.files import atomic_write_text  # noqa: E402
from core.numbers import number  # noqa: E402

CALCULATOR = "calculate_math"
OPS = ("+", "-", "*", "/")
HELDOUT_BUCKETS = 8  # one operand triple in this many is held out
MAX_OPERAND = 9999
OPERATOR_WORDS = {
    "zh": {"+": ("加", "加上", "+"), "-": ("减", "减去", "-", "−"), "*": ("乘以", "乘", "×", "*"),
           "/": ("除以", "÷", "/")},
    "en": {"+": ("plus", "+"), "-": ("minus", "-", "−"), "*": ("times", "×", "*"), "/": ("divided by", "÷", "/")},
}
SYMBOLS = frozenset({"+", "-", "−", "*", "×", "/", "÷"})


@dataclass(frozen=True)
class Family:
    """A phrasing family: its sentences (``{x}``: the arithmetic phrase; ``{a}``/``{b}``: the operands of a
    family with a fixed ``op``); the last sentence is held out."""

    name: str
    lang: str
    sentences: tuple[str, ...]
    op: str | None = None


FAMILIES = (
    Family("是多少", "zh", ("{x}是多少？", "{x}是多少", "{x} 是多少？", "{x}是多少呀？")),
    Family("等于多少", "zh", ("{x}等于多少？", "{x} 等于多少", "{x}等于多少呢？")),
    Family("等于几", "zh", ("{x}等于几？", "{x} 等于几", "{x}等于几呀？")),
    Family("的结果", "zh", ("{x}的结果是多少？", "{x}的结果", "告诉我{x}的结果。")),
    Family("计算", "zh", ("计算{x}", "计算一下{x}。", "计算：{x}")),
    Family("帮我算一下", "zh", ("帮我算一下{x}", "帮我算一下{x}等于多少", "帮我算一下：{x}？")),
    Family("请问", "zh", ("请问{x}是多少？", "请问{x}等于几", "请问，{x}等于多少？")),
    Family("的乘积", "zh", ("{a}和{b}的乘积是多少？", "{a}与{b}的乘积", "求{a}和{b}的乘积。"), op="*"),
    Family("what is", "en", ("What is {x}?", "what is {x}", "So, what is {x}?")),
    Family("what's", "en", ("What's {x}?", "what's {x}", "what's {x} ?")),
    Family("how much is", "en", ("How much is {x}?", "how much is {x}", "How much is {x} exactly?")),
    Family("please compute", "en", ("Please compute {x}.", "please compute {x}", "Please compute {x} for me.")),
    Family("add", "en", ("Add {a} and {b}.", "add {a} and {b}", "Please add {a} and {b}."), op="+"),
    Family("multiply", "en", ("Multiply {a} by {b}.", "multiply {a} and {b}", "Please multiply {a} by {b}."),
           op="*"),
)
ANSWERS = {"zh": ("结果是{r}。", "{e}={r}。"), "en": ("The answer is {r}.", "{e} = {r}.")}


@dataclass(frozen=True)
class Question:
    """One drawn question: its text and what it was drawn from (for coverage checks), the ASCII
    expression and the tools offered (names, in order)."""

    text: str
    family: str
    lang: str
    op: str
    word: str
    a: int
    b: int
    expression: str
    offered: tuple[str, ...]


def is_heldout(op: str, a: int, b: int) -> bool:
    """True for the operand triples reserved for held-out questions (a hash bucket, the same for every seed)."""
    digest = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return digest[0] % HELDOUT_BUCKETS == 0


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, 4)
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op != "/":
        return _operand(rng), _operand(rng)
    divisor = rng.choice((rng.randint(2, 9), rng.randint(2, 99), rng.randint(2, 999)))
    quotient = rng.randint(1, MAX_OPERAND // divisor)
    return divisor * quotient, divisor


def _phrase(lang: str, a: int, word: str, b: int, rng: random.Random) -> str:
    if lang == "en" or (word in SYMBOLS and rng.random() < 0.5):
        return f"{a} {word} {b}"
    return f"{a}{word}{b}"


def question(rng: random.Random, heldout: bool) -> Question:
    """One question drawn from ``rng``: held-out numbers and sentences when ``heldout``, else training ones."""
    family = rng.choice(FAMILIES)
    sentences = family.sentences[-1:] if heldout else family.sentences[:-1]
    while True:
        op = family.op or rng.choice(OPS)
        a, b = _operands(rng, op)
        if is_heldout(op, a, b) == heldout:
            break
    word = rng.choice(OPERATOR_WORDS[family.lang][op])
    sentence = rng.choice(sentences)
    text = sentence.format(x=_phrase(family.lang, a, word, b, rng), a=a, b=b)
    distractors = [n for n in tools.BUILTIN if n != CALCULATOR]
    offered = [CALCULATOR, *rng.sample(distractors, rng.randint(0, 2))]
    rng.shuffle(offered)
    return Question(text, family.name, family.lang, op, word if family.op is None else family.name, a, b,
                    f"{a}{op}{b}", tuple(offered))


def result_of(q: Question) -> str:
    """The number ``calculate_math`` answers for the question's expression (core/tools.py)."""
    return tools.execute(CALCULATOR, {"expression": q.expression})["result"]


def answer_text(q: Question, rng: random.Random) -> str:
    """The final answer stating the number, in one of the question language's :data:`ANSWERS` forms."""
    return rng.choice(ANSWERS[q.lang]).format(r=result_of(q), e=q.expression)


def sft_record(questions: list[Question], rng: random.Random) -> dict:
    """The training conversation: for each question in turn (follow-ups share the first one's tools), the
    call, the tool's result turn and the answer stating the number."""
    turns: list[dict] = []
    for i, q in enumerate(questions):
        call_id = f"call_{i}"
        arguments = json.dumps({"expression": q.expression}, ensure_ascii=False)
        answer = answer_text(q, rng)
        turns += [
            {"role": "user", "content": q.text},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": CALCULATOR, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "name": CALCULATOR,
             "content": tools.run_call(CALCULATOR, arguments)},
            {"role": "assistant", "content": answer}]
    return {"tools": tools.tools_schema(questions[0].offered), "conversations": turns}


def conversations(questions: list[Question], most: int, rng: random.Random) -> list[list[Question]]:
    """``questions`` in order, cut into conversations of 1 to ``most`` questions (sizes drawn from ``rng``)."""
    out, i = [], 0
    while i < len(questions):
        size = rng.randint(1, most)
        out.append(questions[i:i + size])
        i += size
    return out


def pretrain_record(q: Question, rng: random.Random) -> dict:
    """A short plain-text record for the pretraining step: the question, the expression with its result and
    the answer, so every number is written again nearby (cheap rows in which a model learns to copy numbers,
    before SFT asks it to do so across the long tool definitions)."""
    return {"text": f"{q.text}\n{q.expression} = {result_of(q)}\n{answer_text(q, rng)}"}


def prompt_record(q: Question) -> dict:
    """A ``--tool-eval`` / GRPO prompt record: the question, the offered tools and the ground truth."""
    return {"conversations": [{"role": "user", "content": q.text}], "tools": tools.tools_schema(q.offered),
            "gt": [result_of(q)]}


def draw(seed: str, count: int, heldout: bool) -> list[Question]:
    """``count`` distinct questions from a generator seeded by the string ``seed``."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < count:
        q = question(rng, heldout)
        if q.text not in seen:
            seen.add(q.text)
            out.append(q)
    return out


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_corpus(out: Path, train: int, heldout: int, grpo: int, seed: int = 0, heldout_seed: int = 0,
                 questions_per_conversation: int = 1, pretrain: int = 0) -> dict:
    """The files under ``out`` (module docstring; ``pretrain/calculator.jsonl`` too when ``pretrain`` > 0);
    returns their record counts. ``train`` counts
    questions; a training conversation holds 1 to ``questions_per_conversation`` of them (follow-up questions
    share the first one's tools and system turn, so the long tool definitions are read once per conversation)."""
    answer_rng = random.Random(f"answers:{seed}")
    train_qs = draw(f"train:{seed}", train + grpo, heldout=False)
    grouped = conversations(train_qs[:train], questions_per_conversation, random.Random(f"follow-ups:{seed}"))
    pretrain_rng = random.Random(f"pretrain:{seed}")
    files = {
        out / "sft" / "calculator.jsonl": [sft_record(qs, answer_rng) for qs in grouped],
        out / "grpo.jsonl": [prompt_record(q) for q in train_qs[train:]],
        out / "heldout.jsonl": [prompt_record(q) for q in draw(f"heldout:{heldout_seed}", heldout, heldout=True)],
    }
    if pretrain:
        files[out / "pretrain" / "calculator.jsonl"] = [
            pretrain_record(q, pretrain_rng) for q in draw(f"pretrain:{seed}", pretrain, heldout=False)]
    for path, records in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _jsonl(records))
    return {str(path): len(records) for path, records in files.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_calculator.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (sft/calculator.jsonl, heldout.jsonl, "
                   "grpo.jsonl)")
    p.add_argument("--train", type=number(int, 1, 10 ** 7), default=20000,
                   help="questions in the SFT conversations (default 20000)")
    p.add_argument("--questions-per-conversation", type=number(int, 1, 16), default=1, metavar="N",
                   help="a training conversation holds 1 to N questions (drawn; default 1)")
    p.add_argument("--heldout", type=number(int, 1, 10 ** 6), default=200,
                   help="held-out tool-eval questions (default 200)")
    p.add_argument("--grpo", type=number(int, 0, 10 ** 6), default=2000, help="GRPO prompts (default 2000)")
    p.add_argument("--pretrain", type=number(int, 0, 10 ** 7), default=0, metavar="N",
                   help="also write pretrain/calculator.jsonl: N short plain-text records (question, expression = "
                   "result, answer; training numbers and sentences only; default 0: none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 63 - 1), default=0, help="seed of the training files")
    p.add_argument("--heldout-seed", type=number(int, 0, 2 ** 63 - 1), default=0,
                   help="seed of the held-out file (default 0: the same questions for every training seed)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)

    def body() -> None:
        counts = write_corpus(args.out, args.train, args.heldout, args.grpo, args.seed, args.heldout_seed,
                              args.questions_per_conversation, args.pretrain)
        if not args.quiet:
            print("\n".join(f"{n} records -> {path}" for path, n in counts.items()))
    return run_main("make_calculator.py", body)


if __name__ == "__main__":
    sys.exit(main())
