"""bin/eval --tool-eval (serve/tool_eval.py): multi-round tool use scored on a scripted model (every branch:
no call, malformed call, wrong tool, wrong arguments, right answer, the round limit), the same evaluation
through --api-base against bin/serve, and bad input (one line, exit 1, nothing appended)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from scripted import TOKENIZER, ScriptedLM, scripted_checkpoint
from test_serve import Server, free_port

from core.tokenizer import load_tokenizer, prompt_ids
from model import ModelConfig
from model.transformer import ModelOutput
from serve.tool_eval import LocalModel, ToolEvalOptions, read_cases, run_dialogues, score, tool_eval
from train.loading import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
MINIMIND = ROOT / "tests" / "fixtures" / "minimind" / "minimind3"


def call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# first matching needle in the prompt wins: results of the tools first, then each record's question
SCRIPTS = [
    ('"result": "5888"', "128 × 46 = 5888."),
    ('"result": "43"', "It is 43."),
    ("2025-03-07 14:30:00", "I do not know."),
    ("R: what", call("calculate_math", {"expression": "128*46"})),  # right tool, right arguments, answered
    ("A: what", call("calculate_math", {"expression": "12+31"})),  # wrong arguments
    ("W: what", call("get_current_time", {})),  # an offered tool, but not the one the gt implies
    ("M: what", '<tool_call>\n{"name": "calculate_math", "arguments": {2+2}}\n</tool_call>'),  # malformed
    ("N: say", "Hello there."),  # no call
    ("L: keep", call("calculate_math", {"expression": "1"})),  # calls at every round
]
RECORDS = [
    {"prompt": "R: what is 128 times 46?", "gt": ["5888"]},
    {"prompt": "A: what is 12 plus 30?", "gt": [42]},
    {"prompt": "W: what is 7 times 6?", "gt": ["42"]},
    {"prompt": "M: what is 2+2?", "gt": "4"},
    {"prompt": "N: say hello", "gt": ["hello"]},
    {"prompt": "L: keep calling", "gt": ["1"]},
]
TWO_TOOLS = ["calculate_math", "get_current_time"]


class RowScriptedLM(ScriptedLM):
    """ScriptedLM for batches: each row plays the script its own prompt selects."""

    def __init__(self, info, scripts) -> None:
        super().__init__(info, scripts)
        self.config = ModelConfig.from_preset("tiny", max_position_embeddings=4096)
        self.rows: list[list[int]] = []
        self.batches: list[int] = []

    def forward(self, input_ids, cache, **_) -> ModelOutput:
        b, t = input_ids.shape
        if cache.length == 0:
            self.rows = []
            for row in input_ids.tolist():
                self._start(row)
                self.rows.append(self.script)
            self.prompt_len = t
            self.batches.append(b)
        step = cache.length + t - self.prompt_len
        cache.length += t
        logits = torch.zeros(b, 1, self.config.vocab_size)
        for i, script in enumerate(self.rows):
            logits[i, -1, script[step] if step < len(script) else self.end] = 1.0
        return ModelOutput(logits, torch.zeros(()))


@pytest.fixture(scope="module")
def info():
    return load_tokenizer(TOKENIZER)


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def local(info, batch_size: int = 8, scripts: list[tuple[str, str]] = SCRIPTS) -> LocalModel:
    model = RowScriptedLM(info, scripts)
    return LocalModel(LoadedModel(model, info, SimpleNamespace(path="scripted", step=1, stage="sft")),
                      torch.device("cpu"), max_new_tokens=64, batch_size=batch_size)


EXPECTED = {"cases": 6, "answered": 2, "no_call": 1, "unfinished": 1, "tool_rounds": 6, "calls": 8,
            "well_formed": 7, "right_tool": 6, "right_arguments": 5}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_branch_scored(tmp_path, info, batch_size):
    cases = read_cases(write(tmp_path / "cases.jsonl", RECORDS), TWO_TOOLS)
    responder = local(info, batch_size)
    results = run_dialogues(cases, responder, max_rounds=3)
    metrics = score(results)
    assert {k: metrics[k] for k in EXPECTED} == EXPECTED
    assert metrics["accuracy"] == pytest.approx(2 / 6) and metrics["right_tool_rate"] == pytest.approx(6 / 8)
    by_prompt = {r.case.turns[-1]["content"][:1]: r for r in results}
    right, args, wrong, malformed, none, loop = (by_prompt[k] for k in "RAWMNL")
    assert right.answered and right.final == "128 × 46 = 5888." and (right.right_tool, right.right_arguments) == (1, 1)
    assert right.turns[1] == {"role": "tool", "content": '{"result": "5888"}', "tool_call_id": "call_0",
                              "name": "calculate_math"}
    assert not args.answered and args.final == "It is 43." and (args.right_tool, args.right_arguments) == (1, 0)
    assert not wrong.answered and (wrong.well_formed, wrong.right_tool) == (1, 0)
    assert (malformed.calls, malformed.well_formed, malformed.rounds, malformed.answered) == (1, 0, 0, False)
    assert none.answered and none.calls == 0 and none.rounds == 0
    assert loop.unfinished and not loop.answered and loop.final == "" and (loop.rounds, loop.calls) == (3, 4)
    # the second round's prompt is the template's rendering of the whole history, with the offered tools
    model = responder.loaded.model
    expected = prompt_ids(info, right.case.turns + right.turns[:2], tools=right.case.tools)
    assert any(p[len(p) - len(expected):] == expected and not any(p[:len(p) - len(expected)])  # left pad: id 0
               for p in model.prompts)
    live = [6, 4, 1, 1]  # round 0: all six; round 1: R, A, W, L; then L alone
    assert model.batches == ([1] * sum(live) if batch_size == 1 else [4, 2, 4, 1, 1])


def test_round_limit_is_a_flag(tmp_path, info):
    cases = read_cases(write(tmp_path / "loop.jsonl", RECORDS[-1:]), TWO_TOOLS)
    (one,) = run_dialogues(cases, local(info), max_rounds=1)
    assert one.unfinished and (one.rounds, one.calls, one.right_arguments) == (1, 2, 2)


def test_a_call_to_a_tool_not_offered_is_malformed_and_not_run(tmp_path, info):
    cases = read_cases(write(tmp_path / "x.jsonl", [{"prompt": "X: run ls", "gt": ["ok"]}]), TWO_TOOLS)
    (x,) = run_dialogues(cases, local(info, scripts=[("X: run", call("shell", {"cmd": "ls"}))]))
    assert (x.calls, x.well_formed, x.rounds, x.answered) == (1, 0, 0, False)
    assert x.final.startswith("<tool_call>") and [t["role"] for t in x.turns] == ["assistant"]


def test_a_prompt_beyond_the_context_leaves_the_case_unfinished(tmp_path, info):
    responder = local(info)
    responder.loaded.model.config.max_position_embeddings = 16
    cases = read_cases(write(tmp_path / "c.jsonl", RECORDS[:2]), TWO_TOOLS)
    assert all(r.unfinished and not r.answered and r.calls == 0 for r in run_dialogues(cases, responder))
    assert responder.loaded.model.prompts == []  # nothing was generated


def test_gt_implies_the_tool_and_expected_tools_overrides(tmp_path):
    path = write(tmp_path / "cases.jsonl", [
        {"prompt": "a", "gt": ["5888"]},  # numbers with calculate_math offered: calculate_math
        {"prompt": "b", "gt": ["上海"]},  # not a number: any offered tool
        {"prompt": "c", "gt": [721], "expected_tools": ["get_current_time", "calculate_math"]}])
    a, b, c = read_cases(path, TWO_TOOLS)
    assert a.expected == {"calculate_math"} and b.expected is None
    assert c.expected == {"get_current_time", "calculate_math"}
    assert [t["function"]["name"] for t in a.tools] == TWO_TOOLS


def test_minimind_agent_rl_files_are_read():
    """MiniMind's agent_rl records: tools as a JSON string on the system turn, the empty final placeholder."""
    cases = read_cases(MINIMIND / "agent_rl.jsonl") + read_cases(MINIMIND / "agent_rl_math.jsonl")
    first = cases[0]
    assert first.turns == [{"role": "system", "content": "你是一个会使用工具的助手，需要时请调用工具。"},
                           {"role": "user", "content": "帮我算一下 128 乘以 46"}]
    assert first.names == ("calculate_math", "get_current_time") and first.gt == ["5888"]
    assert all(c.gt for c in cases) and any(c.gt == ["125"] for c in cases)  # a numeric gt is read as text


# ---- bin/eval ------------------------------------------------------------------------------------------

@pytest.fixture
def bin_eval(monkeypatch, capsys, info):
    """``run(*args, model=None) -> (exit code, stdout, stderr)``: bin/eval's main() in this process; --ckpt
    scripted loads a RowScriptedLM."""
    monkeypatch.setitem(sys.modules, "_bootstrap", ModuleType("_bootstrap"))
    loader = importlib.machinery.SourceFileLoader("bin_eval", str(ROOT / "bin" / "eval"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bin_eval", loader))
    loader.exec_module(module)
    import train.loading

    def load(ckpt, *rest, **kwargs):
        if ckpt != "scripted":
            return real(ckpt, *rest, **kwargs)
        return LoadedModel(RowScriptedLM(info, SCRIPTS), info, SimpleNamespace(path="scripted", step=7, stage="sft"))

    real = train.loading.load_model
    monkeypatch.setattr(train.loading, "load_model", load)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = module.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_bin_eval_prints_the_table_and_appends(tmp_path, bin_eval):
    cases = write(tmp_path / "cases.jsonl", [{**r, "tools": TWO_TOOLS_SCHEMA} for r in RECORDS])
    results, answers = tmp_path / "out" / "eval_results.jsonl", tmp_path / "answers.jsonl"
    code, out, err = bin_eval("--ckpt", "scripted", "--tool-eval", str(cases), "--results", str(results),
                              "--answers", str(answers))
    assert code == 0, err
    assert "answered (final answer holds the gt)" in out and "right arguments" in out and "62.5%" in out
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["kind"] == "tool-eval" and record["ckpt"] == "scripted" and record["step"] == 7
    assert record["max_tool_rounds"] == 3 and {k: record["metrics"][k] for k in EXPECTED} == EXPECTED
    details = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [d["answered"] for d in details] == [True, False, False, False, True, False]


def test_bin_eval_offers_the_tools_flag_to_records_without_tools(tmp_path, bin_eval):
    cases = write(tmp_path / "cases.jsonl", RECORDS[:1])
    code, out, err = bin_eval("--ckpt", "scripted", "--tool-eval", str(cases), "--results", str(tmp_path / "r.jsonl"),
                              "--tools", "calculate_math", "--max-tool-rounds", "1", "--quiet")
    record = json.loads(out)
    assert code == 0 and record["metrics"]["answered"] == 1 and record["max_tool_rounds"] == 1
    code, out, err = bin_eval("--ckpt", "scripted", "--tool-eval", str(cases), "--tools", "shell")
    assert code == 1 and err.count("\n") == 1 and "unknown tool(s) shell" in err


TWO_TOOLS_SCHEMA = [{"name": "calculate_math", "description": "calculator",  # MiniMind's flat shape
                     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                    "required": ["expression"]}},
                    {"type": "function", "function": {"name": "get_current_time", "parameters": {}}}]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "hi"}, ":2: field 'gt': missing"),
    ({"prompt": "hi", "gt": []}, ":2: field 'gt': missing"),
    ({"prompt": "hi", "gt": [None]}, ":2: field 'gt[0]': expected a string or a finite number"),
    ({"prompt": "hi", "gt": ["1"], "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     ":2: field 'tools[0].function.name'"),
    ({"prompt": "hi", "gt": ["1"], "tools": "[{not json"}, ":2: field 'tools'"),
    ({"prompt": "hi", "gt": ["1"], "expected_tools": ["shell"]}, ":2: field 'expected_tools': shell not among"),
])
def test_bad_records_are_one_line_and_nothing_is_appended(tmp_path, bin_eval, record, message):
    cases = write(tmp_path / "cases.jsonl", [RECORDS[0], record])
    results = tmp_path / "results.jsonl"
    code, out, err = bin_eval("--ckpt", "scripted", "--tool-eval", str(cases), "--results", str(results))
    assert code == 1 and err.count("\n") == 1 and err.startswith("bin/eval: error: ") and message in err, err
    assert str(cases) in err and not results.exists()


def test_unreachable_api_base_is_one_line(tmp_path, bin_eval):
    cases = write(tmp_path / "cases.jsonl", RECORDS[:1])
    results = tmp_path / "results.jsonl"
    base = f"http://127.0.0.1:{free_port()}/v1"
    code, out, err = bin_eval("--api-base", base, "--tool-eval", str(cases), "--results", str(results))
    assert code == 1 and err.count("\n") == 1 and f"--api-base {base}: no answer" in err, err
    assert not results.exists()


def test_flags_that_do_not_go_together(tmp_path, bin_eval):
    cases = str(write(tmp_path / "cases.jsonl", RECORDS[:1]))
    for args in (["--api-base", "http://x/v1", "--ckpt", "scripted", "--tool-eval", cases],
                 ["--tool-eval", cases], ["--api-base", "http://x/v1", "--data", cases]):
        with pytest.raises(SystemExit) as e:
            bin_eval(*args)
        assert e.value.code == 2


# ---- --api-base against servers ------------------------------------------------------------------------

def test_api_base_against_bin_serve_matches_the_local_evaluation(tmp_path, bin_eval):
    """A real bin/serve on 127.0.0.1 serving a scripted checkpoint (its answer to any prompt is fixed): the
    evaluation through the openai client gives the numbers the local evaluation gives."""
    ckpt = scripted_checkpoint(tmp_path / "scripted")
    cases = write(tmp_path / "cases.jsonl", [{"prompt": "hi", "gt": ["你好"]}, {"prompt": "2+2?", "gt": [4]},
                                             {"prompt": "weather?", "gt": ["hello", "世界"]}])
    server = Server(ckpt).wait()
    try:
        code, out, err = bin_eval("--api-base", f"{server.base}/v1", "--tool-eval", str(cases), "--results",
                                  str(tmp_path / "api.jsonl"), "--quiet")
    finally:
        server.stop()
    assert code == 0, err
    api = json.loads(out)
    code, out, err = bin_eval("--ckpt", str(ckpt), "--tool-eval", str(cases), "--results",
                              str(tmp_path / "local.jsonl"), "--quiet")
    assert code == 0, err
    assert api["metrics"] == json.loads(out)["metrics"]
    assert api["metrics"]["answered"] == 2 and api["metrics"]["no_call"] == 3
    assert api["api_base"] == f"{server.base}/v1" and api["kind"] == "tool-eval"
    assert [json.loads(line)["kind"] for line in (tmp_path / "api.jsonl").read_text().splitlines()] == ["tool-eval"]


def test_api_base_runs_calls_like_the_local_evaluation(tmp_path, info):
    """tinylm's server with the scripted model: parsed calls come back as tool_calls, are run here and their
    results sent back; every count equals the local evaluation's."""
    pytest.importorskip("uvicorn")
    from test_serve_tools import InProcessServer

    from serve.tool_eval import ApiModel

    server = InProcessServer(SCRIPTS)
    try:
        responder = ApiModel(f"http://127.0.0.1:{server.port}/v1", "x", "test-key", max_tokens=64)
        record = tool_eval(responder, ToolEvalOptions(str(write(tmp_path / "c.jsonl", RECORDS)), 3,
                                                      tuple(TWO_TOOLS)), {"api_base": "in-process"})
    finally:
        server.stop()
    assert {k: record["metrics"][k] for k in EXPECTED} == EXPECTED
