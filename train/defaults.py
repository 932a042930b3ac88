"""The defaults table: per stage x optimizer (x preset), the learning rates, warmup and weight decay that
``train/run.py`` uses when a flag is not given, that ``--help`` prints, and that ``train.sh`` reads
(``python -m train.defaults --shell``); also each stage's default optimizer and the schedule's defaults.
No other module states these numbers.

Lookup: the row ``(stage, optimizer, preset)``, else ``(stage, optimizer, "*")``. ``preset`` is the
``--model`` name (``train.sh`` asks for its own model, ``hidden_size=256 num_hidden_layers=4`` of ``small``,
as preset ``train.sh``). ``measured`` says where a row's numbers come from: ``bench/learning.py --sweep``
(held-out loss of ``bin/eval`` after a fixed number of steps, i.e. at equal tokens), or ``carried`` (not
swept).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    lr: float  # AdamW peak LR (under muon: the AdamW part's: embeddings, head, norms)
    muon_lr: float  # Muon peak LR (hidden matrices; unused by adamw)
    weight_decay: float = 0.1  # AdamW decoupled decay of matrices
    muon_weight_decay: float = 0.0
    muon_momentum: float = 0.95
    warmup_frac: float = 0.05  # warmup steps = max(1, int(warmup_frac * max_steps))
    measured: str = "carried"


# the default --optimizer of each stage. Pretraining: Muon, chosen by bench/learning.py at equal wall-clock;
# fine-tuning stages keep AdamW (the sweep: SFT on Muon was behind).
OPTIMIZER = {"pretrain": "muon", "sft": "adamw", "reason": "adamw", "dpo": "adamw", "distill": "adamw",
             "grpo": "adamw", "ppo": "adamw"}
SCHEDULE = "cosine"
DECAY_FRAC = 0.2  # wsd: the fraction of --max-steps that decays

TABLE: dict[tuple[str, str, str], Row] = {
    ("pretrain", "adamw", "*"): Row(5e-4, 0.02),
    ("pretrain", "muon", "*"): Row(5e-4, 0.02, measured="muon_lr from the train.sh sweep"),
    ("sft", "adamw", "*"): Row(2e-4, 0.01),
    ("sft", "muon", "*"): Row(2e-4, 0.01),
    ("reason", "adamw", "*"): Row(2e-4, 0.01),
    ("reason", "muon", "*"): Row(2e-4, 0.01),
    ("dpo", "adamw", "*"): Row(1e-5, 4e-4),  # small steps: the policy should stay near the reference
    ("dpo", "muon", "*"): Row(1e-5, 4e-4),
    ("distill", "adamw", "*"): Row(2e-4, 0.01),
    ("distill", "muon", "*"): Row(2e-4, 0.01),
    ("grpo", "adamw", "*"): Row(1e-5, 4e-4),  # on-policy RL: small steps, as dpo
    ("grpo", "muon", "*"): Row(1e-5, 4e-4),
    ("ppo", "adamw", "*"): Row(1e-5, 4e-4),  # as grpo
    ("ppo", "muon", "*"): Row(1e-5, 4e-4),
    ("pretrain", "adamw", "train.sh"): Row(2e-3, 0.02, measured="sweep: best of lr 1e-3 / 2e-3 / 4e-3"),
    ("pretrain", "muon", "train.sh"): Row(2e-3, 0.02, measured="sweep: best of muon_lr 0.02 / 0.04"),
    ("sft", "adamw", "train.sh"): Row(2e-3, 0.01, measured="sweep: best of lr 1e-3 / 2e-3 (and of muon)"),
    ("sft", "muon", "train.sh"): Row(1e-3, 0.02, measured="sweep: muon_lr 0.02, behind adamw 2e-3"),
    ("pretrain", "adamw", "small"): Row(1e-3, 0.02, measured="small sweep: best of lr 5e-4 / 1e-3 / 2e-3"),
    ("pretrain", "muon", "small"): Row(2e-3, 0.02, measured="small sweep: muon_lr 0.02 = 0.04, AdamW part 2e-3"),
    ("sft", "adamw", "small"): Row(2e-3, 0.01, measured="small sweep: best of lr 2e-4 / 1e-3 / 2e-3"),
    # GPU recipes (train.sh RECIPE=...): MiniMind's published trainer settings and nanochat's Muon rate, not yet
    # measured by tinylm on a GPU. MiniMind trains SFT on padded rows of one conversation; tinylm packs 32 rows
    # of several conversations per step (~5x the supervised tokens), hence twice MiniMind-3's SFT rate.
    ("pretrain", "muon", "minimind3-mini"): Row(5e-4, 0.02, measured="GPU, unmeasured: MiniMind-3 lr 5e-4 + nanochat "
                                                                     "matrix_lr 0.02"),
    ("pretrain", "adamw", "minimind3-mini"): Row(5e-4, 0.02, measured="GPU, unmeasured: MiniMind-3 train_pretrain lr"),
    ("sft", "adamw", "minimind3-mini"): Row(2e-5, 0.01, measured="GPU, unmeasured: 2 x MiniMind-3 full_sft lr 1e-5"),
    ("pretrain", "muon", "minimind2-small"): Row(5e-4, 0.02, measured="GPU, unmeasured: MiniMind2 lr 5e-4 + nanochat "
                                                                      "matrix_lr 0.02"),
    ("pretrain", "adamw", "minimind2-small"): Row(5e-4, 0.02, measured="GPU, unmeasured: MiniMind2 train_pretrain lr"),
    ("sft", "adamw", "minimind2-small"): Row(2e-5, 0.01, measured="GPU, unmeasured: as minimind3-mini (MiniMind2 "
                                                                  "used 5e-7)"),
    ("pretrain", "adamw", "tiny"): Row(3e-3, 0.02),  # train.sh --smoke
    ("pretrain", "muon", "tiny"): Row(3e-3, 0.02),
    ("sft", "adamw", "tiny"): Row(3e-3, 0.02),
    ("sft", "muon", "tiny"): Row(3e-3, 0.02),
}


def lookup(stage: str, optimizer: str, preset: str | None = None) -> Row:
    """The row for ``(stage, optimizer, preset)``, else its ``"*"`` row (KeyError: no row for the stage)."""
    return TABLE.get((stage, optimizer, preset or "*")) or TABLE[(stage, optimizer, "*")]


def _num(x: float) -> str:
    return f"{x:g}"


def table_text() -> str:
    """The table as aligned text lines (for ``train/run.py --help``)."""
    head = ("stage", "optimizer", "preset", "lr", "muon_lr", "wd", "muon_wd", "momentum", "warmup", "measured")
    rows = [head] + [(s, o, p, _num(r.lr), _num(r.muon_lr) if o == "muon" else "-", _num(r.weight_decay),
                      _num(r.muon_weight_decay) if o == "muon" else "-", _num(r.muon_momentum) if o == "muon" else "-",
                      f"{r.warmup_frac:.0%}", r.measured) for (s, o, p), r in TABLE.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def shell_lines(preset: str) -> list[str]:
    """``: "${PRETRAIN_OPTIMIZER:=muon}"``-style lines for train.sh (a variable already set wins)."""
    out = []
    for stage in ("pretrain", "sft"):
        optimizer = OPTIMIZER[stage]
        row = lookup(stage, optimizer, preset)
        prefix = stage.upper()
        muon_lr = lookup(stage, "muon", preset).muon_lr  # what --optimizer muon would use
        for key, value in (("OPTIMIZER", optimizer), ("LR", _num(row.lr)), ("MUON_LR", _num(muon_lr)),
                           ("SCHEDULE", SCHEDULE)):
            out.append(f': "${{{prefix}_{key}:={value}}}"')
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.defaults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shell", metavar="PRESET", help="print train.sh's assignments for this preset")
    args = p.parse_args(argv)
    print("\n".join(shell_lines(args.shell)) if args.shell else table_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
