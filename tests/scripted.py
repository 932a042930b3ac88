"""Checkpoints for the chat/serve tests, written directly instead of trained.

``scripted_checkpoint``: a tiny untied model whose greedy answer to any ChatML prompt is exactly
SCRIPTED_ANSWER (English, CJK, and 鬱, a character the shipped tokenizer splits across two byte tokens),
then ``<|im_end|>``. Construction: o_proj and down_proj are zero, so the final hidden state is the
embedding of the last token; 64 chosen tokens get one-hot embeddings (all others zero), and
``lm_head[next] = e[current]`` encodes the chain  "\\n" (end of the generation prompt) -> answer -> <|im_end|>.
A token outside the chain has zero logits everywhere, so greedy picks id 0 (<|endoftext|>) and stops.

``random_checkpoint``: the tiny preset with random weights (wide init, so outputs vary with context).
Both record the shipped tokenizer (path + fingerprint) as a training run would.

``ScriptedLM``: a stand-in model (no checkpoint) for completions a one-hot chain cannot spell (JSON repeats
tokens): it plays a script chosen by what the prompt contains, so a test can make the server or bin/chat
see any completion, e.g. a tool call first and, once the prompt holds the tool's result, the answer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from core.tokenizer import TokenizerInfo, load_tokenizer
from model import ModelConfig, TinyLM
from model.transformer import ModelOutput
from train.checkpoint import Checkpoint

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer"
SCRIPTED_ANSWER = "Hello 你好，鬱世界！"

# ScriptedLM scripts for thinking and tool calls (first matching needle in the prompt's text wins)
REASONING = "The user wants a sum; I will use the calculator."
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
BROKEN = '<tool_call>\n{"name": "calculator", "arguments": {2+3}}\n</tool_call>'
TOOL_SCRIPTS = [
    ("<tool_response>\n5\n</tool_response>", "2 + 3 = 5."),  # once the tool's result is in the prompt
    ("broken please", "Let me try. " + BROKEN),
    ("weather please", '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call>'),
    ('assistant\n<tool_call>\n{"name": "calculator", "arguments": ', '{"expression": "7*6"}}\n</tool_call>'),
    ("assistant\n<tool_call>\n", '{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'),
    ("assistant\n<think>\n\n</think>\n\n", "Plain answer."),
    ("assistant\n<think>\n", "I think.\n</think>\n\nDone."),
    ("", f"<think>\n{REASONING}\n</think>\n\n{CALL}"),
]


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


class ScriptedLM(nn.Module):
    """Greedy decoding of this "model" yields exactly one script's ids, then ``<|im_end|>``.

    ``scripts`` is ``[(needle, completion), ...]``: the first whose needle occurs in the prompt's text (decoded
    with its control tokens; "" always matches) is played. Completions are encoded with the full tokenizer, so
    tags it has as single ids come out as those ids, as from a trained model; ``literal=True`` encodes them as
    ordinary text pieces instead (a model that writes a tag's characters: it must not forge structure).
    The prompt is recognised at the
    prefill (an empty KV cache); each later call is one step.
    ``prompts`` records every prompt's ids.
    """

    def __init__(self, info: TokenizerInfo, scripts: list[tuple[str, str]], literal: bool = False) -> None:
        super().__init__()
        self.config = ModelConfig.from_preset("tiny")
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter: callers read the device and dtype from it
        self.info, self.end = info, info.special_ids["<|im_end|>"]
        encoder = info.literal if literal else info.tokenizer
        self.scripts = [(needle, encoder.encode(text, add_special_tokens=False).ids) for needle, text in scripts]
        self.script: list[int] = []
        self.prompt_len = 0
        self.prompts: list[list[int]] = []

    def forward(self, input_ids: Tensor, cache, **_) -> ModelOutput:
        """Logits [B, 1, V] one-hot on the script's next id (needs the KV cache Generation uses)."""
        b, t = input_ids.shape
        if cache.length == 0:
            self._start(input_ids[0].tolist())
        step = cache.length + t - self.prompt_len
        cache.length += t
        logits = torch.zeros(b, 1, self.config.vocab_size)
        logits[:, -1, self.script[step] if step < len(self.script) else self.end] = 1.0
        return ModelOutput(logits, torch.zeros(()))

    def _start(self, prompt: list[int]) -> None:
        text = self.info.tokenizer.decode(prompt, skip_special_tokens=False)
        self.script = next(ids for needle, ids in self.scripts if needle in text)
        self.prompt_len = len(prompt)
        self.prompts.append(prompt)
