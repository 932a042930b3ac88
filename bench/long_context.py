#!/usr/bin/env python3
"""Past the trained context: held-out loss by position bucket of a model trained at a short context, run on
long documents with plain RoPE and with each RoPE scaling (``--rope-scaling`` at inference).

    python bench/long_context.py                      # train 300 steps at 128, evaluate at 1024
    python bench/long_context.py --steps 40 --rows 4  # a smoke run

Data (``--data``, default ``../shared/data``): the English pretrain files' documents (``wiki_en_demo``,
``c4_en_demo``) plus ``wiki_zh_cmrc2018``, tokenized with the shipped tokenizer. Every 5th long English
wiki document is held out whole; the held-out documents, each followed by ``<|im_end|>``, are concatenated
and cut into ``--rows`` rows of ``--eval-len`` tokens (most rows lie inside one long article, so later
positions can use far context). The model (``--hidden`` wide, ``--layers`` deep, 4 heads, 2 kv heads, rope
theta 1e6 as every tinylm preset) trains ``--steps`` AdamW steps (cosine from ``--lr``) on random windows of
``--seq-len`` tokens of the rest. Then each arm evaluates the same rows: ``none`` (plain RoPE, extrapolating
past the trained context) and ``linear`` / ``dynamic`` / ``yarn`` at factor ``eval_len / seq_len`` with the
original length ``--seq-len`` (what ``--rope-scaling TYPE:F`` gives a checkpoint trained at that seq_len).
Printed: mean next-token loss (nats) per position bucket (``[0, T)``, ``[T, 2T)``, ``[2T, 4T)``, ... with T the
trained context) and over all positions, a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.tokenizer import load_tokenizer  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from model.config import with_rope_scaling  # noqa: E402

ARMS = ("none", "linear", "dynamic", "yarn")
TRAIN_FILES = ("wiki_en_demo.jsonl", "c4_en_demo.jsonl", "wiki_zh_cmrc2018.jsonl")
HELD_OUT_EVERY = 5  # of the wiki_en_demo documents


def read_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            text = json.loads(line).get("text")
            if isinstance(text, str) and text.strip():
                texts.append(text)
    return texts


def load_tokens(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(training stream, held-out stream) of token ids; documents end with ``<|im_end|>``."""
    info = load_tokenizer(ROOT / "data" / "tokenizer" / "tokenizer.json")
    end = info.special_ids["<|im_end|>"]
    train: list[int] = []
    held: list[int] = []
    for name in TRAIN_FILES:
        for k, text in enumerate(read_texts(data / "pretrain" / name)):
            ids = info.tokenizer.encode(text, add_special_tokens=False).ids + [end]
            (held if name == "wiki_en_demo.jsonl" and k % HELD_OUT_EVERY == 0 else train).extend(ids)
    return torch.tensor(train), torch.tensor(held)


def train(cfg: ModelConfig, stream: torch.Tensor, args: argparse.Namespace) -> TinyLM:
    """``args.steps`` AdamW steps on random ``seq_len`` windows of ``stream`` (cosine LR, 5% warmup)."""
    torch.manual_seed(args.seed)
    model = TinyLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        frac = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                              max(1, args.steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = args.lr * frac
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=gen)
        rows = torch.stack([stream[s:s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(rows[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {step + 1}/{args.steps}: train loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return model.eval()


def buckets(trained: int, length: int) -> list[tuple[int, int]]:
    """[0, T), [T, 2T), [2T, 4T), ... up to ``length``."""
    out, low, high = [], 0, trained
    while low < length:
        out.append((low, min(high, length)))
        low, high = high, high * 2
    return out


@torch.no_grad()
def position_losses(model: TinyLM, rows: torch.Tensor) -> torch.Tensor:
    """Next-token loss [L - 1] at each position, averaged over the rows (two rows per forward)."""
    total = torch.zeros(rows.size(1) - 1)
    for part in rows.split(2):
        logits = model(part[:, :-1]).logits
        total += F.cross_entropy(logits.transpose(1, 2), part[:, 1:], reduction="none").sum(0)
    return total / rows.size(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128, help="the trained context (128)")
    p.add_argument("--eval-len", type=int, default=1024, help="held-out row length (1024)")
    p.add_argument("--rows", type=int, default=16, help="held-out rows (16)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    stream, held = load_tokens(args.data)
    need = args.rows * args.eval_len + 1
    if len(held) < need:
        raise SystemExit(f"bench/long_context.py: error: {len(held)} held-out tokens, {need} needed (--rows)")
    rows = held[:args.rows * args.eval_len].view(args.rows, args.eval_len)
    print(f"{len(stream):,} training tokens, {args.rows} held-out rows of {args.eval_len}", file=sys.stderr)
    cfg = ModelConfig.from_preset("small", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len)
    model = train(cfg, stream, args)
    trained_s = time.perf_counter() - start
    factor = args.eval_len / args.seq_len
    spans = buckets(args.seq_len, args.eval_len - 1)
    results = {}
    for arm in ARMS:
        scaling = None if arm == "none" else {"rope_type": arm, "factor": factor}
        scaled_cfg = with_rope_scaling(cfg, scaling, args.seq_len).override(
            {"max_position_embeddings": args.eval_len})
        scaled = TinyLM(scaled_cfg)
        scaled.load_state_dict(model.state_dict())
        losses = position_losses(scaled.eval(), rows)
        results[arm] = [losses[lo:hi].mean().item() for lo, hi in spans] + [losses.mean().item()]
    head = [f"{lo}-{hi}" for lo, hi in spans] + ["all"]
    print(f"\ntrained {args.steps} steps at seq {args.seq_len} ({cfg.num_params():,} params), evaluated at "
          f"{args.eval_len} (factor {factor:g}); train {trained_s:.0f} s, all {time.perf_counter() - start:.0f} s")
    print("\n| RoPE at inference | " + " | ".join(f"pos {h}" for h in head) + " |")
    print("|---|" + "---|" * len(head))
    for arm in ARMS:
        name = "plain (none)" if arm == "none" else f"{arm}:{factor:g}"
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in results[arm]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
