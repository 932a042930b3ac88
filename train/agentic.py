"""Multi-turn tool use inside RL rollouts (``--tools``): the model calls a tool, the tool runs, its result goes
back into the context as a tool turn, and generation continues.

Executors (:func:`load_executor`): ``builtin`` runs ``core.tools.execute`` (the safe built-in tools;
an offered tool that is not built in answers ``{"error": ...}``); ``module:function`` or
``path/to/file.py:function`` is the user's ``f(name, arguments) -> str | dict`` (``arguments``: the
call's arguments object), run in a daemon thread abandoned after ``time_limit`` seconds; anything it
raises, a time-out and a result that is neither a string nor a JSON-able dict become the tool turn's text
``{"error": "..."}``, so a misbehaving executor never stops the run. Executors should be deterministic:
a resumed run replays its rollouts and must see the same results.

Rollout (:func:`roll_out`), for rows of (prompt ids, offered tool names, seed), in rounds 0..max_rounds:
every live row is generated in one batched ``Generation`` (per-row seeds: round 0 uses the sample's seed,
round r > 0 :func:`round_seed`), stopping at ``<|im_end|>``. The ids are parsed by
``core.completion.parse_completion`` with the row's offered names (structure only from control ids, calls
only to offered tools). A turn that ends with ``<|im_end|>`` and holds calls, in a round < max_rounds,
has each call run and the continuation appended: ``"\\n"``, the tool turns rendered by the tokenizer's
chat family (``core.chat_template.render_pieces``, never supervised) and the generation prompt; the row
goes on to the next round. Any other turn ends the row. ``max_new_tokens`` bounds everything after the
prompt (the model's tokens and the tool turns): a row's budget in a round is what is left of it, and a
continuation that leaves no room for a token ends the row as truncated. A row's tokens depend only on
(model, prompt, seed, executor): a row is generated with its own budget, or with a larger one and cut
to its own (the same tokens), and a row whose budget the shared context limit would shorten is generated
alone.

A :class:`Trajectory` holds everything after the prompt (``tokens``), which of them are the model's own
(``learn``: the generated ids and each turn's closing ``<|im_end|>``; tool turns and generation prompts
are context) and the messages the reward functions see: assistant turns (``content``, optional
``reasoning_content`` and ``tool_calls`` in OpenAI's shape) and tool turns (``content``, ``tool_call_id``,
``name``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from core import tools as builtin_tools
from core.chat_template import TEXT, Piece, render_pieces
from core.completion import CONTENT, REASONING, TOOL_CALL, parse_completion
from core.tokenizer import TokenizerInfo, encode_documents
from model.generate import FINISH_LENGTH, Generation
from train.data import splitmix64
from train.rewards import RewardError, load_function

Executor = Callable[[str, str], str]  # (function name, arguments JSON) -> the tool turn's text; never raises
BUILTIN = builtin_tools.BUILTIN_SET


class ToolSpecError(RewardError):
    """A ``--tools`` executor that cannot be loaded: one line naming it."""


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def _message(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # noqa: BLE001  (an exception of the user's whose __str__ raises)
        return "(its message cannot be shown)"


def builtin_executor(time_limit: float) -> Executor:
    """The built-in tools (``core/tools.py``), each call bounded by ``time_limit`` seconds."""
    def run(name: str, arguments: str) -> str:
        return builtin_tools.result_text(name, builtin_tools.execute(name, arguments, time_limit))
    return run


def user_executor(fn: Callable[..., Any], spec: str, time_limit: float) -> Executor:
    """The user's ``fn(name, arguments_object)`` made total: time limit, errors and bad results as text."""
    def run(name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments)
        except ValueError:
            return _error("the arguments are not a JSON object")
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = fn(name, args)
            except BaseException as e:  # noqa: BLE001  (the user's executor: its failure is the call's result)
                box["error"] = f"{name} failed: {type(e).__name__}: {_message(e)}"

        worker = threading.Thread(target=work, name=f"tool-{name}", daemon=True)
        worker.start()
        worker.join(time_limit)
        if worker.is_alive():
            return _error(f"{name} took longer than {time_limit:g} s")
        if "error" in box:
            return _error(box["error"])
        result = box.get("result")
        if isinstance(result, str):
            return result
        if isinstance(result, dict):
            try:
                return json.dumps(result, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError):
                return _error(f"{spec} returned a dict that is not JSON")
        return _error(f"{spec} returned {type(result).__name__}, not a string or a dict")
    return run


def load_executor(spec: str, time_limit: float) -> Executor:
    """``builtin`` or the user's ``module:function`` / ``file.py:function`` as an :data:`Executor`."""
    if spec == BUILTIN:
        return builtin_executor(time_limit)
    if ":" not in spec:
        raise ToolSpecError(f"--tools {spec}: give {BUILTIN} or module:function / path/to/file.py:function")
    try:
        fn = load_function(spec, flag="--tools")
    except RewardError as e:
        raise ToolSpecError(str(e)) from None
    return user_executor(fn, spec, time_limit)


@dataclass(frozen=True)
class ToolConfig:
    """Tool execution in the rollouts: the executor and the number of rounds of calls a rollout may run."""

    executor: Executor
    max_rounds: int


def round_seed(seed: int, round_: int) -> int:
    """The sampling seed of round ``round_`` of a sample seeded ``seed`` (round 0: ``seed`` itself)."""
    if round_ == 0:
        return seed
    return int(splitmix64(np.array([seed], dtype=np.uint64), round_)[0] >> np.uint64(1))


def continuation_ids(tok: TokenizerInfo, tool_turns: list[dict]) -> list[int]:
    """The ids after an assistant turn's ``<|im_end|>``: ``"\\n"``, the tool turns and the generation prompt,
    as the tokenizer's chat family renders them (no default system turn: it is not the conversation's start)."""
    family = replace(tok.chat.family or tok.chat_family, default_system=None)
    pieces = [Piece("\n", TEXT, False), *render_pieces(tool_turns, True, "none", tok.structural_tags,
                                                      family=family)]
    return encode_documents(tok, [pieces]).ids.tolist()


def assistant_message(tok: TokenizerInfo, ids: list[int], names: Sequence[str], round_: int) -> dict:
    """The assistant turn of generated ``ids``: content and reasoning text, calls to offered tools (ids
    ``call_<round>_<n>``); a malformed call block stays in the content."""
    events = parse_completion(tok, ids, tools=names)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(e.text for e in events if e.kind == CONTENT)}
    reasoning = "".join(e.text for e in events if e.kind == REASONING)
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [e.call for e in events if e.kind == TOOL_CALL]
    if calls:
        message["tool_calls"] = [{"id": f"call_{round_}_{n}", "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for n, c in enumerate(calls)]
    return message


@dataclass
class Trajectory:
    """Everything a rollout added after its prompt (module docstring)."""

    tokens: list[int] = field(default_factory=list)
    learn: list[bool] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    truncated: bool = False
    generated: int = 0  # the model's sampled ids (stops not counted)
    rounds: int = 0  # rounds of calls run

    def add(self, ids: list[int], learn: bool) -> None:
        self.tokens += ids
        self.learn += [learn] * len(ids)


@dataclass(frozen=True)
class Sampling:
    """How each round samples: the rollout settings ``Generation`` needs."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    matmul_dtype: Any
    stop_id: int


def _generate(model: nn.Module, contexts: list[list[int]], budgets: list[int], seeds: list[int] | None,
              s: Sampling) -> list[tuple[list[int], bool]]:
    """(ids, cut by the budget) per row, each as if generated alone with its own budget (module docstring)."""
    limit = model.config.max_position_embeddings
    out: list[tuple[list[int], bool] | None] = [None] * len(contexts)
    longest = max(len(c) for c in contexts)
    together = [i for i in range(len(contexts)) if budgets[i] <= limit - longest]
    groups = ([together] if together else []) + [[i] for i in range(len(contexts)) if i not in together]
    for rows in groups:
        gen = Generation(model, [contexts[i] for i in rows], max_new_tokens=max(budgets[i] for i in rows),
                         temperature=s.temperature, top_k=s.top_k, stop_ids=[s.stop_id],
                         seeds=None if seeds is None else [seeds[i] for i in rows], matmul_dtype=s.matmul_dtype)
        for i, ids, reason in zip(rows, gen.run(), gen.finish_reasons, strict=True):
            b = budgets[i]
            stopped = reason != FINISH_LENGTH and len(ids) < b
            out[i] = (ids if stopped else ids[:b], not stopped)
    return [o for o in out if o is not None]


def roll_out(model: nn.Module, tok: TokenizerInfo, prompts: Sequence[Sequence[int]], names: Sequence[Sequence[str]],
             seeds: Sequence[int] | None, sampling: Sampling, tools: ToolConfig) -> list[Trajectory]:
    """Multi-turn rollouts of ``prompts`` (module docstring); ``seeds`` None: greedy."""
    n = len(prompts)
    out = [Trajectory() for _ in range(n)]
    contexts = [list(p) for p in prompts]
    live = list(range(n))
    for round_ in range(tools.max_rounds + 1):
        if not live:
            break
        budgets = [sampling.max_new_tokens - len(out[i].tokens) for i in live]
        round_seeds = None if seeds is None else [round_seed(seeds[i], round_) for i in live]
        generated = _generate(model, [contexts[i] for i in live], budgets, round_seeds, sampling)
        still = []
        for i, (ids, cut) in zip(live, generated, strict=True):
            t = out[i]
            t.generated += len(ids)
            t.add(ids + ([] if cut else [sampling.stop_id]), True)
            message = assistant_message(tok, ids, names[i], round_)
            t.messages.append(message)
            calls = message.get("tool_calls")
            if cut:
                t.truncated = True
            elif calls and round_ < tools.max_rounds:
                turns = [{"role": "tool", "content": tools.executor(c["function"]["name"], c["function"]["arguments"]),
                          "tool_call_id": c["id"], "name": c["function"]["name"]} for c in calls]
                more = continuation_ids(tok, turns)
                if len(t.tokens) + len(more) >= sampling.max_new_tokens or len(prompts[i]) + len(t.tokens) \
                        + len(more) >= model.config.max_position_embeddings:
                    t.truncated = True  # no room left to answer the tool results
                    continue
                t.add(more, False)
                t.messages += turns
                t.rounds += 1
                contexts[i] = list(prompts[i]) + t.tokens
                still.append(i)
        live = still
    return out
