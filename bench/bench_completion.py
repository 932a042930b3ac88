#!/usr/bin/env python3
"""Cost of parsing a streamed completion (core/completion.py) next to detokenizing it.

    .venv/bin/python bench/bench_completion.py                  # 2 calls + reasoning, ~6k tokens
    .venv/bin/python bench/bench_completion.py --repeat 9 --copies 40

The completion is ``--copies`` copies of a block holding reasoning, answer text (English and Chinese) and a
tool call, wrapped as one model answer and tokenized with the shipped tokenizer. Two arms, alternated
--repeat times in this process; the minimum and the median wall time are reported (on a loaded machine
the minimum is the better estimate of the cost itself): "decode" feeds the ids one at a time to
IncrementalDecoder; "decode + parse" feeds them one at a time to CompletionParser (which decodes them
itself) and finishes it. The table gives milliseconds, microseconds per token and the ratio.
Numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.completion import CompletionParser  # noqa: E402
from core.detokenize import IncrementalDecoder  # noqa: E402
from core.tokenizer import load_tokenizer  # noqa: E402

BLOCK = ("We add the numbers step by step, 然后检查结果是否正确。 The tool is exact, so we call it.\n"
         "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"(12 + 30) * 7\"}}\n</tool_call>\n"
         "The answer is 294. 答案是二百九十四。\n")


def decode(tok, ids: list[int]) -> int:
    dec = IncrementalDecoder(tok)
    return sum(len(dec.push(i)) for i in ids) + len(dec.flush())


def decode_parse(info, ids: list[int]) -> int:
    parser = CompletionParser(info, tools=("calculator",), thinking=True)  # decodes the ids itself
    return sum(len(parser.feed((i,))) for i in ids) + len(parser.finish())


def timed(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=20, help="blocks in the completion (default 20)")
    p.add_argument("--repeat", type=int, default=7, help="alternating runs per arm (default 7)")
    args = p.parse_args()
    info = load_tokenizer(ROOT / "data" / "tokenizer")
    text = "thinking about it\n</think>\n\n" + BLOCK * args.copies
    ids = info.tokenizer.encode(text, add_special_tokens=False).ids
    arms = {"decode": lambda: decode(info.tokenizer, ids), "decode + parse": lambda: decode_parse(info, ids)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeat):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    base = {"min": min(times["decode"]), "median": statistics.median(times["decode"])}
    print(f"{len(ids)} tokens, {len(text)} characters, {args.copies} tool calls; {args.repeat} runs per arm")
    print("| arm | min ms | min us/token | min vs decode | median ms | median vs decode |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        low, mid = min(values), statistics.median(values)
        print(f"| {name} | {low * 1e3:.1f} | {low / len(ids) * 1e6:.2f} | {low / base['min']:.2f}x | "
              f"{mid * 1e3:.1f} | {mid / base['median']:.2f}x |")

if __name__ == "__main__":
    main()
