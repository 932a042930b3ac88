"""Tools in the RL rollouts (train/agentic.py, --tools): the multi-turn rollout and its loss mask, tool results
as context, executors that raise or hang, the tool rewards, bad specs in one line, exact resume."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from scripted import ScriptedLM

from core import tools as builtin_tools
from core.tokenizer import encode_chat, load_tokenizer, prompt_ids
from model import ModelConfig, TinyLM
from train.agentic import (
    Sampling,
    ToolConfig,
    ToolSpecError,
    builtin_executor,
    load_executor,
    roll_out,
    user_executor,
)
from train.checkpoint import Checkpoint
from train.metrics import read_metrics
from train.prompt_set import PromptSet
from train.rewards import tool_answer, tool_format
from train.rollout import trajectory_rows
from train.run import main

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
FIXTURES = ROOT / "tests" / "fixtures" / "minimind" / "minimind3"
pytestmark = pytest.mark.usefixtures("one_thread")

CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "2+3"}}\n</tool_call>'
ANSWER = "The answer is 5."
TURNS = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def greedy(tok, budget: int = 200) -> Sampling:
    return Sampling(budget, 0.0, None, None, tok.special_ids["<|im_end|>"])


def calculator_prompt(tok) -> list[int]:
    return prompt_ids(tok, TURNS, tools=builtin_tools.tools_schema(["calculate_math"]))


def one_rollout(tok, model, executor=None, rounds: int = 3, budget: int = 200):
    executor = executor or builtin_executor(2.0)
    return roll_out(model, tok, [calculator_prompt(tok)], [("calculate_math",)], None, greedy(tok, budget),
                    ToolConfig(executor, rounds))[0]


# ---- the rollout and its loss mask --------------------------------------------------------------------------

def test_multi_turn_rollout_supervises_exactly_the_models_tokens(tok):
    """Hand-checked: call -> the calculator's result as a tool turn -> answer; only the two assistant turns'
    ids (each with its closing <|im_end|>) are supervised, and the row is the template's rendering of the
    whole conversation."""
    model = ScriptedLM(tok, [("<tool_response>", ANSWER), ("", CALL)])
    t = one_rollout(tok, model)
    call = {"id": "call_0_0", "type": "function",
            "function": {"name": "calculate_math", "arguments": '{"expression": "2+3"}'}}
    assert t.messages == [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"result": "5"}', "tool_call_id": "call_0_0", "name": "calculate_math"},
        {"role": "assistant", "content": ANSWER}]
    assert (t.rounds, t.truncated) == (1, False)
    # the model's own ids: the call, <|im_end|>, the answer, <|im_end|>
    end = tok.special_ids["<|im_end|>"]
    call_ids = tok.tokenizer.encode(CALL, add_special_tokens=False).ids
    answer_ids = tok.tokenizer.encode(ANSWER, add_special_tokens=False).ids
    n_tool = len(t.tokens) - len(call_ids) - len(answer_ids) - 2
    assert t.tokens[:len(call_ids) + 1] == call_ids + [end]
    assert t.tokens[-len(answer_ids) - 1:] == answer_ids + [end]
    assert t.learn == [True] * (len(call_ids) + 1) + [False] * n_tool + [True] * (len(answer_ids) + 1)
    assert t.generated == len(call_ids) + len(answer_ids)
    context = tok.tokenizer.decode(t.tokens[len(call_ids) + 1:-len(answer_ids) - 1], skip_special_tokens=False)
    assert context == ("\n<|im_start|>user\n<tool_response>\n{\"result\": \"5\"}\n</tool_response><|im_end|>\n"
                       "<|im_start|>assistant\n")
    # the same ids and loss mask as the chat template renders the finished conversation (SFT's encoding)
    prompt = calculator_prompt(tok)
    whole = encode_chat(tok, TURNS + t.messages, tools=builtin_tools.tools_schema(["calculate_math"]))
    assert prompt + t.tokens == whole.ids.tolist()[:-1]  # the template adds "\n" after the last <|im_end|>
    assert t.learn == [bool(w) for w in whole.weights.tolist()[len(prompt):-1]]
    # the training row: weights[t] marks targets[t] = ids[t + 1] that are the model's own
    row = trajectory_rows([prompt], [t], mask_truncated=False)
    weights = row.weights[0].tolist()
    assert weights == [0.0] * (len(prompt) - 1) + [float(x) for x in t.learn] + [0.0]
    supervised = [row.targets[0, i].item() for i, w in enumerate(weights) if w]
    assert supervised == call_ids + [end] + answer_ids + [end]


def test_calls_beyond_the_round_limit_leave_the_rollout_unfinished(tok):
    model = ScriptedLM(tok, [("", CALL)])
    t = one_rollout(tok, model, rounds=2)
    assert t.rounds == 2 and [m["role"] for m in t.messages] == ["assistant", "tool"] * 2 + ["assistant"]
    assert t.messages[-1]["tool_calls"] and not t.truncated
    assert tool_answer([TURNS], [t.messages], gt=[["5"]]) == [0.0]  # no final answer
    assert t.learn[-1] and t.tokens[-1] == tok.special_ids["<|im_end|>"]  # the last call is still the model's


def test_a_tool_turn_that_leaves_no_room_ends_the_rollout_truncated(tok):
    model = ScriptedLM(tok, [("<tool_response>", ANSWER), ("", CALL)])
    call_len = len(tok.tokenizer.encode(CALL, add_special_tokens=False).ids) + 1
    t = one_rollout(tok, model, budget=call_len + 5)
    assert t.truncated and t.rounds == 0 and len(t.tokens) == call_len and all(t.learn)
    row = trajectory_rows([calculator_prompt(tok)], [t], mask_truncated=True)
    assert row.weights.sum().item() == 0.0


def test_a_call_to_a_tool_not_offered_is_text_and_not_run(tok):
    ran = []
    model = ScriptedLM(tok, [("", CALL.replace("calculate_math", "delete_files"))])
    t = one_rollout(tok, model, executor=lambda name, arguments: ran.append(name) or "ok")
    assert ran == [] and t.rounds == 0 and len(t.messages) == 1 and "<tool_call>" in t.messages[0]["content"]
    assert tool_format([TURNS], [t.messages]) == [0.0]


# ---- executors -------------------------------------------------------------------------------------------------

def test_executor_errors_become_tool_results(tok, tmp_path):
    def raises(name, arguments):
        raise ValueError("no calculator today")

    text = user_executor(raises, "mine:raises", 1.0)("calculate_math", '{"expression": "1"}')
    assert json.loads(text) == {"error": "calculate_math failed: ValueError: no calculator today"}
    assert "not a string or a dict" in json.loads(user_executor(lambda n, a: 42, "mine:f", 1.0)("f", "{}"))["error"]
    assert "not JSON" in json.loads(user_executor(lambda n, a: {"x": {1}}, "mine:f", 1.0)("f", "{}"))["error"]
    assert user_executor(lambda n, a: f"{n} {a['expression']}", "mine:f", 1.0)("c", '{"expression": "7"}') == "c 7"
    assert json.loads(user_executor(lambda n, a: {"v": a}, "mine:f", 1.0)("c", '{"k": 1}')) == {"v": {"k": 1}}
    # the rollout goes on: the error is the tool turn the model answers
    model = ScriptedLM(tok, [("<tool_response>", ANSWER), ("", CALL)])
    t = one_rollout(tok, model, executor=user_executor(raises, "mine:raises", 1.0))
    assert "no calculator today" in t.messages[1]["content"] and t.messages[2] == {"role": "assistant",
                                                                                   "content": ANSWER}
    # a built-in tool refusing its input answers with an error too
    assert "error" in json.loads(builtin_executor(1.0)("calculate_math", '{"expression": "1/0"}'))


def test_a_hanging_executor_hits_the_time_limit():
    release = threading.Event()

    def hangs(name, arguments):
        release.wait(60)
        return "late"

    started = time.perf_counter()
    text = user_executor(hangs, "mine:hangs", 0.2)("slow", "{}")
    elapsed = time.perf_counter() - started
    release.set()
    assert json.loads(text) == {"error": "slow took longer than 0.2 s"} and elapsed < 5


def test_executor_specs(tmp_path):
    file = tmp_path / "my_tools.py"
    file.write_text("def run(name, arguments):\n    return {'name': name, 'n': len(arguments)}\n", encoding="utf-8")
    assert json.loads(load_executor(f"{file}:run", 1.0)("x", '{"a": 1}')) == {"name": "x", "n": 1}
    assert json.loads(load_executor("builtin", 1.0)("calculate_math", '{"expression": "2*21"}')) == {"result": "42"}
    for spec, said in ((f"{file}:nope", "has no function 'nope'"), ("calculator", "give builtin or module:function"),
                       ("no_such_module_xyz:f", "cannot import no_such_module_xyz")):
        with pytest.raises(ToolSpecError, match=said) as e:
            load_executor(spec, 1.0)
        assert str(e.value).startswith("--tools ") or said.startswith("give")


# ---- rewards and prompts -------------------------------------------------------------------------------------

def test_tool_rewards_read_the_trajectory():
    call = {"id": "c", "type": "function", "function": {"name": "calculate_math", "arguments": "{}"}}
    answered = [{"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": '{"result": "5888"}', "tool_call_id": "c"},
                {"role": "assistant", "content": "128 x 46 = 5,888"}]
    unfinished = answered[:2]
    malformed = [{"role": "assistant", "content": "<tool_call>{bad}</tool_call>", "tool_calls": [call]},
                 {"role": "assistant", "content": "5888"}]
    plain = [{"role": "assistant", "content": "It is 5888."}]
    completions = [answered, unfinished, malformed, plain, answered]
    gt = [["5888"], ["5888"], [5888], "5888", None]
    assert tool_answer([TURNS] * 5, completions, gt=gt) == [1.0, 0.0, 1.0, 1.0, None]
    assert tool_answer([TURNS], [answered], gt=[["5,888", "46"]]) == [1.0]
    assert tool_answer([TURNS], [answered], gt=[["5889"]]) == [0.0]
    assert tool_format([TURNS] * 4, completions[:4]) == [1.0, 1.0, 0.5, None]


def test_tool_answer_needs_a_gt_column_and_refuses_a_bad_one():
    from train.rewards import RewardError
    with pytest.raises(RewardError, match="needs a 'gt' column"):
        tool_answer([TURNS], [[{"role": "assistant", "content": "x"}]])
    with pytest.raises(RewardError, match="the gt of completion 0"):
        tool_answer([TURNS], [[{"role": "assistant", "content": "x"}]], gt=[[]])


def test_prompts_offer_their_own_tools_or_the_builtin_set(tok):
    listed = PromptSet(FIXTURES / "agent_rl_math.jsonl")
    listed.attach(tok, 32, 4096, builtin_tools.tools_schema(builtin_tools.BUILTIN))
    assert set(listed.names) == {("calculate_math",)}
    assert listed.ids[0] == prompt_ids(tok, listed.prompts[0].turns)  # its own tools, rendered from its system turn


# ---- the run: one-line errors and exact resume ---------------------------------------------------------------

CALLER = '<tool_call>{"name": "random_number"}</tool_call>'  # ids that never repeat: a one-hot chain spells them


def caller_checkpoint(folder: Path, tok) -> Path:
    """A tiny model that, after any generation prompt, calls random_number with high probability (a chain
    "\\n" -> CALLER -> <|im_end|> of one-hot embeddings and head rows, as tests/scripted.py builds its answer)."""
    chain = [tok.tokenizer.token_to_id("Ċ"), *tok.tokenizer.encode(CALLER, add_special_tokens=False).ids,
             tok.special_ids["<|im_end|>"]]
    assert len(set(chain)) == len(chain)
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny", tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                p.zero_()
        for slot, (cur, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
            model.model.embed_tokens.weight[cur, slot] = 1.0
            model.lm_head.weight[nxt, slot] = 2.5  # after the final norm: a logit gap of 20
    return Checkpoint.of(model, tok, step=1, stage="sft").save(folder)


def tool_args(init: Path, out: Path, *extra: str) -> list[str]:
    prompts = out.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("pick one", "another", "a third",
                                                                        "and a fourth")), encoding="utf-8")
    return ["--stage", "grpo", "--prompts", str(prompts), "--init-from", str(init), "--out", str(out),
            "--reward", "tool_format", "--tools", "builtin", "--max-tool-rounds", "2", "--group-size", "4",
            "--prompts-per-step", "2", "--max-new-tokens", "112", "--rollout-temperature", "1.5", "--grad-accum", "1",
            "--lr", "1e-2", "--min-lr", "1e-2", "--warmup-steps", "0", "--log-every", "1", "--save-every", "0",
            "--no-progress", *extra]


@pytest.mark.parametrize("spec, said", [("nosuch", "--tools nosuch: give builtin or module:function"),
                                        ("no_such_module_xyz:f", "--tools no_such_module_xyz:f: cannot import")])
def test_a_bad_tools_spec_stops_the_run_in_one_line(tok, tmp_path, capsys, spec, said):
    init = caller_checkpoint(tmp_path / "init", tok)
    args = tool_args(init, tmp_path / "run", "--max-steps", "1")
    args[args.index("builtin")] = spec
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not (tmp_path / "run").exists()


DETERMINISTIC = ("loss", "reward", "reward_std", "completion_len", "completion_len_max", "truncated_frac", "entropy",
                 "grad_norm", "frac_reward_zero_std", "tool_rounds")


def test_the_tool_path_resumes_exactly(tok, tmp_path):
    init = caller_checkpoint(tmp_path / "init", tok)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(tool_args(init, whole, "--max-steps", "4")) == 0
    assert main(tool_args(init, parts, "--max-steps", "4", "--stop-after", "2")) == 0
    assert main(tool_args(init, parts, "--max-steps", "4", "--resume")) == 0
    a = {r["step"]: r for r in read_metrics(whole) if "loss" in r}
    b = {r["step"]: r for r in read_metrics(parts) if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert any(a[s]["tool_rounds"] > 0.5 for s in a)  # the tools ran: rollouts went on after their calls
    for step in a:
        assert {k: a[step][k] for k in DETERMINISTIC} == {k: b[step][k] for k in DETERMINISTIC}, step
