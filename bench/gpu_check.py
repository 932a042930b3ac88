#!/usr/bin/env python3
"""One prepared check of the CUDA paths (and, without a GPU, the same checks in CPU mode), printed as a table.

    bash bench/gpu_check.sh            # on a CUDA machine: budgeted at <= 6 minutes (not yet timed on one)
    bash bench/gpu_check.sh --quick    # CPU mode as CI runs it: no pytest, no DDP, tiny shapes

Checks, each one row of the table (status ok / FAIL / skip, a value, a note):
- ``env``: torch, device, bf16 support, which SDPA kernels are enabled;
- ``tests``: the CUDA-relevant pytest files (model, generation) when pytest is importable;
- ``flash_sdpa``: a plain causal attention forward + backward forced onto the flash kernel (bf16, CUDA);
- ``packed_parity``: logits of one packed row (several documents, FlexAttention ``BlockMask`` on CUDA in
  bf16, dense-mask SDPA on CPU in fp32) against each document run alone: max |diff| under a tolerance;
- ``train:<preset>:<rows>``: compiled bf16 AdamW steps (eager fp32 on CPU), tokens/s and MFU
  (``6N + 12LHQT`` FLOPs per token over the device's dense bf16 peak, see ``train.metrics.PEAK_FLOPS``);
- ``train:<moe preset>:packed``: the same for a mixture-of-experts model; ``yarn_decode``: batched KV-cache
  decode of a YaRN-scaled model past its original context (tokens/s);
- ``ddp``: 2 processes of ``train/run.py`` under torchrun (NCCL) equal 1 process with doubled accumulation;
  skipped on one GPU (said so); gloo on CPU;
- ``recipe:*``: ``RECIPE=minimind3-mini bash train.sh`` for ``--recipe-steps`` on a slice of realistic data
  (``bench/gpu_recipe.py``): tokens/s, MFU, peak memory and the loss curve of pretrain and SFT; with
  ``--minimind DIR`` (a MiniMind checkout, never part of this repository) also ``minimind:*``, MiniMind's own
  pretrain trainer on the same file for the same minutes.

Make a larger slice to carry to a device (git-ignored ``out/``):
``python bench/gpu_check.py --make-slice out/gpu_slice --from ../shared/data --mb 30``.
It uses only torch and the project (pytest optional); it runs with whatever ``python`` runs it, so a CUDA
machine's system torch works without ``.venv``. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.gpu_recipe import make_slice, recipe_rows  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from train.metrics import peak_flops  # noqa: E402

Row = tuple[str, str, str, str]  # check, status, value, note


def env_row(device: torch.device) -> Row:
    if device.type != "cuda":
        return ("env", "ok", f"torch {torch.__version__}", f"CPU mode ({os.cpu_count()} cores): no CUDA device")
    kernels = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                     ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                     ("math", torch.backends.cuda.math_sdp_enabled())) if on]
    return ("env", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}",
            f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}, bf16 "
            f"{torch.cuda.is_bf16_supported()}, sdpa kernels {'/'.join(kernels)}")


def tests_row(timeout: int) -> Row:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return ("tests", "skip", "-", "pytest is not installed here")
    files = ["tests/test_model.py", "tests/test_generate.py"]
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", *files],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ("tests", "FAIL", "-", f"{' '.join(files)} ran past {timeout} s")
    summary = [line.strip("= ") for line in proc.stdout.splitlines() if " passed" in line or " failed" in line
               or " error" in line]
    return ("tests", "ok" if proc.returncode == 0 else "FAIL", (summary or ["?"])[-1], " ".join(files))


def flash_row(device: torch.device) -> Row:
    if device.type != "cuda":
        return ("flash_sdpa", "skip", "-", "CUDA only")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(4, 8, 1024, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.float().sum().backward()
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        return ("flash_sdpa", "FAIL", "-", " ".join(str(e).split())[:120])
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    diff = (out.float() - reference).abs().max().item()
    return ("flash_sdpa", "ok" if diff < 2e-2 else "FAIL", f"max|diff| {diff:.2e} vs fp32", "bf16, causal, fwd+bwd")


def parity_row(device: torch.device, preset: str) -> Row:
    """A packed row of documents vs each document alone (the packed == unpacked proof, on this device)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig.from_preset(preset, attn_backend="flex" if cuda else "sdpa")
    torch.manual_seed(0)
    model = TinyLM(cfg).to(device).eval()
    lengths = [300, 17, 600, 107] if cuda else [40, 9, 60, 19]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)), device=device)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))[None]
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=cuda):
        packed = model(ids, doc_ids=doc_ids).logits[0]
        alone = torch.cat([model(part).logits[0] for part in torch.split(ids, lengths, dim=1)])
    diff = (packed - alone).abs().max().item()
    tolerance = 5e-2 if cuda else 1e-4  # bf16 rounding differs between one long and several short calls
    backend = "flex BlockMask, bf16" if cuda else "dense-mask sdpa, fp32"
    return ("packed_parity", "ok" if diff < tolerance else "FAIL", f"max|diff| {diff:.2e} (tol {tolerance:g})",
            f"{preset}, {len(lengths)} docs in one row of {sum(lengths)}; {backend}")


def train_row(device: torch.device, preset: str, batch: int, seq: int, packed: bool, steps: int,
              compile_model: bool) -> Row:
    """Timed optimizer steps of a fresh model: tokens/s and MFU (warm-up steps, incl. compile, untimed)."""
    cuda = device.type == "cuda"
    cfg = ModelConfig.from_preset(preset, max_position_embeddings=max(seq, 512))
    torch.manual_seed(0)
    model = TinyLM(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    step_fn: Callable = torch.compile(model) if compile_model else model
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    doc_ids = None
    if packed:  # four documents per row
        doc_ids = (torch.arange(seq, device=device) * 4 // seq).expand(batch, seq).contiguous()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = step_fn(ids[:, :-1], doc_ids=doc_ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    name = f"train:{preset}:{'packed' if packed else 'plain'}"
    try:
        start = time.perf_counter()
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    except RuntimeError as e:
        return (name, "FAIL", "-", " ".join(str(e).split())[:120])
    tokens_per_s = batch * seq * steps / seconds
    peak = peak_flops(device)
    mfu = f", MFU {tokens_per_s * cfg.flops_per_token(seq) / peak:.1%}" if peak else ""
    mode = ("compiled " if compile_model else "eager ") + ("bf16" if cuda else "fp32")
    return (name, "ok", f"{tokens_per_s:,.0f} tok/s{mfu}",
            f"{cfg.num_params() / 1e6:.1f}M params, {batch}x{seq}, {mode}, warm-up {warm:.0f} s")


def yarn_decode_row(device: torch.device, preset: str, original: int, factor: int, new_tokens: int) -> Row:
    """Batched KV-cache decode of a YaRN-scaled model past its original context: tokens/s of the decode."""
    from model.config import parse_rope_scaling, with_rope_scaling
    from model.generate import Generation

    cuda = device.type == "cuda"
    cfg = with_rope_scaling(ModelConfig.from_preset(preset), parse_rope_scaling(f"yarn:{factor}"), original)
    torch.manual_seed(0)
    model = TinyLM(cfg).to(device, torch.bfloat16 if cuda else torch.float32).eval()
    prompt_len = original * factor - new_tokens  # the decode runs past the original context
    prompts = torch.randint(0, cfg.vocab_size, (4, prompt_len)).tolist()
    name = f"yarn_decode:{preset}"
    try:
        start = time.perf_counter()
        tokens = Generation(model, prompts, max_new_tokens=new_tokens).run()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    except RuntimeError as e:
        return (name, "FAIL", "-", " ".join(str(e).split())[:120])
    made = sum(len(t) for t in tokens)
    return (name, "ok", f"{made / seconds:,.0f} tok/s", f"4 rows, prompt {prompt_len} + {new_tokens} new tokens, "
            f"yarn x{factor} over an original {original} (prefill included)")


def ddp_row(device: torch.device, timeout: int) -> Row:
    """torchrun 2 processes vs 1 process with doubled accumulation on the packed pretrain sample."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        return ("ddp", "skip", "-", f"needs 2 GPUs, this machine has {gpus}")
    backend = "nccl" if gpus >= 2 else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pretrain"
        pack = [sys.executable, str(ROOT / "preprocess" / "pack.py"), "--stage", "pretrain", "--out", str(data),
                "--seq-len", "128", "--quiet"]
        common = ["--stage", "pretrain", "--data", str(data), "--model", "tiny", "--max-steps", "4",
                  "--batch-size", "2", "--save-every", "0", "--log-every", "1", "--eval-every", "0", "--seed", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            subprocess.run(pack, cwd=ROOT, check=True, capture_output=True, timeout=timeout)
            one = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), *common, "--grad-accum", "4",
                                  "--out", f"{tmp}/one"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=timeout)
            two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  "2", str(ROOT / "train" / "run.py"), *common, "--grad-accum", "2",
                                  "--out", f"{tmp}/two"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            return ("ddp", "FAIL", "-", " ".join(str(e).split())[:120])
        if one.returncode or two.returncode:
            failed = one if one.returncode else two
            return ("ddp", "FAIL", "-", " ".join((failed.stderr.strip().splitlines() or ["?"])[-1].split())[:120])
        losses = [{r["step"]: r["loss"] for r in map(json.loads, (Path(tmp) / run / "metrics.jsonl").open())
                   if "loss" in r} for run in ("one", "two")]
    diff = max(abs(losses[0][s] - losses[1][s]) for s in losses[0])
    ok = sorted(losses[0]) == sorted(losses[1]) and diff < 1e-4
    return ("ddp", "ok" if ok else "FAIL", f"max|loss diff| {diff:.1e} over {len(losses[0])} steps",
            f"{backend}, 2 processes x accum 2 vs 1 x accum 4")


def print_table(rows: list[Row]) -> None:
    header: Row = ("check", "status", "value", "note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="no pytest run and no DDP check (CI's CPU mode)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--recipe-data", type=Path, metavar="DIR",
                   help="folder with pretrain_t2t_mini.jsonl and sft_t2t_mini.jsonl (default: from data/sample)")
    p.add_argument("--recipe-steps", default=None, metavar="P,S",
                   help="pretrain and SFT steps of the recipe rows (default 100,50 on CUDA, 4,3 on CPU)")
    p.add_argument("--minimind", type=Path, metavar="DIR", help="a MiniMind checkout: also run its pretrain trainer")
    p.add_argument("--no-recipe", action="store_true", help="skip the recipe rows")
    p.add_argument("--make-slice", type=Path, metavar="OUT",
                   help="only write a recipe slice to OUT from --from DIR (its pretrain/ and sft/ JSONL), --mb MB")
    p.add_argument("--from", dest="source", type=Path, metavar="DIR")
    p.add_argument("--mb", type=float, default=30.0)
    args = p.parse_args()
    if args.make_slice:
        if not args.source or not args.source.is_dir():
            p.error("--make-slice needs --from DIR (a folder with pretrain/ and sft/ JSONL files)")
        make_slice(args.make_slice, sorted((args.source / "pretrain").glob("*.jsonl")),
                   sorted((args.source / "sft").glob("*.jsonl")), int(args.mb * 2**20))
        print(f"slice written: {args.make_slice}")
        return 0
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    cuda = device.type == "cuda"
    rows: list[Row] = [env_row(device)]
    if not args.quick:
        rows.append(tests_row(timeout=240))
    rows.append(flash_row(device))
    rows.append(parity_row(device, "small" if cuda else "tiny"))
    if cuda:
        rows.append(train_row(device, "small", 32, 1024, packed=False, steps=20, compile_model=True))
        rows.append(train_row(device, "small", 32, 1024, packed=True, steps=20, compile_model=True))
        rows.append(train_row(device, "base", 16, 1024, packed=False, steps=20, compile_model=True))
        rows.append(train_row(device, "small-moe", 16, 1024, packed=True, steps=20, compile_model=True))
        rows.append(yarn_decode_row(device, "small", 1024, 4, 256))
    else:
        rows.append(train_row(device, "tiny", 4, 128, packed=False, steps=3, compile_model=False))
        rows.append(train_row(device, "tiny", 4, 128, packed=True, steps=3, compile_model=False))
        rows.append(train_row(device, "tiny-moe", 4, 128, packed=True, steps=3, compile_model=False))
        rows.append(yarn_decode_row(device, "tiny", 64, 4, 16))
    if not args.quick:
        rows.append(ddp_row(device, timeout=300))
    if not args.no_recipe:
        steps = tuple(int(x) for x in (args.recipe_steps or ("100,50" if cuda else "4,3")).split(","))
        with tempfile.TemporaryDirectory() as work:
            rows += recipe_rows(cuda, args.recipe_data, args.minimind, Path(work), (steps[0], steps[1]),
                                timeout=420 if cuda else 300)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("check", "status", "value", "note"), r, strict=True))
                                         for r in rows], indent=2) + "\n")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
