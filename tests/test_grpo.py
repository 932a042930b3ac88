"""The RL stage (--stage grpo): losses against hand computation, KL, zero-std groups, rewards and their
errors, the prompt reader, a toy task a tiny model learns, exact resume, DDP == one process, pass@k."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import TinyLMError
from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from model.transformer import HeadInput
from preprocess.prompts import read_prompts
from serve.evaluate import RewardOptions, reward_metrics
from serve.source_args import ToolError
from train import loading
from train.checkpoint import Checkpoint
from train.loading import load_model
from train.metrics import read_metrics
from train.passk import pass_at_k
from train.prompt_set import PromptSet
from train.rewards import RewardError, call_reward, final_number, format_reward, gsm8k, length, load_rewards, score
from train.rollout import Completions, RolloutBatch, completion_rows, group_advantages, sample_seed
from train.run import main, parse_args
from train.stages import GRPOStage, StepNorm, Supervised
from train.stages.grpo import GRPOOptions

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
REWARDS = str(ROOT / "tests" / "grpo_rewards.py")
PY = sys.executable
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ("What is 2+3?", "Count to five.", "Name a prime.", "Say a number.")


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    """A tiny random model saved as a checkpoint with the shipped tokenizer (the policy to improve)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("init")
    Checkpoint.of(TinyLM(ModelConfig.from_preset("tiny")), load_tokenizer(TOKENIZER), stage="sft").save(folder)
    return folder


def write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    records = [{"conversations": [{"role": "user", "content": q}], "level": i % 2} for i, q in enumerate(QUESTIONS)]
    return write_prompts(tmp_path_factory.mktemp("prompts") / "toy.jsonl", records)


def rl_args(prompts: Path, init: Path, out: Path, *extra: str, stage: str = "grpo") -> list[str]:
    """A tiny CPU RL run: 4 prompts x 8 samples of <= 8 tokens per step, the digits toy reward."""
    return ["--stage", stage, "--prompts", str(prompts), "--init-from", str(init), "--out", str(out),
            "--reward", f"{REWARDS}:digits", "--group-size", "8", "--prompts-per-step", "4", "--max-new-tokens", "8",
            "--grad-accum", "1", "--lr", "3e-2", "--min-lr", "3e-2", "--warmup-steps", "0", "--log-every", "1",
            "--save-every", "0", "--no-progress", *extra]


def steps_of(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


# ---- the loss, by hand ------------------------------------------------------------------------------------

def log_softmax_at(row: list[float], index: int, temperature: float) -> float:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    return scaled[index] - top - math.log(sum(math.exp(x - top) for x in scaled))


def hand_loss(logits: torch.Tensor, batch: RolloutBatch, loss: str, eps: float, eps_high: float, beta: float,
              temperature: float, samples: int, max_new: int) -> tuple[float, float]:
    """(step loss, mean k3) from the definitions, one token at a time in float64 Python."""
    per_row, total, n, kl_sum = [], 0.0, 0, 0.0
    for i in range(logits.shape[0]):
        row_sum, row_n = 0.0, 0
        a = float(batch.advantages[i])
        for t in range(logits.shape[1]):
            if batch.weights[i, t] == 0:
                continue
            lp = log_softmax_at(logits[i, t].tolist(), int(batch.targets[i, t]), temperature)
            ratio = math.exp(lp - float(batch.old_token_logps[i, t]))
            if loss == "cispo":
                value = -min(ratio, 1 + eps_high) * a * lp
            else:
                value = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps_high) * a)
            d = float(batch.ref_token_logps[i, t]) - lp
            k3 = math.exp(d) - d - 1
            value += beta * k3
            kl_sum += k3
            row_sum, row_n = row_sum + value, row_n + 1
        per_row.append(row_sum / max(row_n, 1))
        total, n = total + row_sum, n + row_n
    step = {"dapo": total / n, "cispo": total / n, "grpo": sum(per_row) / samples,
            "dr_grpo": total / (samples * max_new)}[loss]
    return step, kl_sum / n


def as_supervised(logits: torch.Tensor, weights: torch.Tensor) -> Supervised:
    """Given logits [B, T, V] as what the objective reads: hidden states = the logits at the supervised
    positions under an identity head, so ``head_logits`` gives back exactly these logits."""
    b, t, v = logits.shape
    index = (weights.reshape(-1) > 0).nonzero().squeeze(1)
    head = HeadInput(logits.reshape(b * t, v)[index], torch.eye(v), torch.zeros(()))
    return Supervised(index, head, (b, t))


def fixed_batch() -> tuple[torch.Tensor, RolloutBatch]:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, generator=g)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    weights = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        true = -torch.nn.functional.cross_entropy((logits / 0.7).reshape(8, 5), targets.reshape(8),
                                                  reduction="none").view(2, 4)
    old = true + torch.tensor([[0.0, 0.5, -0.4, 0.0], [0.0, -0.05, 0.6, -0.3]])  # ratios in and out of the clip range
    ref = true + torch.tensor([[0.0, 0.2, -0.1, 0.0], [0.0, 0.3, 0.05, -0.2]])
    batch = RolloutBatch(torch.zeros(2, 4, dtype=torch.long), targets, weights, advantages=torch.tensor([0.7, -0.7]),
                         old_token_logps=old, ref_token_logps=ref)
    return logits, batch


@pytest.mark.parametrize("loss", ["dapo", "dr_grpo", "grpo", "cispo"])
def test_loss_equals_hand_computed_value(loss):
    logits, batch = fixed_batch()
    stage = GRPOStage(reward=["format"], loss=loss, group_size=2, prompts_per_step=1, max_new_tokens=3,
                      epsilon=0.2, epsilon_high=0.3, kl_coef=0.05, rollout_temperature=0.7)
    got, metrics = stage.objective(as_supervised(logits, batch.weights), batch, StepNorm(torch.tensor(5.0), 1))
    want, kl = hand_loss(logits, batch, loss, 0.2, 0.3, 0.05, 0.7, samples=2, max_new=3)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-5)
    assert 0.0 < float(metrics["clip_frac"]) < 1.0  # the offsets put some tokens outside the range


def test_kl_is_zero_when_policy_is_reference(init):
    model = loading.dense_model(loading.load(init)).train()
    stage = GRPOStage(reward=["format"], kl_coef=0.1, group_size=2, prompts_per_step=1)
    stage.ref_model = loading.frozen_model(loading.load(init))
    ids = torch.randint(7, 6400, (2, 6), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1)
    batch = RolloutBatch(ids, targets, torch.tensor([[0, 0, 1, 1, 1, 0]] * 2, dtype=torch.float32),
                         advantages=torch.tensor([1.0, -1.0]))
    stage.model = model
    stage.annotate(batch)
    assert batch.ref_token_logps is not None and batch.old_token_logps is None  # reuse 1: the old policy is the policy
    _, metrics = stage.loss(model, batch, StepNorm(torch.tensor(6.0), 1))
    assert float(metrics["kl"]) == 0.0


def test_zero_std_groups_give_zero_gradient():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    adv, std, zero = group_advantages(rewards, "group")
    assert zero.tolist() == [False, True]
    assert std[0].item() == pytest.approx(math.sqrt(1 / 3))
    assert adv[0].tolist() == pytest.approx([0.5 / (math.sqrt(1 / 3) + 1e-4), -0.5 / (math.sqrt(1 / 3) + 1e-4)] * 2)
    assert adv[1].tolist() == [0.0] * 4
    assert group_advantages(rewards, "none")[0][0].tolist() == [0.5, -0.5, 0.5, -0.5]
    logits = torch.randn(8, 3, 11, requires_grad=True)
    batch = RolloutBatch(torch.zeros(8, 3, dtype=torch.long), torch.randint(0, 11, (8, 3)), torch.ones(8, 3),
                         advantages=adv.reshape(-1))
    stage = GRPOStage(reward=["format"], group_size=4, prompts_per_step=2)
    loss, _ = stage.objective(as_supervised(logits, batch.weights), batch, StepNorm(torch.tensor(24.0), 1))
    loss.backward()
    assert torch.count_nonzero(logits.grad[4:]) == 0  # the zero-std group
    assert torch.count_nonzero(logits.grad[:4]) > 0


# ---- rewards -----------------------------------------------------------------------------------------------

def test_builtin_rewards():
    ref = "<think>\n12 + 12 = 24\n</think>\n<answer>\n24\n</answer>"
    done = [[{"role": "assistant", "content": c}] for c in
            ("<think>so</think><answer>24</answer>", "<think>so</think><answer>25</answer>", "24", "#### 24")]
    assert gsm8k([], done, reference=[ref] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert gsm8k([], done[:1], answer=["blah #### 1,024"]) == [0.0]
    assert final_number("<answer>it is 1,024.5</answer>") == 1024.5
    assert format_reward([], done) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward([], ["<think>a</think><answer>1</answer><answer>2</answer>", "<answer>1</answer>",
                              " <think>a\nb</think>\n<answer>1</answer>\n"]) == [0.0, 0.0, 1.0]
    assert length([], ["", "x" * 10, "x" * 1536, "x" * 5000]) == [-1.0, 0.0, -0.5, -1.0]
    with pytest.raises(RewardError, match="needs a 'reference' column"):
        gsm8k([], done)


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "not a built-in"),
    ("tests/nothere.py:f", "no such file"),
    (f"{REWARDS}:absent", "has no function 'absent'"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("gsm8k@inf", "finite number"),
])
def test_bad_reward_specs_are_one_line(spec, message):
    with pytest.raises(RewardError, match=message):
        load_rewards([spec])


@pytest.mark.parametrize("name, message", [
    ("raises", r"reward raises \(.*\) raised ValueError: bad reward"),
    ("too_short", r"reward too_short \(.*\) returned 1 values for 2 completions"),
    ("not_numbers", r"reward not_numbers \(.*\) returned str at index 0, not a number"),
    ("huge_int", r"reward huge_int \(.*\) returned 1000000000.*\(int\) at index 0, not a finite number "
                 r"\(OverflowError"),
    ("raising_generator", r"reward raising_generator \(.*\): reading its values raised RuntimeError: generator broke"),
    ("endless", r"reward endless \(.*\) returned more than 2 values for 2 completions"),
    ("matrix", r"reward matrix \(.*\) returned a 2-D array, not a list of 2 numbers"),
    ("float_raises", r"reward float_raises \(.*\) returned <.*_NoFloat.* at index 0, not a finite number "
                     r"\(ArithmeticError: no float for you\)"),
    ("bad_message", r"reward bad_message \(.*\) raised _BadMessage: \(its message cannot be shown\)"),
    ("exits", r"reward exits \(.*\) raised SystemExit: 0"),
])
def test_misbehaving_reward_functions_are_one_line(name, message):
    reward = load_rewards([f"{REWARDS}:{name}"])[0]
    with pytest.raises(RewardError, match=message):
        call_reward(reward, [[]] * 2, [[{"role": "assistant", "content": "x"}]] * 2, {})


def test_reward_values_are_read_as_numbers_and_arguments_are_the_functions_own():
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "x"}]] * 2
    columns = {"level": [1, 2]}
    assert call_reward(load_rewards([f"{REWARDS}:numpy_values"])[0], prompts, completions, columns) == [0.0, 1.0]
    call_reward(load_rewards([f"{REWARDS}:edits_its_arguments"])[0], prompts, completions, columns)
    assert prompts == [[{"role": "user", "content": "q"}]] * 2 and columns == {"level": [1, 2]}


def test_a_total_beyond_float32_is_one_line():
    rewards = load_rewards([f"{REWARDS}:overflowing", f"{REWARDS}:overflowing@2"])
    with pytest.raises(RewardError, match=r"the total reward of completion 0 \(overflowing 1e\+300 x 1, "
                                          r"overflowing_2 1e\+300 x 2\) is 3e\+300, beyond float32's range"):
        score(rewards, [[]], [[{"role": "assistant", "content": "x"}]], {})


def test_a_reward_file_that_is_not_python_is_one_line(tmp_path):
    (tmp_path / "r.txt").write_text("def f(**k): return []\n", encoding="utf-8")
    with pytest.raises(RewardError, match=r"r.txt is not a Python file"):
        load_rewards([f"{tmp_path / 'r.txt'}:f"])


def test_bad_reward_stops_the_run_in_one_line(prompts, init, tmp_path, capsys):
    args = rl_args(prompts, init, tmp_path / "run", "--max-steps", "2")
    args[args.index(f"{REWARDS}:digits")] = f"{REWARDS}:raises"
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train/run.py: error: reward raises (") and err[-1].endswith("raised ValueError: "
                                                                                          "bad reward")
    assert "Traceback" not in "\n".join(err)


# ---- prompts -----------------------------------------------------------------------------------------------

def test_prompt_reader_keeps_columns_and_reference(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                           {"role": "assistant", "content": "<answer>2</answer>"}], "level": 3},
        {"conversations": [{"role": "user", "content": "Hi"}]}])
    first, second = read_prompts(path)
    assert [t["role"] for t in first.turns] == ["system", "user"]
    assert first.columns == {"level": 3, "reference": "<answer>2</answer>"} and (first.source, first.line) == (
        str(path), 1)
    assert second.columns == {} and second.line == 2


@pytest.mark.parametrize("line, message", [
    ('{"conversations": [{"role": "user", "content": "a"}', ":2: invalid JSON"),
    ('{"conversations": [{"role": "assistant", "content": "a"}]}',
     ":2: field 'conversations[0].role': expected 'user'"),
    ('{"conversations": [{"role": "user", "content": ""}]}', ":2: field 'conversations[0].content': empty"),
    ('{"messages": []}', ":2: field 'conversations': missing"),
    ('{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "reference": "c"}',
     ":2: field 'reference': the record has its own 'reference'"),
])
def test_bad_prompt_records_are_one_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"conversations": [{"role": "user", "content": "ok"}]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TinyLMError) as e:
        read_prompts(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


@pytest.mark.parametrize("column", ["prompts", "completions"])
def test_a_column_named_like_a_reward_argument_is_refused_when_read(tmp_path, init, capsys, column):
    path = write_prompts(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", column: ["x"]}])
    with pytest.raises(TinyLMError) as e:
        PromptSet(path)
    assert str(e.value).startswith(f"{path}:2: field '{column}': a column named '{column}' would replace")
    assert main(rl_args(path, init, tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train/run.py: error: {e.value}"]
    assert not (tmp_path / "run").exists()


def test_columns_reach_reward_functions(prompts, init, tmp_path):
    out = tmp_path / "run"
    args = rl_args(prompts, init, out, "--max-steps", "1")
    args[args.index(f"{REWARDS}:digits")] = f"{REWARDS}:echo_column"
    assert main(args) == 0
    record = steps_of(out)[1]
    assert record["reward"] == record["reward/echo_column"] == 0.5  # levels 0, 1, 0, 1
    assert record["reward_std"] == 0.0 and record["frac_reward_zero_std"] == 1.0
    assert record["loss"] == 0.0 and record["grad_norm"] == 0.0  # every group has equal rewards: no gradient


def test_rows_supervise_completion_tokens_only():
    done = Completions([[11, 12], [13, 14, 15]], [False, True])
    rows = completion_rows([[1, 2, 3], [4, 5]], done, stop_id=2, mask_truncated=False)
    assert rows.input_ids.tolist() == [[1, 2, 3, 11, 12, 2], [4, 5, 13, 14, 15, 0]]
    assert rows.targets.tolist() == [[2, 3, 11, 12, 2, 0], [5, 13, 14, 15, 0, 0]]
    assert rows.weights.tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]]  # + the closing <|im_end|>
    masked = completion_rows([[1, 2, 3], [4, 5]], done, stop_id=2, mask_truncated=True)
    assert masked.weights.tolist() == [[0, 0, 1, 1, 1, 0], [0] * 6]


def test_sample_seeds_are_distinct_and_stable():
    seeds = {sample_seed(1337, b, p, j) for b in range(3) for p in range(4) for j in range(8)}
    assert len(seeds) == 96 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1337, 2, 3, 1) == sample_seed(1337, 2, 3, 1) != sample_seed(1338, 2, 3, 1)


# ---- learning, resume, DDP ------------------------------------------------------------------------------------

def test_toy_task_reward_rises(prompts, init, tmp_path):
    out = tmp_path / "toy"
    assert main(rl_args(prompts, init, out, "--max-steps", "20")) == 0
    steps = steps_of(out)
    rewards = [steps[s]["reward"] for s in sorted(steps)]
    assert rewards[0] < 0.1 and sum(rewards[-3:]) / 3 > 0.8, rewards
    last = steps[20]
    for key in ("reward_std", "frac_reward_zero_std", "completion_len", "completion_len_max", "truncated_frac",
                "clip_frac", "entropy", "rollout_tokens_per_s", "rollout_s", "train_s", "reward/digits"):
        assert key in last, key
    assert last["completion_len_max"] <= 9 and 0 <= last["truncated_frac"] <= 1
    assert last["entropy"] < steps[1]["entropy"]


DETERMINISTIC = ("loss", "reward", "reward_std", "completion_len", "completion_len_max", "truncated_frac", "entropy",
                 "grad_norm", "frac_reward_zero_std")


def test_resume_samples_the_same_completions(prompts, init, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(rl_args(prompts, init, whole, "--max-steps", "6", "--rollout-temperature", "1.5")) == 0
    assert main(rl_args(prompts, init, parts, "--max-steps", "6", "--rollout-temperature", "1.5",
                        "--stop-after", "3")) == 0
    assert main(rl_args(prompts, init, parts, "--max-steps", "6", "--rollout-temperature", "1.5", "--resume")) == 0
    a, b = steps_of(whole), steps_of(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert len({a[s]["reward"] for s in a}) > 1  # the policy changes: later steps sample other completions
    for step in a:
        assert {k: a[step][k] for k in DETERMINISTIC} == {k: b[step][k] for k in DETERMINISTIC}, step


def test_bf16_rollouts_resume_exactly_and_sample_other_tokens(prompts, init, tmp_path):
    """--rollout-dtype bfloat16: the decode products run in bf16 (other tokens than float32 rollouts draw),
    still exactly resumable, and a resumed run must keep it."""
    common = ("--max-steps", "4", "--rollout-temperature", "1.5")
    f32, whole, parts = tmp_path / "f32", tmp_path / "whole", tmp_path / "parts"
    assert main(rl_args(prompts, init, f32, *common)) == 0
    assert main(rl_args(prompts, init, whole, *common, "--rollout-dtype", "bfloat16")) == 0
    assert main(rl_args(prompts, init, parts, *common, "--rollout-dtype", "bfloat16", "--stop-after", "2")) == 0
    assert main(rl_args(prompts, init, parts, *common, "--rollout-dtype", "bfloat16", "--resume")) == 0
    a, b, c = steps_of(whole), steps_of(parts), steps_of(f32)
    assert sorted(a) == sorted(b) == sorted(c) == [1, 2, 3, 4]
    for step in a:
        assert {k: a[step][k] for k in DETERMINISTIC} == {k: b[step][k] for k in DETERMINISTIC}, step
    assert any(a[s]["loss"] != c[s]["loss"] for s in a)  # bf16 products: other samples than float32 ones
    assert loading.load(parts).stage_options["rollout_dtype"] == "bfloat16"


def test_resume_refuses_other_rl_options(prompts, init, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(rl_args(prompts, init, out, "--max-steps", "2", "--stop-after", "1")) == 0
    capsys.readouterr()
    assert main(rl_args(prompts, init, out, "--max-steps", "2", "--resume", "--group-size", "4")) == 1
    assert "--group-size was 8, now 4; a resumed RL run keeps its options" in capsys.readouterr().err


def test_ddp_two_processes_match_one_with_doubled_accumulation(prompts, init, tmp_path):
    common = ("--max-steps", "3", "--rollout-temperature", "1.5")
    single = tmp_path / "single"
    args = rl_args(prompts, init, single, *common)
    args[args.index("--grad-accum") + 1] = "2"
    assert main(args) == 0
    ddp = tmp_path / "ddp"
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "run.py"), *rl_args(prompts, init, ddp, *common)],
                          cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = steps_of(single), steps_of(ddp)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        for key in DETERMINISTIC:
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_lora_trains_only_the_adapter(prompts, init, tmp_path):
    out = tmp_path / "lora"
    assert main(rl_args(prompts, init, out, "--max-steps", "2", "--lora-rank", "4")) == 0
    ckpt = loading.load(out)
    assert ckpt.lora is not None and ckpt.lora.rank == 4 and all("lora" in k for k in ckpt.model)
    assert ckpt.stage == "grpo" and ckpt.stage_options["reward"] == [f"{REWARDS}:digits"]


def test_rollout_reuse_needs_aligned_checkpoints(prompts, init, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(rl_args(prompts, init, tmp_path / "r", "--rollout-reuse", "2", "--stop-after", "3"))
    assert "--stop-after must be a multiple of --rollout-reuse 2" in capsys.readouterr().err


def test_rollout_reuse_clips_the_ratio(prompts, init, tmp_path):
    out = tmp_path / "reuse"
    assert main(rl_args(prompts, init, out, "--max-steps", "4", "--rollout-reuse", "2", "--epsilon", "0.01")) == 0
    steps = steps_of(out)
    assert steps[1]["clip_frac"] == 0.0  # first pass over a batch: ratio 1
    assert steps[1]["reward"] == steps[2]["reward"] and steps[2]["rollout_s"] == 0.0  # the same rollouts
    assert steps[2]["clip_frac"] > 0.0  # the second pass: the policy moved by lr 3e-2


# ---- evaluation -------------------------------------------------------------------------------------------------

def test_pass_at_k_estimator():
    assert pass_at_k(4, 1, 2) == 0.5
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)


def test_eval_prompts_give_pass_at_k(prompts, init, tmp_path):
    evals = write_prompts(tmp_path / "eval.jsonl", [
        {"conversations": [{"role": "user", "content": "a"}], "level": 1},
        {"conversations": [{"role": "user", "content": "b"}], "level": 0},
        {"conversations": [{"role": "user", "content": "c"}], "level": 1}])
    out = tmp_path / "run"
    args = rl_args(prompts, init, out, "--max-steps", "2", "--eval-prompts", str(evals), "--eval-every", "2",
                   "--pass-k", "2", "--group-size", "4")
    args[args.index(f"{REWARDS}:digits")] = f"{REWARDS}:echo_column"
    assert main(args) == 0
    evals_logged = [r for r in read_metrics(out) if "val_prompts" in r]
    assert len(evals_logged) == 1
    record = evals_logged[0]
    assert record["step"] == 2 and record["val_prompts"] == 3
    for key in ("val_pass@1", "val_pass@2", "val_greedy_pass@1", "val_reward"):
        assert record[key] == pytest.approx(2 / 3), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bin_eval_rewards_equal_the_runs_evaluation(prompts, init, tmp_path, dtype):
    out = tmp_path / "run"
    args = rl_args(prompts, init, out, "--max-steps", "2", "--eval-prompts", str(prompts), "--eval-every", "2",
                   "--pass-k", "2", "--group-size", "4", "--success-threshold", "0.1", "--rollout-temperature", "1.5",
                   "--rollout-dtype", dtype)
    assert main(args) == 0
    logged = next(r for r in read_metrics(out) if "val_prompts" in r)
    opts = RewardOptions((f"{REWARDS}:digits",), samples=4, k=2, threshold=0.1, temperature=1.5, max_new_tokens=8,
                         batch=4, rollout_dtype=dtype)
    got = reward_metrics(load_model(out), prompts, opts, torch.device("cpu"), quiet=True)["reward_metrics"]
    assert got == {k.removeprefix("val_"): v for k, v in logged.items() if k.startswith("val_")}
    assert 0 < got["pass@1"] < got["pass@2"] < 1  # samples differ: the comparison is not between constants


def test_bin_eval_samples_as_a_run_evaluates_by_default():
    """bin/eval's reward options default to the run's: GRPO's sampling options and train/run.py's seed."""
    grpo, run = GRPOOptions(), parse_args(["--stage", "grpo", "--prompts", "p", "--out", "o"])
    opts = RewardOptions(("m:f",))
    assert (opts.samples, opts.threshold, opts.temperature, opts.max_new_tokens, opts.rollout_dtype) == (
        grpo.group_size, grpo.success_threshold, grpo.rollout_temperature, grpo.max_new_tokens, grpo.rollout_dtype)
    assert opts.seed == run.run.seed and run.stage == grpo


def test_an_unknown_rollout_dtype_is_refused_by_the_one_table():
    with pytest.raises(ToolError, match=r"--rollout-dtype is one of float32, bfloat16, got 'float16'"):
        RewardOptions(("m:f",), rollout_dtype="float16")


def test_bin_eval_reward_cli(prompts, init, tmp_path):
    results = tmp_path / "results.jsonl"
    proc = subprocess.run([PY, str(ROOT / "bin" / "eval"), "--ckpt", str(init), "--prompts", str(prompts), "--reward",
                           f"{REWARDS}:echo_column", "--samples", "2", "--max-new-tokens", "4", "--results",
                           str(results), "--quiet"], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["reward_metrics"] == {"pass@1": 0.5, "pass@2": 0.5, "greedy_pass@1": 0.5, "reward": 0.5,
                                        "prompts": 4}
    bad = RewardOptions((f"{REWARDS}:too_short",), samples=2, max_new_tokens=4)
    with pytest.raises(RewardError, match=r"^reward too_short \(.*\) returned 7 values for 8 completions$"):
        reward_metrics(load_model(init), prompts, bad, torch.device("cpu"), quiet=True)  # bin/eval: one line


@pytest.mark.parametrize("extra, drop, message", [
    ((), "--init-from", "--stage grpo improves a trained model: give it with --init-from CKPT"),
    (("--grad-accum", "3"), None, "--prompts-per-step 4 must be a multiple of --grad-accum 3 x 1 process(es)"),
    ((), "--reward", "give at least one --reward SPEC"),
    (("--loss", "grpo", "--pass-k", "9"), None, "--pass-k must be in [1, --group-size 8], got 9"),
])
def test_usage_errors_are_one_line(prompts, init, tmp_path, capsys, extra, drop, message):
    args = rl_args(prompts, init, tmp_path / "run", "--max-steps", "1", *extra)
    if drop is not None:
        i = args.index(drop)
        del args[i:i + 2]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("train/run.py: error: ") and message in err, err
    assert not (tmp_path / "run").exists()  # nothing left behind
