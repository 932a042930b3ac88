"""Tool-use evaluation (``bin/eval --tool-eval FILE``): multi-round tool calls scored against a ground truth.

Records (``preprocess/prompts.py``'s prompt records, checked by ``core/chat_schema.py``): a ``prompt`` or
``conversations`` ending with a user turn (MiniMind's empty final assistant placeholder is dropped), the
offered ``tools`` (on the record or its system turn; OpenAI's wrapped schemas or MiniMind's flat ones, as a
list or a JSON string; none: the ``--tools`` set, default ``builtin``) and ``gt``, the ground truth: a
non-empty list of strings / numbers (one value is taken as a list of one), as in MiniMind's ``agent_rl``
files; optional ``expected_tools``, the names of the offered tools the answer needs.

The dialogue (a :class:`Responder` answers one round for many conversations): the model answers; each call
it makes is run by the built-in tools (``core/tools.py``; an offered tool that is not built in answers
``{"error": ...}``) and its result goes back as a tool turn; this repeats until an answer has no call or
``max_rounds`` rounds of calls were run (a further call leaves the case *unfinished*: no final answer, as
MiniMind's agent RL scores it). :class:`LocalModel` answers as bin/serve does: the prompt is rendered by
the tokenizer's chat family with the offered tools (``core.tokenizer.prompt_ids``), the batch is
generated together (``model.generate.Generation``, per-row seeds) and the ids are parsed by
``core.completion.parse_completion`` with the offered names. :class:`ApiModel` asks any OpenAI-compatible
server through the ``openai`` client.

Scores (:func:`score`):
- ``answered``: every gt value is in the final answer (MiniMind's ``validate_gt_in_text``: a
  case-insensitive substring, or for a numeric gt any number in the text within 1e-6);
- ``calls``: call attempts: parsed calls plus ``<tool_call>`` blocks left in the answer's text;
- ``well_formed``: parsed calls (a JSON object naming an offered function with an arguments object); a
  block left as text (bad JSON, a function not offered, never closed) is malformed and not run;
- ``right_tool``: well-formed calls to a tool the gt implies: ``expected_tools`` when the record has it;
  else ``calculate_math`` / ``calculator`` when one is offered and every gt value is a number (an arithmetic
  record); else (unknown) any offered tool;
- ``right_arguments``: right-tool calls whose arguments are correct: a calculator's ``expression``
  evaluates (``core/calculator.py``) to a numeric gt (when the gt holds no number: to any value); another
  tool's required parameters are all given and non-empty;
- ``no_call`` (cases without any call attempt), ``unfinished`` (still calling after ``max_rounds`` rounds,
  or the conversation outgrew the model's context: no final answer), ``tool_rounds`` (rounds of calls run).
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core import ground_truth
from core import tools as builtin_tools
from core.calculator import CalculatorError, evaluate
from core.chat_schema import RECORD_SHAPES, SchemaError, parse_tools, present
from core.completion import CALL_OPEN, CONTENT, REASONING, TOOL_CALL, ToolCall, parse_completion, parse_json_object
from core.files import atomic_write_text, check_file_target
from core.tokenizer import prompt_ids
from model.generate import Generation
from preprocess.prompts import TOOLS, read_prompts
from preprocess.records import RecordError
from serve.source_args import ToolError
from train.loading import LoadedModel

KIND = "tool-eval"
MAX_TOOL_ROUNDS = 3
CALCULATORS = ("calculate_math", "calculator")
GT, EXPECTED = "gt", "expected_tools"
METRICS = ("cases", "answered", "no_call", "unfinished", "tool_rounds", "calls", "well_formed", "right_tool",
           "right_arguments")


@dataclass(frozen=True)
class ToolCase:
    """One record: the turns shown (no tools on them), the offered tools (OpenAI's wrapped shape), the gt."""

    index: int
    source: str
    line: int
    turns: list[dict]
    tools: list[dict]
    gt: list[str]
    expected: frozenset[str] | None  # the tools the gt implies; None: any offered tool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)


@dataclass(frozen=True)
class Reply:
    """One answer: its text, reasoning, parsed calls (with their ids) and whether the context ran out."""

    content: str
    reasoning: str = ""
    calls: tuple[tuple[str, ToolCall], ...] = ()
    malformed: int = 0
    overflow: bool = False


class Responder(Protocol):
    def reply(self, batch: Sequence[tuple[ToolCase, list[dict], int]]) -> list[Reply]:
        """The answers to ``(case, turns so far, round)`` items, in order."""
        ...


# ---- records -------------------------------------------------------------------------------------------

def _wrapped(tool: dict) -> dict:
    """An offered definition in OpenAI's wrapped shape (a flat MiniMind one is wrapped)."""
    if "function" in tool:
        return {"type": "function", "function": dict(tool["function"])}
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                             if tool.get(k) is not None}}


def _gt(value: object) -> list[str]:
    try:
        return ground_truth.values(value, GT)
    except ground_truth.GroundTruthError as e:
        raise RecordError("bad_gt", e.message, e.field) from None


is_number = ground_truth.is_number


def _expected(value: object, names: tuple[str, ...], gt: list[str]) -> frozenset[str] | None:
    if value is None:
        implied = [n for n in CALCULATORS if n in names]
        return frozenset(implied) if implied and all(is_number(g) for g in gt) else None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RecordError("bad_expected_tools", "expected a non-empty list of tool names", EXPECTED)
    missing = [v for v in value if v not in names]
    if missing:
        raise RecordError("bad_expected_tools", f"{', '.join(missing)} not among the offered tools "
                          f"({', '.join(names)})", EXPECTED)
    return frozenset(value)


def read_cases(path: str | Path, default_tools: Sequence[str] = builtin_tools.BUILTIN) -> list[ToolCase]:
    """The records of ``path`` as cases; the first bad record is one line naming ``file:line: field``."""
    cases = []
    for prompt in read_prompts(path):
        try:
            turns = [dict(t) for t in prompt.turns]
            listed = turns[0].pop("tools", None) if turns[0]["role"] == "system" else None
            if present(prompt.columns.get(TOOLS)):  # the shorthand {"prompt", "tools"}: a column, checked here
                try:
                    listed = parse_tools(prompt.columns[TOOLS], TOOLS, RECORD_SHAPES)
                except SchemaError as e:
                    raise RecordError.of(e) from None
            if turns[0]["role"] == "system" and not turns[0]["content"]:
                turns = turns[1:]  # the empty system turn that only carried the tools
            offered = [_wrapped(t) for t in listed] if listed else builtin_tools.tools_schema(default_tools)
            if turns[-1]["role"] != "user":
                raise RecordError("bad_role_order", "a tool-eval prompt ends with a user turn", "conversations")
            if not present(prompt.columns.get(GT)):
                raise RecordError("missing_field", "missing: the ground truth (a list of strings or numbers)", GT)
            gt = _gt(prompt.columns[GT])
            names = tuple(t["function"]["name"] for t in offered)
            cases.append(ToolCase(len(cases), prompt.source, prompt.line, turns, offered, gt,
                                  _expected(prompt.columns.get(EXPECTED), names, gt)))
        except RecordError as e:
            e.path, e.line = prompt.source, prompt.line or None
            raise
    if not cases:
        raise ToolError(f"{path}: no tool-eval records")
    return cases


# ---- answering -----------------------------------------------------------------------------------------

def reply_of(events: list) -> Reply:
    """The reply of a parsed completion: content, reasoning, calls (ids call_0, call_1, ...), malformed blocks."""
    content = "".join(e.text for e in events if e.kind == CONTENT)
    reasoning = "".join(e.text for e in events if e.kind == REASONING)
    calls = tuple((f"call_{i}", e.call) for i, e in enumerate(e for e in events if e.kind == TOOL_CALL))
    return Reply(content, reasoning, calls, content.count(CALL_OPEN))


@dataclass
class LocalModel:
    """A loaded checkpoint answering as bin/serve does (template, batched generation, parser from ids)."""

    loaded: LoadedModel
    device: torch.device
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8

    def reply(self, batch: Sequence[tuple[ToolCase, list[dict], int]]) -> list[Reply]:
        info, model = self.loaded.tokenizer, self.loaded.model.to(self.device)
        context = self.loaded.config.max_position_embeddings
        prompts = [prompt_ids(info, turns, tools=case.tools) for case, turns, _ in batch]
        replies: list[Reply | None] = [Reply("", overflow=True) if len(p) >= context else None for p in prompts]
        todo = [i for i, r in enumerate(replies) if r is None]
        # a batch's answer budget is set by its longest prompt: a row whose full answer would not fit beside
        # the others runs alone, so that no row's answer depends on the batch it landed in
        fits = [i for i in todo if len(prompts[i]) + self.max_new_tokens <= context]
        groups = [fits[lo:lo + self.batch_size] for lo in range(0, len(fits), self.batch_size)]
        for rows in groups + [[i] for i in todo if i not in fits]:
            seeds = [(self.seed * 1_000_003 + batch[i][0].index * 31 + batch[i][2]) % 2 ** 62 for i in rows]
            gen = Generation(model, [prompts[i] for i in rows], max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature, stop_ids=self.loaded.stop_ids,
                             seeds=seeds if self.temperature > 0 else None)
            for i, ids in zip(rows, gen.run(), strict=True):
                replies[i] = reply_of(parse_completion(info, ids, tools=batch[i][0].names))
        return [r for r in replies if r is not None]


class ApiModel:
    """An OpenAI-compatible server asked through the ``openai`` client (one request per conversation)."""

    def __init__(self, base: str, model: str, api_key: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, timeout: float = 120.0) -> None:
        try:
            import openai
        except ImportError:
            raise ToolError("--api-base needs the openai package: .venv/bin/pip install openai") from None
        self.openai, self.base, self.model = openai, base, model
        self.max_tokens, self.temperature = max_tokens, temperature
        self.client = openai.OpenAI(base_url=base, api_key=api_key or "none", max_retries=0, timeout=timeout)

    def reply(self, batch: Sequence[tuple[ToolCase, list[dict], int]]) -> list[Reply]:
        return [self._one(case, turns) for case, turns, _ in batch]

    def _one(self, case: ToolCase, turns: list[dict]) -> Reply:
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[_api_turn(t) for t in turns], tools=case.tools,
                max_tokens=self.max_tokens, temperature=self.temperature)
        except self.openai.APIConnectionError as e:
            raise ToolError(f"--api-base {self.base}: no answer ({e})") from None
        except self.openai.APIStatusError as e:
            raise ToolError(f"--api-base {self.base}: the server refused {case.source}:{case.line} with HTTP "
                            f"{e.status_code}: {_first_line(e.message)}") from None
        if not response.choices:
            raise ToolError(f"--api-base {self.base}: an answer without choices")
        message = response.choices[0].message
        content = message.content or ""
        calls, malformed = [], content.count(CALL_OPEN)
        for i, tc in enumerate(message.tool_calls or ()):
            function = getattr(tc, "function", None)
            arguments = parse_json_object(function.arguments or "{}") if function is not None else None
            if function is None or function.name not in case.names or arguments is None:
                malformed += 1  # a function that was not offered, or arguments that are not an object
                continue
            calls.append((tc.id or f"call_{i}", ToolCall(function.name, json.dumps(arguments, ensure_ascii=False))))
        reasoning = getattr(message, "reasoning_content", None) or ""
        return Reply(content, reasoning if isinstance(reasoning, str) else "", tuple(calls), malformed)


def _first_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


def _api_turn(turn: dict) -> dict:
    """A turn on the wire: tool-call arguments as JSON text, a tool turn without its ``name``."""
    out = {k: v for k, v in turn.items() if not (turn["role"] == "tool" and k == "name")}
    if "tool_calls" in turn:
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": c["function"]["arguments"]
                                                if isinstance(c["function"]["arguments"], str)
                                                else json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                             for c in turn["tool_calls"]]
    return out


# ---- the dialogue and its score ------------------------------------------------------------------------

@dataclass
class CaseResult:
    case: ToolCase
    turns: list[dict] = field(default_factory=list)  # what the model said and the tools answered
    final: str = ""
    unfinished: bool = False
    rounds: int = 0
    calls: int = 0
    well_formed: int = 0
    right_tool: int = 0
    right_arguments: int = 0
    answered: bool = False


def _numbers(gt: list[str]) -> list[float]:
    return [float(g.replace(",", "")) for g in gt if is_number(g)]


def gt_found(text: str, gt: list[str]) -> set[str]:
    """The gt values found in ``text`` (MiniMind's ``validate_gt_in_text``)."""
    return ground_truth.found(text, gt)


def arguments_correct(call: ToolCall, case: ToolCase) -> bool:
    """A calculator's expression evaluates to a numeric gt (any value when the gt has no number); another
    tool's required parameters are all given and non-empty."""
    arguments = parse_json_object(call.arguments) or {}
    if call.name in CALCULATORS:
        try:
            value = evaluate(str(arguments.get("expression", "")))
        except CalculatorError:
            return False
        targets = _numbers(case.gt)
        return not targets or any(abs(value - t) <= 1e-6 * max(1.0, abs(t)) for t in targets)
    schema = next(t["function"] for t in case.tools if t["function"]["name"] == call.name)
    required = (schema.get("parameters") or {}).get("required") or []
    return all(present(arguments.get(k)) for k in required)


def _take(result: CaseResult, reply: Reply, last: bool) -> bool:
    """Score ``reply`` into ``result`` and extend its turns; True when the case goes on to another round."""
    case = result.case
    result.calls += len(reply.calls) + reply.malformed
    result.well_formed += len(reply.calls)
    for _, call in reply.calls:
        if case.expected is None or call.name in case.expected:
            result.right_tool += 1
            result.right_arguments += arguments_correct(call, case)
    turn: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        turn["reasoning_content"] = reply.reasoning
    if reply.calls:
        turn["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                              for cid, c in reply.calls]
    result.turns.append(turn)
    if reply.overflow or (reply.calls and last):
        result.unfinished = True
        return False
    if not reply.calls:
        result.final = reply.content
        result.answered = gt_found(reply.content, case.gt) == set(case.gt)
        return False
    for cid, call in reply.calls:
        text = builtin_tools.run_call(call.name, call.arguments)
        result.turns.append({"role": "tool", "content": text, "tool_call_id": cid, "name": call.name})
    result.rounds += 1
    return True


def run_dialogues(cases: Sequence[ToolCase], responder: Responder, max_rounds: int = MAX_TOOL_ROUNDS,
                  progress: Any = None) -> list[CaseResult]:
    """Every case answered, its calls run, up to ``max_rounds`` rounds; all live cases go in one batch per
    round."""
    results = [CaseResult(c) for c in cases]
    live = list(results)
    for round_ in range(max_rounds + 1):
        if not live:
            break
        replies = responder.reply([(r.case, r.case.turns + r.turns, round_) for r in live])
        live = [r for r, reply in zip(live, replies, strict=True) if _take(r, reply, round_ == max_rounds)]
        if progress is not None:
            progress(round_, len(live))
    return results


def score(results: Sequence[CaseResult]) -> dict[str, float | int]:
    """The counts of the module docstring and their rates (``accuracy`` = answered / cases; call rates per
    call attempt)."""
    n = len(results)
    sums = {"cases": n, "answered": sum(r.answered for r in results),
            "no_call": sum(r.calls == 0 for r in results), "unfinished": sum(r.unfinished for r in results),
            "tool_rounds": sum(r.rounds for r in results), "calls": sum(r.calls for r in results),
            "well_formed": sum(r.well_formed for r in results), "right_tool": sum(r.right_tool for r in results),
            "right_arguments": sum(r.right_arguments for r in results)}
    calls = sums["calls"]
    return {**sums, "accuracy": sums["answered"] / n if n else 0.0,
            **{f"{k}_rate": sums[k] / calls if calls else 0.0
               for k in ("well_formed", "right_tool", "right_arguments")}}


def table(metrics: dict[str, float | int]) -> str:
    """The metrics as a two-column text table: count, and the rate where there is one."""
    rows = [("answered (final answer holds the gt)", metrics["answered"], metrics["accuracy"]),
            ("no call", metrics["no_call"], None),
            ("unfinished (round limit or context)", metrics["unfinished"], None),
            ("tool rounds run", metrics["tool_rounds"], None), ("call attempts", metrics["calls"], None),
            *((name, metrics[key], metrics[f"{key}_rate"] if metrics["calls"] else None)  # rates per attempt
              for name, key in (("well-formed calls", "well_formed"), ("right tool", "right_tool"),
                                ("right arguments", "right_arguments")))]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'cases':<{width}}  {metrics['cases']:>6}"]
    lines += [f"  {name:<{width}}  {count:>6}" + (f"  {rate:7.1%}" if rate is not None else "")
              for name, count, rate in rows]
    return "\n".join(lines)


# ---- the whole evaluation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolEvalOptions:
    file: str
    max_rounds: int = MAX_TOOL_ROUNDS
    tools: tuple[str, ...] = builtin_tools.BUILTIN  # offered when a record lists none
    details: Path | None = None  # per-case JSONL (the dialogue and its scores)


def tool_eval(responder: Responder, opts: ToolEvalOptions, about: dict[str, Any], progress: Any = None,
              cases: list[ToolCase] | None = None) -> dict[str, Any]:
    """Read the cases (unless given), run the dialogues, score them; returns the results record (``about``
    names the model: ``ckpt`` / ``step`` or ``api_base`` / ``model``). The caller appends it. Bad records, an
    unreachable server or an unwritable ``details`` fail before anything is written."""
    if not 1 <= opts.max_rounds <= 100:
        raise ToolError(f"--max-tool-rounds {opts.max_rounds}: must be in [1, 100]")
    cases = read_cases(opts.file, opts.tools) if cases is None else cases
    if opts.details is not None:
        check_file_target(opts.details, "answers file")
    started = time.perf_counter()
    results = run_dialogues(cases, responder, opts.max_rounds, progress)
    if opts.details is not None:
        atomic_write_text(opts.details, "".join(json.dumps(_detail(r), ensure_ascii=False) + "\n" for r in results))
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **about,
            "kind": KIND, "tool_eval": str(opts.file), "max_tool_rounds": opts.max_rounds,
            "metrics": score(results), "tool_eval_seconds": round(time.perf_counter() - started, 3),
            **({"answers": str(opts.details)} if opts.details is not None else {})}


def _detail(r: CaseResult) -> dict[str, Any]:
    return {"line": r.case.line, "conversations": r.case.turns + r.turns, "gt": r.case.gt, "final": r.final,
            "answered": r.answered, "unfinished": r.unfinished, "rounds": r.rounds, "calls": r.calls,
            "well_formed": r.well_formed, "right_tool": r.right_tool, "right_arguments": r.right_arguments}


def run_from_args(args: Any) -> int:
    """``bin/eval --tool-eval``: the evaluation of ``--ckpt`` (loaded here) or of the server at ``--api-base``;
    prints the table and appends the record to ``--results`` (default for a checkpoint: its run folder's
    eval_results.jsonl; for a server only when given). TinyLMError: one line, nothing appended."""
    from serve.evaluate import RESULTS_FILE, append_result, resolve_device
    from serve.source_args import source_options
    from train.loading import load_model

    opts = ToolEvalOptions(args.tool_eval, args.max_tool_rounds, tuple(builtin_tools.tool_names(args.tools)),
                           args.answers)
    cases = read_cases(opts.file, opts.tools)  # a bad record fails before a model is loaded or a server asked
    temperature = args.temperature or 0.0
    responder: Responder
    if args.api_base:
        name = args.api_model or args.model or "tinylm"  # no checkpoint is loaded: --model names the server's
        responder = ApiModel(args.api_base, name, args.api_key, args.max_new_tokens, temperature)
        about: dict[str, Any] = {"api_base": args.api_base, "model": name}
        results = args.results
    else:
        device = resolve_device(args.device)
        loaded = load_model(args.ckpt, options=source_options(args.model, args.model_arg, args.tokenizer))
        loaded.tokenizer.require_chat("bin/eval --tool-eval")
        responder = LocalModel(loaded, device, args.max_new_tokens, temperature, args.seed or 0, args.batch_size)
        about = {"ckpt": loaded.checkpoint.path, "step": loaded.checkpoint.step,
                 "ckpt_stage": loaded.checkpoint.stage}
        results = args.results or loaded.run_folder / RESULTS_FILE
    if results is not None:
        check_file_target(results, "results file")
    say = (lambda *a: None) if args.quiet else print
    record = tool_eval(responder, opts, about, progress=lambda r, live: say(f"  round {r}: {live} still calling"),
                       cases=cases)
    if results is not None:
        append_result(results, record)
    if args.quiet:
        print(json.dumps(record, ensure_ascii=False))
        return 0
    print(f"{about.get('ckpt') or about['api_base']}: tool use on {opts.file} (at most {opts.max_rounds} rounds)")
    print(table(record["metrics"]))
    print(f"  appended to {results}" if results is not None else "  not appended (give --results FILE)")
    return 0
