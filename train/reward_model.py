"""Rewards from a model (``--reward-model DIR[@W]``): a transformers sequence-classification reward model
(``AutoModelForSequenceClassification`` with one label, its own tokenizer and chat template) scoring
(prompt, completion) pairs, as a reward function in TRL's convention (``train/rewards.py``).

Contract. :func:`parse_spec` reads ``DIR[@W]`` and checks the folder's ``config.json`` names a
``...ForSequenceClassification`` architecture with one label (anything else is one line naming the folder);
:func:`load_reward_model` loads it once, frozen (``requires_grad`` off), in eval mode, on the run's device,
in bfloat16 on a GPU (float32 otherwise); ``trust_remote_code`` only when asked (``--trust-remote-code``).
A pair is the prompt's turns (role and content) plus one assistant turn holding the completion's text (the
assistant messages' contents joined: tool turns are context the reward model does not see), rendered by
the reward model's own chat template; pairs are scored in batches of ``batch_size`` (right padding; the
model reads the last real token), each score the single logit as a float. The forward runs where
rewards are scored: after the rollouts, before the policy's training forward. Normalisation
(``--reward-norm``): ``none`` (the raw score) or ``sigmoid`` (into (0, 1)); both are per completion, so a
completion's reward never depends on the batch it was scored in (a z-score over a batch would).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.rewards import Reward, RewardError, split_weight

NORMS = ("none", "sigmoid")
BATCH_SIZE = 8


class RewardModelError(RewardError):
    """A --reward-model folder that cannot serve as a reward model: one line naming it."""


@dataclass(frozen=True)
class RewardModelSpec:
    path: Path
    weight: float
    spec: str


def parse_spec(spec: str) -> RewardModelSpec:
    """``DIR[@W]`` checked: a folder whose config.json names a one-label sequence classifier."""
    target, weight = split_weight(spec)
    path = Path(target)
    config = path / "config.json"
    if not config.is_file():
        raise RewardModelError(f"--reward-model {spec}: {path} has no config.json (a transformers model folder)")
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RewardModelError(f"--reward-model {spec}: {config} is not readable JSON ({e})") from None
    architectures = values.get("architectures") if isinstance(values, dict) else None
    if not isinstance(architectures, list) or not any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                                      for a in architectures):
        raise RewardModelError(f"--reward-model {spec}: {path} is not a sequence classifier (architectures "
                               f"{architectures}; a reward model is ...ForSequenceClassification with one label)")
    labels = values.get("num_labels", len(values.get("id2label") or {}) or 2)
    if labels != 1:
        raise RewardModelError(f"--reward-model {spec}: {path} has {labels} labels; a reward model has one score")
    return RewardModelSpec(path, weight, spec)


def completion_text(completion: Any) -> str:
    """The text a reward model scores: a string, or the assistant messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict) and m.get("role") == "assistant")


class RewardModel:
    """A loaded reward model; call it like a reward function (``prompts``, ``completions``, columns ignored)."""

    def __init__(self, spec: RewardModelSpec, device: torch.device | str, trust_remote_code: bool = False,
                 norm: str = "none", batch_size: int = BATCH_SIZE) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        if norm not in NORMS:
            raise RewardModelError(f"--reward-norm is one of {', '.join(NORMS)}, got {norm!r}")
        self.spec, self.norm, self.batch_size = spec, norm, batch_size
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(spec.path, torch_dtype=dtype,
                                                                       trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001  (transformers' many errors: missing files, remote code refused, ...)
            hint = "; it ships its own code: add --trust-remote-code" if "trust_remote_code" in str(e) else ""
            raise RewardModelError(f"--reward-model {spec.spec}: loading {spec.path} failed "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]}){hint}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise RewardModelError(f"--reward-model {spec.spec}: the tokenizer of {spec.path} has no chat template")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.__name__ = f"rm_{spec.path.name}"

    def texts(self, prompts: Sequence[list[dict]], completions: Sequence[Any]) -> list[str]:
        """The (prompt, completion) pairs rendered by the reward model's chat template."""
        out = []
        for turns, completion in zip(prompts, completions, strict=True):
            chat = [{"role": t["role"], "content": t.get("content") or ""} for t in turns]
            chat.append({"role": "assistant", "content": completion_text(completion)})
            out.append(self.tokenizer.apply_chat_template(chat, tokenize=False))
        return out

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> list[float]:
        """The raw score (the one logit) of each text, in batches."""
        out: list[float] = []
        for lo in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[lo:lo + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, add_special_tokens=False).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        raw = self.scores(self.texts(prompts, completions))
        if self.norm == "sigmoid":
            return [1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x)) for x in raw]
        return raw


def reward_models(specs: Sequence[str], device: torch.device | str, trust_remote_code: bool = False,
                  norm: str = "none") -> list[Reward]:
    """The ``--reward-model`` specs loaded as rewards (log names ``rm_<folder>``)."""
    out = []
    for spec in specs:
        model = RewardModel(parse_spec(spec), device, trust_remote_code, norm)
        out.append(Reward(model.__name__, model, model.spec.weight, f"reward-model:{spec}"))
    return out
