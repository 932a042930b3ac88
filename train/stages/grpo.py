"""Reinforcement learning with verifiable rewards (GRPO family): batches are the policy's own rollouts
(``train/rollout.py``), scored by reward functions (``train/rewards.py``); the loop (``train/loop.py``) is
every stage's.

Per completion token t of sample i (loss weight m = 1, see ``train/rollout.py`` "Rows"), with
``logp = log pi(y_t)`` under ``softmax(logits / T)`` (T = ``--rollout-temperature``, the distribution the
tokens were drawn from), ``old`` the log-prob when the rollout was generated (= ``logp.detach()`` unless
``--rollout-reuse`` > 1), ``rho = exp(logp - old)`` and the group-relative advantage A_i::

    dapo / grpo / dr_grpo:  l = -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)
    cispo:                  l = -detach(min(rho, 1 + eps_high)) * A * logp
    + kl_coef * k3,  k3 = exp(ref - logp) - (ref - logp) - 1   (ref: the frozen --init-from model)

and the step loss (summed over micro-batches and ranks, the loss contract of ``base.py``), N = completion
tokens of the whole step, S = completions of the step (P x G), L = ``--max-new-tokens``::

    dapo, cispo:  sum(l * m) / N                 (token level over the whole step; TRL's default)
    grpo:         sum_i (sum_t l * m / |m_i|) / S  (per-sequence mean, then the mean)
    dr_grpo:      sum(l * m) / (S * L)

Metrics (token means over the step): ``kl`` (k3, only with a reference), ``clip_frac`` (tokens whose
clipped term is the active one: rho outside the range in the direction A pushes; cispo: rho > 1 + eps_high),
``entropy`` (of softmax(logits / T)). Rollout statistics come from :class:`~train.rollout.RolloutLoader`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.head import chunked, head_logits
from train import loading
from train.checkpoint import Checkpoint, SourceRecord
from train.data import Split
from train.passk import PassConfig, pass_metrics, pass_sums
from train.prompt_set import PromptSet
from train.rewards import load_rewards
from train.rollout import ROLLOUT_DTYPES, EvalChunk, RolloutBatch, RolloutConfig, RolloutLoader
from train.stages.base import Stage, StageContext, StageError, StepNorm, Supervised, supervised_forward
from train.weights import state_fingerprint, unwrap

LOSSES = ("dapo", "dr_grpo", "grpo", "cispo")
SCALES = ("group", "none")
DEFAULTS: dict[str, Any] = {"group_size": 8, "prompts_per_step": 8, "max_new_tokens": 256, "rollout_temperature": 1.0,
                            "rollout_top_k": None, "loss": "dapo", "rollout_reuse": 1, "epsilon": 0.2,
                            "epsilon_high": None, "kl_coef": 0.0, "scale_rewards": "group", "mask_truncated": False,
                            "pass_k": None, "success_threshold": 1.0, "rollout_dtype": "float32"}


def _logps(hidden: Tensor, targets: Tensor, weight: Tensor, temperature: float) -> Tensor:
    logits = head_logits(hidden, weight)
    return -F.cross_entropy(logits / temperature if temperature > 0 else logits, targets, reduction="none")


def _entropy(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    logp = torch.log_softmax(head_logits(hidden, weight) / (temperature if temperature > 0 else 1.0), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logps(sup: Supervised, targets: Tensor, temperature: float) -> Tensor:
    """[B, T] float32 log-probabilities of ``targets`` under ``softmax(logits / temperature)`` at the
    supervised (completion) positions, 0 elsewhere; the head runs there only, chunked (``model/head.py``)."""
    fn = partial(_logps, temperature=temperature)
    return sup.per_position(chunked(fn, (sup.head.hidden, sup.selected(targets)), (sup.head.weight,)))


def token_entropy(sup: Supervised, temperature: float) -> Tensor:
    """[B, T] entropy (nats) of ``softmax(logits / temperature)`` at the supervised positions, without gradient."""
    with torch.no_grad():
        fn = partial(_entropy, temperature=temperature)
        return sup.per_position(chunked(fn, (sup.head.hidden.detach(),), (sup.head.weight.detach(),)))


class GRPOStage(Stage[RolloutBatch, EvalChunk]):
    """On-policy RL from prompts and reward functions (see the module docstring)."""

    name = "grpo"
    dataset_stages = ("prompts",)
    rollouts = True
    options = ("reward", *DEFAULTS, "eval_prompts")

    def __init__(self, byte_lengths: Tensor | None = None, reward: list[str] | None = None,
                 eval_prompts: str | Path | None = None, **options: Any):
        super().__init__(byte_lengths)
        o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        self.o = o
        self.check_options(o)
        self.rewards = load_rewards(reward or [])
        self.eps, self.eps_high = float(o["epsilon"]), float(o["epsilon_high"] if o["epsilon_high"] is not None
                                                              else o["epsilon"])
        self.kl_coef, self.loss_type = float(o["kl_coef"]), o["loss"]
        self.temperature = float(o["rollout_temperature"])
        self.eval_path = eval_prompts
        self.pass_cfg = PassConfig(o["group_size"], o["pass_k"] or o["group_size"], float(o["success_threshold"]))
        self.model: nn.Module | None = None
        self.ref_model: nn.Module | None = None
        self.reference: SourceRecord | None = None
        self.tok = None
        self.eval_set: PromptSet | None = None
        self.seed = 0  # the run's --seed (given to loader()): rollout and evaluation sample seeds derive from it

    @staticmethod
    def check_options(o: dict[str, Any]) -> None:
        """Each option in its range (StageError, one line naming the flag)."""
        for key, low in (("group_size", 2), ("prompts_per_step", 1), ("max_new_tokens", 1), ("rollout_reuse", 1)):
            if int(o[key]) < low:
                raise StageError(f"--{key.replace('_', '-')} must be >= {low}, got {o[key]}")
        if o["loss"] not in LOSSES or o["scale_rewards"] not in SCALES:
            raise StageError(f"--loss is one of {', '.join(LOSSES)}; --scale-rewards one of {', '.join(SCALES)}")
        if not o["rollout_temperature"] > 0:
            raise StageError("--rollout-temperature must be > 0 (the policy is the sampling distribution)")
        if o["rollout_top_k"] is not None and int(o["rollout_top_k"]) < 1:
            raise StageError("--rollout-top-k must be >= 1")
        for key in ("epsilon", "epsilon_high", "kl_coef"):
            if o[key] is not None and not float(o[key]) >= 0:
                raise StageError(f"--{key.replace('_', '-')} must be >= 0, got {o[key]}")
        if o["rollout_dtype"] not in ROLLOUT_DTYPES:
            raise StageError(f"--rollout-dtype is one of {', '.join(ROLLOUT_DTYPES)}, got {o['rollout_dtype']}")
        if o["pass_k"] is not None and not 1 <= int(o["pass_k"]) <= int(o["group_size"]):
            raise StageError(f"--pass-k must be in [1, --group-size {o['group_size']}], got {o['pass_k']}")

    # ---- data ----------------------------------------------------------------------------------------------
    def open_dataset(self, folder: str, tokenizer_fingerprint: str | None = None, verify: bool = True) -> PromptSet:
        """The ``--prompts`` file, every record validated (tokenized later, by :meth:`attach_source`)."""
        prompts = PromptSet(folder)
        if self.eval_path is not None:
            self.eval_set = PromptSet(self.eval_path)
        return prompts

    def attach_source(self, dataset: PromptSet, source: Checkpoint) -> None:
        """Tokenize the prompts (and evaluation prompts) with the tokenizer of the model being trained."""
        self.tok = loading.find_tokenizer(source)
        limit = source.model_config.max_position_embeddings
        dataset.attach(self.tok, int(self.o["max_new_tokens"]), limit)
        if self.eval_set is not None:
            self.eval_set.attach(self.tok, int(self.o["max_new_tokens"]), limit)

    def rollout_config(self, seed: int) -> RolloutConfig:
        o = self.o
        return RolloutConfig(int(o["group_size"]), int(o["prompts_per_step"]), int(o["max_new_tokens"]),
                             self.temperature, None if o["rollout_top_k"] is None else int(o["rollout_top_k"]),
                             int(o["rollout_reuse"]), o["scale_rewards"], bool(o["mask_truncated"]), seed,
                             ROLLOUT_DTYPES[o["rollout_dtype"]])

    def loader(self, split: Split[PromptSet], micro_batch: int, rank: int, world: int, seed: int,
               pin_memory: bool) -> RolloutLoader:
        if self.model is None or self.tok is None:
            raise StageError("--stage grpo: setup() was not run before the loader was built")
        self.seed = seed
        return RolloutLoader(split, self.model, self.tok, self.rewards, self.rollout_config(seed), rank, world,
                             self.annotate, self.eval_set)

    # ---- models ----------------------------------------------------------------------------------------------
    def setup(self, ctx: StageContext) -> None:
        """Keep the policy (for rollouts); load the frozen reference when there is a KL term."""
        super().setup(ctx)
        self.model = ctx.model
        if ctx.resume is not None:
            self.check_same_options(ctx.resume)
        if self.kl_coef > 0:
            self._load_reference(ctx)
        ctx.say(f"grpo: {self.o['prompts_per_step']} prompts x {self.o['group_size']} samples per step, loss "
                f"{self.loss_type}, rewards {', '.join(f'{r.name}@{r.weight:g}' for r in self.rewards)}, kl_coef "
                f"{self.kl_coef:g}, reuse {self.o['rollout_reuse']}")

    def _load_reference(self, ctx: StageContext) -> None:
        """The --init-from model (on resume: the recorded reference, checked by its weights' fingerprint)."""
        if ctx.resume is not None and ctx.resume.reference is not None:
            self.reference = ctx.resume.reference
            ref = loading.load(self.reference.path, options=loading.SourceOptions(ctx.resume.model_config))
            if state_fingerprint(ref.model) != self.reference.fingerprint:
                raise StageError(f"{ref.path}: the reference of this run has changed since it started (weights "
                                 f"fingerprint {self.reference.fingerprint[:12]} expected)")
        elif ctx.init is not None:
            ref = ctx.init
            self.reference = ref.source_record()
        else:
            raise StageError("--kl-coef needs the reference model: --init-from CKPT")
        self.ref_model = loading.frozen_model(ref)

    def check_same_options(self, resume: Checkpoint) -> None:
        """A resumed run draws and scores rollouts as it started: its RL options must be the recorded ones."""
        now, old = self.checkpoint_fields()["stage_options"], resume.stage_options
        changed = [k for k in now if k in old and now[k] != old[k]]
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')} was {old[k]!r}, now {now[k]!r}" for k in changed)
            raise StageError(f"{resume.path}: {what}; a resumed RL run keeps its options: give the same flags or "
                             "choose another --out")

    def extra_models(self) -> dict[str, nn.Module]:
        return {"reference": self.ref_model} if self.ref_model is not None else {}

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"reference": self.reference,
                "stage_options": {**self.o, "reward": [r.spec for r in self.rewards],
                                  "eval_prompts": None if self.eval_path is None else str(self.eval_path)}}

    @torch.no_grad()
    def annotate(self, batch: RolloutBatch) -> None:
        """At rollout time: the old policy's per-token log-probs (only with reuse > 1) and the reference's
        (only with a KL term), computed in eval mode on the rollout's device, kept on the CPU."""
        models = {}
        if int(self.o["rollout_reuse"]) > 1:
            models["old_token_logps"] = self.model
        if self.ref_model is not None:
            models["ref_token_logps"] = self.ref_model
        for name, model in models.items():
            was = model.training
            model.eval()
            device = next(model.parameters()).device
            on = batch.to(device)
            setattr(batch, name, token_logps(supervised_forward(model, on), on.targets, self.temperature).cpu())
            model.train(was)

    # ---- objective ---------------------------------------------------------------------------------------------
    def objective(self, sup: Supervised, batch: RolloutBatch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """The step loss of the module docstring, and its token-mean metrics."""
        loss, metrics = self.token_loss(sup, batch)
        m = batch.weights
        samples = float(self.o["prompts_per_step"] * self.o["group_size"])
        if self.loss_type == "grpo":
            total = ((loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / samples
        elif self.loss_type == "dr_grpo":
            total = (loss * m).sum() / (samples * float(self.o["max_new_tokens"]))
        else:
            total = (loss * m).sum() / norm.tokens
        return total, {k: ((v * m).sum() / norm.tokens).detach() for k, v in metrics.items()}

    def token_loss(self, sup: Supervised, batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token loss l [B, T] and per-token metric values (kl, clip_frac, entropy)."""
        logp = token_logps(sup, batch.targets, self.temperature)
        old = batch.old_token_logps if batch.old_token_logps is not None else logp.detach()
        adv = batch.advantages[:, None].to(logp.dtype)
        ratio = torch.exp(logp - old)
        if self.loss_type == "cispo":
            loss = -torch.clamp(ratio, max=1.0 + self.eps_high).detach() * adv * logp
            clipped = ratio > 1.0 + self.eps_high
        else:
            loss = -torch.min(ratio * adv, torch.clamp(ratio, 1.0 - self.eps, 1.0 + self.eps_high) * adv)
            clipped = ((ratio < 1.0 - self.eps) & (adv < 0)) | ((ratio > 1.0 + self.eps_high) & (adv > 0))
        metrics = {"clip_frac": clipped.float(), "entropy": token_entropy(sup, self.temperature)}
        if batch.ref_token_logps is not None:
            d = batch.ref_token_logps - logp
            kl = torch.exp(d) - d - 1.0
            loss = loss + self.kl_coef * kl
            metrics["kl"] = kl.detach()
        return loss, metrics

    # ---- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: EvalChunk) -> dict[str, Tensor]:
        return pass_sums(unwrap(model), self.eval_set, batch.indices, self.tok, self.rewards,
                         self.rollout_config(self.seed), self.pass_cfg)

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return pass_metrics(sums, self.pass_cfg.k)
