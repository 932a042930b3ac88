#!/usr/bin/env python3
"""Write ``calculator_zh_en.jsonl``: a small tool-use and thinking SFT sample written for tinylm.

    python data/sample/tools/make_sample.py      (from the repository root; deterministic: the same bytes)

Every record lists one tool (``CALCULATOR``) on the record and is built from a fixed ``random.Random(0)``;
arithmetic is computed here, so every tool result and every final answer is correct. The kinds, in a
fixed rotation: one call, two calls in one turn (their results merged into one user turn by the
template), a follow-up question with a second call, a question answered without a call, and thinking
without tools. About half of the assistant turns carry ``reasoning_content``; arguments alternate between
a JSON object and a JSON string (both OpenAI forms). English and Chinese prompts alternate.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().with_name("calculator_zh_en.jsonl")
RECORDS = 120
CALCULATOR = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression (integers, + - * and parentheses) and return the exact result.",
    "parameters": {"type": "object",
                   "properties": {"expression": {"type": "string", "description": "for example (3 + 4) * 12"}},
                   "required": ["expression"]}}}
ASK = {"en": ["What is {e}?", "Please compute {e}.", "Can you work out {e} for me?", "Calculate {e}."],
       "zh": ["{e} 等于多少？", "请帮我算一下 {e}。", "计算 {e}。", "{e} 是多少？"]}
ASK_TWO = {"en": "What are {a} and {b}?", "zh": "{a} 和 {b} 分别是多少？"}
FOLLOW = {"en": "And that times {k}?", "zh": "再乘以 {k} 呢？"}
ANSWER = {"en": "{e} = {r}.", "zh": "{e} 的结果是 {r}。"}
ANSWER_TWO = {"en": "{a} = {ra}, and {b} = {rb}.", "zh": "{a} = {ra}，{b} = {rb}。"}
THINK_CALL = {"en": "This needs exact arithmetic, so I will use the calculator on {e}.",
              "zh": "需要精确计算 {e}，用计算器。"}
THINK_DONE = {"en": "The calculator returned {r}.", "zh": "计算器返回 {r}。"}
NO_CALL = {"en": [("Hello! Who are you?", "Hello! I am a small assistant. I can do exact arithmetic with a "
                   "calculator tool."),
                  ("Is 7 an odd number?", "Yes, 7 is odd: it leaves a remainder of 1 when divided by 2.")],
           "zh": [("你好，你会做什么？", "你好！我是一个小助手，可以用计算器工具做精确的算术。"),
                  ("10 是偶数吗？", "是的，10 除以 2 余 0，所以是偶数。")]}


def expression(rng: random.Random) -> tuple[str, int]:
    """A random integer expression and its value (computed, never guessed)."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    form = rng.choice(["{a} * {b}", "{a} + {b} * {c}", "({a} + {b}) * {c}", "{a} * {b} - {c}", "{a} - {b}"])
    text = form.format(a=a, b=b, c=c)
    value = {"{a} * {b}": a * b, "{a} + {b} * {c}": a + b * c, "({a} + {b}) * {c}": (a + b) * c,
             "{a} * {b} - {c}": a * b - c, "{a} - {b}": a - b}[form]
    return text, value


class Writer:
    """Builds the turns of one record: calls get ids call_<record>_<n>; arguments alternate object/string."""

    def __init__(self, index: int, lang: str) -> None:
        self.index, self.lang, self.calls = index, lang, 0

    def call(self, expr: str) -> dict:
        self.calls += 1
        args: dict | str = {"expression": expr}
        if (self.index + self.calls) % 2:
            args = json.dumps(args, ensure_ascii=False)
        return {"id": f"call_{self.index}_{self.calls}", "type": "function",
                "function": {"name": "calculator", "arguments": args}}

    def assistant_call(self, exprs: list[str], think: bool) -> list[dict]:
        """The calling turn, then one tool turn per call (results computed by the caller)."""
        turn: dict = {"role": "assistant", "content": "", "tool_calls": [self.call(e) for e in exprs]}
        if think:
            turn["reasoning_content"] = THINK_CALL[self.lang].format(e=", ".join(exprs))
        return [turn]

    def results(self, calls: list[dict], values: list[int]) -> list[dict]:
        return [{"role": "tool", "tool_call_id": c["id"], "name": "calculator", "content": str(v)}
                for c, v in zip(calls, values, strict=True)]

    def answer(self, content: str, think: str | None) -> dict:
        turn: dict = {"role": "assistant", "content": content}
        if think:
            turn["reasoning_content"] = think
        return turn


def one_call(w: Writer, rng: random.Random, think: bool) -> list[dict]:
    expr, value = expression(rng)
    [calling] = w.assistant_call([expr], think)
    return [{"role": "user", "content": rng.choice(ASK[w.lang]).format(e=expr)}, calling,
            *w.results(calling["tool_calls"], [value]),
            w.answer(ANSWER[w.lang].format(e=expr, r=value), THINK_DONE[w.lang].format(r=value) if think else None)]


def two_calls(w: Writer, rng: random.Random, think: bool) -> list[dict]:
    (a, ra), (b, rb) = expression(rng), expression(rng)
    [calling] = w.assistant_call([a, b], think)
    return [{"role": "user", "content": ASK_TWO[w.lang].format(a=a, b=b)}, calling,
            *w.results(calling["tool_calls"], [ra, rb]),
            w.answer(ANSWER_TWO[w.lang].format(a=a, b=b, ra=ra, rb=rb), None)]


def follow_up(w: Writer, rng: random.Random, think: bool) -> list[dict]:
    turns = one_call(w, rng, think)
    value = int(turns[2]["content"])
    k = rng.randint(2, 9)
    expr = f"{value} * {k}"
    [calling] = w.assistant_call([expr], not think)
    return [*turns, {"role": "user", "content": FOLLOW[w.lang].format(k=k)}, calling,
            *w.results(calling["tool_calls"], [value * k]), w.answer(ANSWER[w.lang].format(e=expr, r=value * k), None)]


def no_call(w: Writer, rng: random.Random, think: bool) -> list[dict]:
    question, answer = rng.choice(NO_CALL[w.lang])
    reason = {"en": "No arithmetic is needed here, so no tool call.", "zh": "这里不需要计算，不调用工具。"}[w.lang]
    return [{"role": "user", "content": question}, w.answer(answer, reason if think else None)]


def think_only(w: Writer, rng: random.Random, think: bool) -> list[dict]:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    expr = f"{a} + {b}"
    steps = {"en": f"{a} + {b}: add the tens, then the ones. The sum is {a + b}.",
             "zh": f"{a} + {b}：先加十位，再加个位，和是 {a + b}。"}[w.lang]
    return [{"role": "user", "content": rng.choice(ASK[w.lang]).format(e=expr)},
            w.answer(ANSWER[w.lang].format(e=expr, r=a + b), steps)]


KINDS = [one_call, two_calls, one_call, follow_up, no_call, think_only]


def records() -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(RECORDS):
        kind = KINDS[i % len(KINDS)]
        w = Writer(i, "en" if i % 2 else "zh")
        turns = kind(w, rng, think=(i // len(KINDS)) % 2 == 0 or kind is think_only)
        out.append({"conversations": turns} if kind is think_only else {"tools": [CALCULATOR], "conversations": turns})
    return out


def main() -> None:
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records()), encoding="utf-8")
    print(f"wrote {OUT} ({RECORDS} records)")


if __name__ == "__main__":
    main()
