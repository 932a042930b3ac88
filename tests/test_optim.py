"""train/optim.py, train/schedule.py, train/defaults.py: Muon's parameter split, the WSD schedule, bit-exact
resume with Muon and WSD, extending a finished WSD run from its pre-decay checkpoint, DDP with Muon, and the
defaults table that --help and train.sh read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from test_train import PY, ROOT, args, losses, pack

from model import ModelConfig, TinyLM
from model.lora import LoRAConfig, apply_lora
from train import checkpoint, defaults, loading
from train.optim import OptimConfig, build_optimizers
from train.run import main
from train.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory) -> Path:
    return pack("pretrain", tmp_path_factory.mktemp("packed") / "pretrain", 64)


def opt_args(data: Path, out: Path, *extra: str) -> list[str]:
    """test_train's tiny run (8 rows x 64 tokens per step) without its ``--optimizer adamw`` (so a resumed run
    can take the recorded one), with dropout, so resuming must restore the RNG too."""
    base = args(data, out, "--model-arg", "dropout=0.1", "--save-every", "5", *extra)
    i = base.index("--optimizer")
    return base[:i] + base[i + 2:]


def same_weights(a: Path, b: Path) -> bool:
    x, y = loading.load(a), loading.load(b)
    return x.model.keys() == y.model.keys() and all(torch.equal(x.model[k], y.model[k]) for k in x.model)


# ---- the parameter split ------------------------------------------------------------------------------------

def test_muon_takes_the_hidden_matrices_adamw_the_rest():
    model = TinyLM(ModelConfig.from_preset("tiny-moe"))
    opt = build_optimizers(model.named_parameters(), OptimConfig.for_stage("muon", lr=1e-3, muon_lr=0.02))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.parts["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.parts["adamw"].param_groups for p in g["params"]}
    assert isinstance(opt.parts["muon"], torch.optim.Muon) and isinstance(opt.parts["adamw"], torch.optim.AdamW)
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.1.mlp.experts.3.down_proj.weight" in muon
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight"} <= adamw  # router
    assert all(n.startswith("model.layers.") and n.endswith("proj.weight") for n in muon)
    assert opt.set_lr(0.5) == {"muon": 0.01, "adamw": 5e-4}
    assert opt.parts["muon"].param_groups[0]["lr"] == 0.01 and opt.parts["adamw"].param_groups[1]["lr"] == 5e-4


def test_lora_adapters_train_with_adamw_under_muon():
    model = apply_lora(TinyLM(ModelConfig.from_preset("tiny")).requires_grad_(False), LoRAConfig(4, 4.0))
    opt = build_optimizers(model.named_parameters(), OptimConfig.for_stage("muon"))
    assert list(opt.parts) == ["adamw"] and opt.name == "adamw"
    n_adapter = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.parts["adamw"].param_groups) == n_adapter == 7 * 2 * 2


def test_a_lora_run_asked_for_muon_trains_its_adapters_with_adamw(pretrain, tmp_path, capsys):
    base, lora = tmp_path / "base", tmp_path / "lora"
    assert main(args(pretrain, base, "--max-steps", "2")) == 0
    assert main(args(pretrain, lora, "--max-steps", "2", "--init-from", str(base), "--lora-rank", "2",
                     "--optimizer", "muon")) == 0
    assert "optimizer adamw (LoRA adapters: AdamW)" in capsys.readouterr().out
    training = loading.load(lora).training
    assert (training.optimizer_name, training.muon) == ("adamw", None)


# ---- the schedule ------------------------------------------------------------------------------------------

def test_wsd_warmup_stable_then_linear_decay():
    s = Schedule("wsd", warmup_steps=2, max_steps=10, min_ratio=0.1, decay_frac=0.4)
    assert s.decay_start == 6
    assert [s(i) for i in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1])
    assert s(50) == pytest.approx(0.1)
    longer = Schedule("wsd", warmup_steps=2, max_steps=100, min_ratio=0.1, decay_frac=0.4)
    assert [longer(i) for i in range(s.decay_start)] == [s(i) for i in range(s.decay_start)]  # M-independent
    with pytest.raises(ValueError, match="decay_frac"):
        Schedule("wsd", 1, 10, decay_frac=0.0)


# ---- exact resume ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer,schedule", [("muon", "wsd"), ("muon", "cosine"), ("adamw", "wsd")])
def test_stop_and_resume_is_bit_exact(pretrain, tmp_path, optimizer, schedule):
    flags = ("--max-steps", "12", "--optimizer", optimizer, "--schedule", schedule, "--decay-frac", "0.25")
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    assert main(opt_args(pretrain, ref, *flags)) == 0
    assert main(opt_args(pretrain, out, *flags, "--stop-after", "5")) == 0
    assert main(opt_args(pretrain, out, "--max-steps", "12", "--resume")) == 0  # the recorded choices are kept
    assert losses(out) == losses(ref) and sorted(losses(ref)) == list(range(1, 13))
    assert same_weights(ref, out)
    a, b = loading.load(ref).training, loading.load(out).training
    assert a.optimizer_name == b.optimizer_name == optimizer and a.schedule == b.schedule
    assert a.schedule["kind"] == schedule
    if optimizer == "muon":
        assert all(torch.equal(x["momentum_buffer"], y["momentum_buffer"])
                   for x, y in zip(a.muon["state"].values(), b.muon["state"].values(), strict=True))
    assert (ref / checkpoint.PRE_DECAY).is_file() == (schedule == "wsd")
    if schedule == "wsd":
        assert loading.load(ref / checkpoint.PRE_DECAY).step == 9  # 12 - round(0.25 * 12)


def test_a_checkpoint_from_before_muon_and_wsd_resumes_exactly(pretrain, tmp_path):
    """A checkpoint without ``training.optimizer_name`` / ``muon`` and with the old cosine record resumes as
    AdamW + cosine, bit-exactly."""
    ref, out = tmp_path / "ref", tmp_path / "old"
    assert main(opt_args(pretrain, ref, "--max-steps", "8", "--optimizer", "adamw")) == 0
    assert main(opt_args(pretrain, out, "--max-steps", "8", "--optimizer", "adamw", "--stop-after", "5")) == 0
    path = checkpoint.latest(out)
    payload = torch.load(path, weights_only=True)
    training = {k: v for k, v in payload["training"].items() if k not in ("optimizer_name", "muon")}
    record = training["schedule"]
    training["schedule"] = {"peak_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": record["warmup_steps"],
                            "max_steps": record["max_steps"]}  # what CosineSchedule.state_dict() wrote
    torch.save({**payload, "training": training}, path)
    assert loading.load(path, resume=True).training.optimizer_name == "adamw"
    assert main(opt_args(pretrain, out, "--max-steps", "8", "--resume")) == 0
    assert losses(out) == losses(ref) and same_weights(ref, out)


def test_resume_refuses_another_optimizer_or_schedule(pretrain, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(opt_args(pretrain, out, "--max-steps", "4", "--stop-after", "1", "--optimizer", "muon")) == 0
    assert main(opt_args(pretrain, out, "--max-steps", "4", "--resume", "--optimizer", "adamw")) == 1
    assert "trained with --optimizer muon, now adamw; a resumed run keeps its optimizer" in capsys.readouterr().err
    assert main(opt_args(pretrain, out, "--max-steps", "4", "--resume", "--schedule", "wsd")) == 1
    assert "trained with --schedule cosine, now wsd" in capsys.readouterr().err


# ---- extending a WSD run -------------------------------------------------------------------------------------

def test_extending_a_finished_wsd_run_equals_the_longer_run(pretrain, tmp_path, capsys):
    """20 steps (decay from step 16), then --resume --max-steps 40: continues from pre_decay.pt with the
    recorded warmup (1 step; a fresh 40-step run would default to 2) == a 40-step run from the start."""
    wsd = ("--optimizer", "muon", "--schedule", "wsd", "--decay-frac", "0.2", "--keep-last", "1")
    short, longer = tmp_path / "short", tmp_path / "longer"
    assert main(opt_args(pretrain, short, "--max-steps", "20", *wsd)) == 0
    finished = loading.load(short)
    assert finished.step == 20 and loading.load(short / checkpoint.PRE_DECAY).step == 16
    assert main(opt_args(pretrain, short, "--max-steps", "40", "--resume")) == 0
    assert f"resuming {short / checkpoint.PRE_DECAY} (step 16)" in capsys.readouterr().out
    assert main(opt_args(pretrain, longer, "--max-steps", "40", "--warmup-steps", "1", *wsd)) == 0
    assert losses(short) == losses(longer) and sorted(losses(short)) == list(range(1, 41))
    assert same_weights(short, longer)
    extended = loading.load(short)
    assert extended.training.schedule == {"kind": "wsd", "warmup_steps": 1, "max_steps": 40, "min_ratio": 0.1,
                                          "decay_frac": 0.2}
    assert loading.load(short / checkpoint.PRE_DECAY).step == 32  # the new decay start
    moved = loading.load(short / "decayed_20" / checkpoint.checkpoint_name(20))  # the finished 20-step model
    assert moved.step == 20 and all(torch.equal(moved.model[k], finished.model[k]) for k in finished.model)


def test_extension_refuses_a_decay_before_its_checkpoint(pretrain, tmp_path, capsys):
    out = tmp_path / "run"
    wsd = ("--schedule", "wsd", "--decay-frac", "0.5")
    assert main(opt_args(pretrain, out, "--max-steps", "10", "--stop-after", "4", *wsd)) == 0
    assert main(opt_args(pretrain, out, "--max-steps", "6", "--resume")) == 1  # decay would start at 3 < 4
    assert "--max-steps 6: its decay would start at step 3, before step 4" in capsys.readouterr().err
    assert checkpoint.latest(out).name == checkpoint.checkpoint_name(4)  # nothing moved


# ---- data parallel -------------------------------------------------------------------------------------------

def test_ddp_muon_two_processes_match_one(pretrain, tmp_path):
    """DDP averages the gradients before the step, so Muon orthogonalises the same matrix as one process."""
    common = ("--max-steps", "3", "--save-every", "0", "--batch-size", "2", "--optimizer", "muon")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(args(pretrain, single, *common, "--grad-accum", "4")) == 0
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "run.py"), *args(pretrain, ddp, *common, "--grad-accum", "2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(single), losses(ddp)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])


# ---- the defaults table ----------------------------------------------------------------------------------------

def test_table_rows_and_what_train_sh_reads():
    for stage, optimizer in defaults.OPTIMIZER.items():
        assert (stage, optimizer, "*") in defaults.TABLE and (stage, "muon", "*") in defaults.TABLE
    assert defaults.lookup("sft", "adamw", "no-such-preset") == defaults.TABLE[("sft", "adamw", "*")]
    shell = subprocess.run(["bash", "-c", 'eval "$1"; echo "$PRETRAIN_OPTIMIZER $PRETRAIN_LR $SFT_LR"', "_",
                            "\n".join(defaults.shell_lines("train.sh"))],
                           capture_output=True, text=True, check=True, env={"SFT_LR": "7e-4"}).stdout.split()
    row = defaults.lookup("pretrain", defaults.OPTIMIZER["pretrain"], "train.sh")
    assert shell == [defaults.OPTIMIZER["pretrain"], f"{row.lr:g}", "7e-4"]  # a variable already set wins
    text = (ROOT / "train.sh").read_text()
    assert "-m train.defaults --shell" in text and "PRETRAIN_LR:-" not in text  # no second copy of the numbers
