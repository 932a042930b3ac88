"""Tools in the RL rollouts under DDP: GRPO and PPO with --tools builtin on 2 gloo processes equal one process
with doubled accumulation (each rank runs the tool calls of its own groups; the trajectories, rewards and
updates are those of the single process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_agentic import caller_checkpoint, tool_args

from core.tokenizer import load_tokenizer
from train.metrics import read_metrics
from train.run import main

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")

COMPARED = {"grpo": ("loss", "reward", "reward_std", "completion_len", "completion_len_max", "truncated_frac",
                     "entropy", "grad_norm", "frac_reward_zero_std", "tool_rounds"),
            "ppo": ("loss", "reward", "completion_len", "truncated_frac", "pg_loss", "value_loss", "value", "entropy",
                    "grad_norm", "tool_rounds")}


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_two_processes_with_tools_match_one(tmp_path, stage):
    init = caller_checkpoint(tmp_path / "init", load_tokenizer(TOKENIZER))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = tool_args(init, single, "--max-steps", "3")
    args[args.index("--stage") + 1] = stage
    args[args.index("--grad-accum") + 1] = "2"
    assert main(args) == 0
    args = tool_args(init, ddp, "--max-steps", "3")
    args[args.index("--stage") + 1] = stage
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "run.py"), *args], cwd=ROOT, env=ONE_THREAD, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = {r["step"]: r for r in read_metrics(single) if "loss" in r}
    two = {r["step"]: r for r in read_metrics(ddp) if "loss" in r}
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert any(one[s]["tool_rounds"] > 0.5 for s in one)  # the tools ran on both ranks' rollouts
    for step in one:
        for key in COMPARED[stage]:
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-5, abs=1e-6), (step, key)
