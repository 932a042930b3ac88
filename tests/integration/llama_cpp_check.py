#!/usr/bin/env python3
"""Prove a GGUF export with llama.cpp itself (through llama-cpp-python): same token ids, same logits.

    tests/integration/llama_cpp_check.sh            builds/installs llama-cpp-python if missing, then runs this
    .venv/bin/python tests/integration/llama_cpp_check.py [--ckpt RUN] [--tol 1e-3]

For each checkpoint (default: three random tiny models, tied with GQA 4:2, untied with MQA 4:1 and
another rope_theta, and a Qwen3-style one with QK-norm and head_dim 32 != 64 / 4, exported as llama.cpp's
``qwen3`` architecture; or --ckpt, e.g. a trained run), ``bin/export --format gguf --dtype f32`` is loaded
by llama.cpp with an f32 KV cache (``type_k = type_v = 0``) and ``logits_all``; then:

1. tokenization: llama.cpp's ids == our tokenizer's ids (and its detokenization gives the text back) on
   English and Chinese sample documents and on ChatML-rendered sample conversations (special tokens
   parsed, ``<think>`` included);
2. logits: llama.cpp's logits for every position of a chat-rendered prompt == ours, max abs diff < --tol;
3. the chat template and special ids stored in the file are ours.

Prints one line per check with the measured figures; exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.chat_template import CHAT_TEMPLATE, render_text  # noqa: E402
from core.tokenizer import load_tokenizer, prompt_ids  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from model.export_gguf import gguf_architecture  # noqa: E402
from train.checkpoint import Checkpoint  # noqa: E402
from train.loading import load_model  # noqa: E402

SAMPLE = ROOT / "data" / "sample"
TOKENIZER = ROOT / "data" / "tokenizer" / "tokenizer.json"


def random_checkpoint(folder: Path, seed: int, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", **overrides)
    model = TinyLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # norms near 1, matrices larger than at init: logits of a few units
            p.normal_(1.0, 0.2) if p.ndim == 1 else p.normal_(0.0, 0.15)
    Checkpoint.of(model, load_tokenizer(TOKENIZER), step=1, stage="sft").save(folder)
    return folder


def sample_texts(per_file: int = 8, max_chars: int = 1500) -> dict[str, list[str]]:
    """English / Chinese documents and ChatML-rendered conversations from data/sample."""
    def first(pattern: str, key: str) -> list:
        out = []
        for file in sorted(SAMPLE.glob(pattern)):
            lines = file.read_text(encoding="utf-8").splitlines()[:per_file]
            out += [json.loads(line)[key] for line in lines]
        return out

    chats = [render_text(c, add_generation_prompt=False)
             for c in first("sft/*.jsonl", "conversations") + first("reasoning/*.jsonl", "conversations")]
    chats += [render_text([{"role": "system", "content": "Think first."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "<think>2+2=4</think><answer>4</answer>"}], True)]
    return {"english": [t[:max_chars] for t in first("pretrain/wiki_en_demo.jsonl", "text")],
            "chinese": [t[:max_chars] for t in first("pretrain/wiki_zh_*.jsonl", "text")
                        + first("pretrain/chinese_poetry_*.jsonl", "text")],
            "chat": [c[:max_chars * 2] for c in chats]}


def check(ckpt: Path, out: Path, tol: float) -> list[str]:
    """Run every check on one checkpoint; returns the failures (printing the figures)."""
    from llama_cpp import Llama

    gguf = out / f"{ckpt.name}.gguf"
    subprocess.run([sys.executable, str(ROOT / "bin" / "export"), "--ckpt", str(ckpt), "--format", "gguf",
                    "--out", str(gguf), "--dtype", "f32", "--quiet"], check=True)
    trained = load_model(ckpt)
    tok = trained.tokenizer.tokenizer
    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, type_k=0, type_v=0,
                n_threads=2, verbose=False, seed=0)
    failures: list[str] = []
    name = f"{ckpt.name} ({trained.config.num_attention_heads}:{trained.config.num_key_value_heads} heads, "\
           f"{'tied' if trained.config.tie_word_embeddings else 'untied'}, {gguf_architecture(trained.config)})"

    # 1. tokenization
    for kind, texts in sample_texts().items():
        n_tokens, bad = 0, 0
        for text in texts:
            ours = tok.encode(text, add_special_tokens=False).ids
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            n_tokens += len(ours)
            back = llm.detokenize(theirs, special=True).decode("utf-8", errors="replace")
            if ours != theirs or back != text:
                bad += 1
                if bad == 1:
                    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                              min(len(ours), len(theirs)))
                    failures.append(f"{name}: {kind} tokenization differs at token {at}: ours {ours[at:at + 5]} vs "
                                    f"llama.cpp {theirs[at:at + 5]} in {text[:60]!r}")
        print(f"tokenize {kind:8s} {len(texts):3d} texts {n_tokens:6d} tokens: {len(texts) - bad} identical")

    # 2. logits
    turns = [{"role": "user", "content": "请介绍一下你自己。Tell me about the Trojan War."},
             {"role": "assistant", "content": "<think>好的</think>The Trojan War was fought against Troy."},
             {"role": "user", "content": "床前明月光，疑是地上霜。"}]
    ids = prompt_ids(trained.tokenizer, turns)
    with torch.no_grad():
        ours = trained.model(torch.tensor([ids])).logits[0].numpy()
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    diff = float(np.abs(theirs - ours).max())
    same_argmax = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    print(f"logits   {name}: {len(ids)} positions x {ours.shape[1]}: max abs diff {diff:.2e} (|logit| max "
          f"{np.abs(ours).max():.2f}), argmax agreement {same_argmax:.3f}")
    if not diff < tol:
        failures.append(f"{name}: llama.cpp logits differ from ours by {diff:.3e} (tolerance {tol:g})")

    # 3. metadata
    meta = llm.metadata
    if meta.get("tokenizer.chat_template") != CHAT_TEMPLATE:
        failures.append(f"{name}: chat template in the GGUF is not ours")
    if (llm.token_bos(), llm.token_eos()) != (1, 2):
        failures.append(f"{name}: bos/eos {llm.token_bos()}/{llm.token_eos()}, expected 1/2")
    template = "ours" if meta.get("tokenizer.chat_template") == CHAT_TEMPLATE else "OTHER"
    print(f"metadata {name}: general.architecture {meta.get('general.architecture')}, bos {llm.token_bos()}, "
          f"eos {llm.token_eos()}, chat template {template}, file {gguf.stat().st_size:,} bytes")
    llm.close()
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="*", help="checkpoints / run folders to check (default: three random tiny models)")
    p.add_argument("--tol", type=float, default=1e-3, help="max abs logit difference allowed (default 1e-3)")
    args = p.parse_args(argv)
    import llama_cpp

    start = time.perf_counter()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-check-") as tmp:
        tmp = Path(tmp)
        ckpts = [Path(c) for c in args.ckpt] if args.ckpt else [
            random_checkpoint(tmp / "tiny-tied-gqa", 0),
            random_checkpoint(tmp / "tiny-untied-mqa", 1, tie_word_embeddings=False, num_key_value_heads=1,
                              rope_theta=1e4),
            random_checkpoint(tmp / "tiny-qwen3-qknorm", 2, qk_norm=True, head_dim=32)]
        failures = []
        for ckpt in ckpts:
            failures += check(ckpt, tmp, args.tol)
    print(f"llama-cpp-python {llama_cpp.__version__}: {len(ckpts)} model(s) checked in "
          f"{time.perf_counter() - start:.1f} s: {'OK' if not failures else 'FAILED'}")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
