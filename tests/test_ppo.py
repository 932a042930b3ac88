"""PPO (--stage ppo): GAE and the clipped losses against hand computation, a toy task a tiny model learns,
exact resume (value head and its optimizer state included), DDP == one process, bad input in one line, and
a checkpoint whose model is the policy alone (the value head kept apart)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_grpo import QUESTIONS, as_supervised, log_softmax_at, rl_args, steps_of, write_prompts

from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from train import checkpoint, loading
from train.checkpoint import Checkpoint
from train.run import main
from train.stages import PPOStage, StepNorm
from train.stages.ppo import PPOBatch, gae, token_rewards
from train.value_head import ValueHead

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
REWARDS = str(ROOT / "tests" / "grpo_rewards.py")
PY = sys.executable
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("init")
    Checkpoint.of(TinyLM(ModelConfig.from_preset("tiny")), load_tokenizer(TOKENIZER), stage="sft").save(folder)
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    records = [{"conversations": [{"role": "user", "content": q}]} for q in QUESTIONS]
    return write_prompts(tmp_path_factory.mktemp("prompts") / "toy.jsonl", records)


def ppo_args(prompts: Path, init: Path, out: Path, *extra: str) -> list[str]:
    """test_grpo's tiny CPU RL run, as PPO."""
    return rl_args(prompts, init, out, *extra, stage="ppo")


# ---- GAE and the loss, by hand ------------------------------------------------------------------------------

def test_gae_equals_hand_computed_values():
    """Row 0: the model's tokens at positions 1, 2, 4 (position 3 is a tool turn: skipped, its value ignored),
    score 1 at the last one, KL penalty 0.1 x (old - ref); gamma 0.9, lam 0.8 (gamma x lam = 0.72).
    Row 1: no supervised token (no reward anywhere). Row 2: one token, score -2."""
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)
    old = torch.tensor([[0.0, -1.0, -2.0, 5.0, -0.5], [0.0] * 5, [0.0, 0.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.2, -1.9, 0.0, -0.8], [0.0] * 5, [0.0, 0.0, -1.0, 0.0, 0.0]])
    values = torch.tensor([[7.0, 0.5, 0.2, 9.0, -0.1], [1.0] * 5, [0.0, 0.0, 0.3, 0.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 3.0, -2.0]), mask, old, ref, kl_coef=0.1)
    # r = -0.1 x (old - ref): -0.02, +0.01, -0.03 (+ 1 at the last token) on row 0; -2 on row 2
    expected_r = torch.tensor([[0.0, -0.02, 0.01, 0.0, 0.97], [0.0] * 5, [0.0, 0.0, -2.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected_r)
    adv, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, last token first: delta = 0.97 + 0.9 x 0 - (-0.1) = 1.07 = A
    #   position 2: delta = 0.01 + 0.9 x (-0.1) - 0.2 = -0.28;  A = -0.28 + 0.72 x 1.07 = 0.4904
    #   position 1: delta = -0.02 + 0.9 x 0.2 - 0.5 = -0.34;    A = -0.34 + 0.72 x 0.4904 = 0.013088
    # row 2: delta = -2 - 0.3 = -2.3
    expected_a = torch.tensor([[0.0, 0.013088, 0.4904, 0.0, 1.07], [0.0] * 5, [0.0, 0.0, -2.3, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.0, 0.513088, 0.6904, 0.0, 0.97], [0.0] * 5, [0.0, 0.0, -2.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected_a)
    torch.testing.assert_close(returns, expected_ret)


def test_loss_equals_hand_computed_value():
    """Three completion tokens (a, b at row 0, c at row 1) with logits over 3 ids under an identity head, a
    value head reading the first logit (V = 0.5, 0.0, -0.4), eps 0.2, value clip 0.2, vf_coef 0.5:

    a: A' = 1, ratio 1.5: pg = max(-1.5, -1.2) = -1.2 (clipped); V 0.5, v_old 0.1, R 1: max(0.25, (0.3-1)^2 = 0.49)
       / 2 = 0.245 (clipped value); l = -1.2 + 0.5 x 0.245 = -1.0775
    b: A' = -2, ratio 0.9: pg = 1.8; V 0.0, v_old 0.1, R -0.5: 0.25 both ways, vf = 0.125; l = 1.8625
    c: A' = -1, ratio 0.5: pg = max(0.5, 0.8) = 0.8 (clipped); V -0.4, v_old 0, R 0.2: max(0.36, (-0.2-0.2)^2 =
       0.16) / 2 = 0.18; l = 0.89
    step loss over N = 3 tokens: (-1.0775 + 1.8625 + 0.89) / 3 = 0.558333..."""
    logits = torch.zeros(2, 3, 3)
    logits[0, 1] = torch.tensor([0.5, 0.0, 1.0])
    logits[0, 2] = torch.tensor([0.0, 0.3, -0.2])
    logits[1, 0] = torch.tensor([-0.4, 0.2, 0.1])
    weights = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    targets = torch.tensor([[0, 2, 1], [0, 0, 0]])
    ratios = {(0, 1): 1.5, (0, 2): 0.9, (1, 0): 0.5}
    old = torch.zeros(2, 3)
    for (i, t), ratio in ratios.items():
        old[i, t] = log_softmax_at(logits[i, t].tolist(), int(targets[i, t]), 1.0) - math.log(ratio)
    zeros = torch.zeros(2, 3)
    batch = PPOBatch(torch.zeros(2, 3, dtype=torch.long), targets, weights, advantages=torch.zeros(2),
                     old_token_logps=old, old_values=torch.tensor([[0.0, 0.1, 0.1], [0.0, 0.0, 0.0]]),
                     token_advantages=torch.tensor([[0.0, 1.0, -2.0], [-1.0, 0.0, 0.0]]),
                     returns=torch.tensor([[0.0, 1.0, -0.5], [0.2, 0.0, 0.0]]), ref_token_logps=zeros)
    stage = PPOStage(reward=["format"], group_size=2, prompts_per_step=1, vf_coef=0.5, value_clip=0.2, epsilon=0.2)
    stage.value_head = ValueHead(3)
    with torch.no_grad():
        stage.value_head.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    loss, metrics = stage.objective(as_supervised(logits, weights), batch, StepNorm(torch.tensor(3.0), 1))
    assert loss.item() == pytest.approx((-1.0775 + 1.8625 + 0.89) / 3, abs=1e-6)
    assert metrics["pg_loss"].item() == pytest.approx((-1.2 + 1.8 + 0.8) / 3, abs=1e-6)
    assert metrics["value_loss"].item() == pytest.approx((0.245 + 0.125 + 0.18) / 3, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3) and metrics["value_clip_frac"].item() == \
        pytest.approx(1 / 3)
    assert metrics["value"].item() == pytest.approx((0.5 + 0.0 - 0.4) / 3, abs=1e-6)


# ---- runs --------------------------------------------------------------------------------------------------------

def test_toy_task_reward_rises_and_the_checkpoint_holds_the_policy_alone(prompts, init, tmp_path):
    out = tmp_path / "toy"
    assert main(ppo_args(prompts, init, out, "--max-steps", "20")) == 0
    steps = steps_of(out)
    rewards = [steps[s]["reward"] for s in sorted(steps)]
    assert sum(rewards[:3]) / 3 < 0.1 and sum(rewards[-3:]) / 3 > 0.5, rewards
    for key in ("pg_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "value", "entropy",
                "reward", "completion_len", "rollout_tokens_per_s"):
        assert key in steps[20], key
    ckpt = checkpoint.read(checkpoint.latest(out), resume=True)
    assert ckpt.stage == "ppo" and not any("value" in k for k in ckpt.model)
    assert {k: tuple(v.shape) for k, v in ckpt.value_head.items()} == {"proj.weight": (1, 64), "proj.bias": (1,)}
    assert ckpt.value_head["proj.weight"].abs().sum() > 0  # the head trained
    assert set(ckpt.model) == set(TinyLM(ckpt.model_config).state_dict())  # exactly the policy's tensors
    model = loading.load_model(out).model  # what bin/chat and bin/serve build
    assert not hasattr(model, "value_head")
    exported = tmp_path / "hf"
    proc = subprocess.run([PY, str(ROOT / "bin" / "export"), "--ckpt", str(out), "--format", "hf", "--out",
                           str(exported), "--quiet"], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("value" in k for k in names)
    sft = tmp_path / "sft_from_ppo"  # --init-from a PPO checkpoint: a plain policy for any stage
    assert main(["--stage", "grpo", "--prompts", str(prompts), "--init-from", str(out), "--out", str(sft),
                 "--reward", f"{REWARDS}:digits", "--group-size", "2", "--prompts-per-step", "1",
                 "--max-new-tokens", "4", "--max-steps", "1", "--grad-accum", "1", "--no-progress"]) == 0
    assert checkpoint.read(checkpoint.latest(sft)).value_head is None


DETERMINISTIC = ("loss", "reward", "completion_len", "pg_loss", "value_loss", "clip_frac", "value_clip_frac",
                 "approx_kl", "value", "entropy", "kl", "grad_norm")


def test_resume_is_bit_exact(prompts, init, tmp_path):
    common = ("--max-steps", "6", "--rollout-temperature", "1.5", "--kl-coef", "0.05")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(ppo_args(prompts, init, whole, *common)) == 0
    assert main(ppo_args(prompts, init, parts, *common, "--stop-after", "3")) == 0
    assert main(ppo_args(prompts, init, parts, *common, "--resume")) == 0
    a, b = steps_of(whole), steps_of(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert len({a[s]["reward"] for s in a}) > 1 and a[6]["kl"] != 0
    for step in a:
        assert {k: a[step][k] for k in DETERMINISTIC} == {k: b[step][k] for k in DETERMINISTIC}, step
    x, y = checkpoint.read(checkpoint.latest(whole)), checkpoint.read(checkpoint.latest(parts))
    assert all(torch.equal(x.model[k], y.model[k]) for k in x.model)
    assert all(torch.equal(x.value_head[k], y.value_head[k]) for k in x.value_head)


def test_ddp_two_processes_match_one_with_doubled_accumulation(prompts, init, tmp_path):
    common = ("--max-steps", "3", "--rollout-temperature", "1.5")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ppo_args(prompts, init, single, *common)
    args[args.index("--grad-accum") + 1] = "2"
    assert main(args) == 0
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "run.py"), *ppo_args(prompts, init, ddp, *common)],
                          cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = steps_of(single), steps_of(ddp)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        for key in ("loss", "reward", "pg_loss", "value_loss", "value", "clip_frac", "entropy", "grad_norm"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-5, abs=1e-6), (step, key)
    x, y = checkpoint.read(checkpoint.latest(single)), checkpoint.read(checkpoint.latest(ddp))
    for k in x.value_head:
        torch.testing.assert_close(x.value_head[k], y.value_head[k], rtol=1e-5, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, drop, message", [
    (("--gamma", "1.5"), None, "argument --gamma: must be"),
    (("--lam", "nan"), None, "argument --lam:"),
    (("--score-norm", "group"), None, "argument --score-norm: invalid choice"),
    ((), "--prompts", "--stage ppo trains on rollouts of --prompts FILE.jsonl"),
    (("--loss", "grpo"), None, "--loss applies to --stage grpo only, not --stage ppo"),
    (("--lora-rank", "4"), None, "--lora-rank with --stage ppo is not supported"),
])
def test_usage_errors_exit_2_in_one_line(prompts, init, tmp_path, capsys, extra, drop, message):
    args = ppo_args(prompts, init, tmp_path / "run", "--max-steps", "1", *extra)
    if drop is not None:
        i = args.index(drop)
        del args[i:i + 2]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train/run.py: error: ") and message in err[-1], err
    assert not (tmp_path / "run").exists()


def test_input_errors_exit_1_in_one_line(prompts, init, tmp_path, capsys):
    args = ppo_args(prompts, init, tmp_path / "run", "--max-steps", "1")
    i = args.index("--init-from")
    del args[i:i + 2]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train/run.py: error: --stage ppo improves a trained model" in err, err
    grpo = tmp_path / "grpo"  # a GRPO checkpoint holds no value head: not resumable as PPO
    args = ppo_args(prompts, init, grpo, "--max-steps", "2", "--stop-after", "1")
    args[args.index("ppo")] = "grpo"
    assert main(args) == 0
    capsys.readouterr()
    assert main(ppo_args(prompts, init, grpo, "--max-steps", "2", "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("train/run.py: error: "), err


def test_a_bad_value_head_in_a_checkpoint_is_one_line(prompts, init, tmp_path):
    out = tmp_path / "run"
    assert main(ppo_args(prompts, init, out, "--max-steps", "1")) == 0
    path = checkpoint.latest(out)
    payload = torch.load(path, weights_only=True)
    payload["value_head"]["proj.weight"] = torch.zeros(1, 7)
    torch.save(payload, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"value_head.*not a value head of this model"):
        checkpoint.read(path)
