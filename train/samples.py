"""Answers to a few fixed prompts during a run (``--sample-every N``), so a person sees what the model says as it
trains: greedy, at most ``MAX_NEW_TOKENS`` new tokens, rank 0 only, the model's mode restored after.

A chat stage (sft, reason, dpo, distill, grpo) renders each prompt as a user turn through the tokenizer's chat
family and decodes until ``<|im_end|>``; pretrain continues the prompt as plain text until ``<|endoftext|>``.
Records go to ``metrics.jsonl`` as ``{"step": N, "samples": [{"prompt": str, "answer": str}, ...]}``
(``bin/report`` shows them). The prompts are literal text: nothing in them becomes a control token.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from core.tokenizer import TokenizerInfo, prompt_ids
from model.generate import Generation

PROMPTS = ("请介绍一下你自己。", "What is 12 + 7?", "用一句话介绍长城。")
MAX_NEW_TOKENS = 48
Sampler = Callable[[nn.Module], list[dict]]


def make_sampler(tok: TokenizerInfo, chat: bool, prompts: tuple[str, ...] = PROMPTS,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> Sampler:
    """A function of the model that answers ``prompts`` (see the module contract)."""
    if chat:
        ids = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in prompts]
        stop = tok.special_ids["<|im_end|>"]
    else:
        ids = [tok.literal.encode(p, add_special_tokens=False).ids for p in prompts]
        stop = tok.special_ids["<|endoftext|>"]

    def sample(model: nn.Module) -> list[dict]:
        tokens = Generation(model, ids, max_new_tokens=max_new_tokens, stop_ids=[stop]).run()
        return [{"prompt": p, "answer": tok.tokenizer.decode([t for t in row if t != stop], skip_special_tokens=False)}
                for p, row in zip(prompts, tokens, strict=True)]

    return sample
