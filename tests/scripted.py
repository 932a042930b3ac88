"""Checkpoints for the chat/serve tests, written in milliseconds instead of trained.

``scripted_checkpoint``: a tiny untied model whose greedy answer to any ChatML prompt is exactly
SCRIPTED_ANSWER (English, CJK, and 鬱, a character the shipped tokenizer splits across two byte tokens),
then ``<|im_end|>``. Construction: o_proj and down_proj are zero, so the final hidden state is the
embedding of the last token; 64 chosen tokens get one-hot embeddings (all others zero), and
``lm_head[next] = e[current]`` encodes the chain  "\\n" (end of the generation prompt) -> answer -> <|im_end|>.
A token outside the chain has zero logits everywhere, so greedy picks id 0 (<|endoftext|>) and stops.

``random_checkpoint``: the tiny preset with random weights (wide init, so outputs vary with context).
Both record the shipped tokenizer (path + fingerprint) as a training run would.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from train.checkpoint import Checkpoint

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer"
SCRIPTED_ANSWER = "Hello 你好，鬱世界！"


def _save(model: TinyLM, folder: Path) -> Path:
    info = load_tokenizer(TOKENIZER)
    return Checkpoint.of(model, info, step=1, stage="sft").save(folder)


def scripted_checkpoint(folder: Path) -> Path:
    info = load_tokenizer(TOKENIZER)
    tok = info.tokenizer
    chain = [tok.token_to_id("Ċ"), *tok.encode(SCRIPTED_ANSWER, add_special_tokens=False).ids,
             info.special_ids["<|im_end|>"]]
    assert len(set(chain)) == len(chain), "the scripted chain must not repeat a token"
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny", tie_word_embeddings=False))
    h = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                p.zero_()
        for slot, (cur, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
            assert slot < h
            model.model.embed_tokens.weight[cur, slot] = 1.0
            model.lm_head.weight[nxt, slot] = 1.0
    return _save(model, folder)


def random_checkpoint(folder: Path, preset: str = "tiny") -> Path:
    torch.manual_seed(0)
    return _save(TinyLM(ModelConfig.from_preset(preset, initializer_range=0.3)), folder)
