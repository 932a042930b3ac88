"""What the RL stages (``grpo``, ``ppo``) share: their rollout, reward, tool and evaluation flags
(:class:`RLOptions`) and a stage base over rollouts (:class:`RolloutStage`).

A :class:`RolloutStage` reads ``--prompts`` (tokenized with the trained model's tokenizer by
:meth:`~RolloutStage.attach_source`), draws its batches from :class:`~train.rollout.RolloutLoader` (the policy's
own rollouts, scored by ``--reward`` / ``--reward-model``, multi-turn with ``--tools``), loads the frozen
``--init-from`` model as the reference when ``--kl-coef`` > 0 (on resume: the recorded one, checked by its
weights' fingerprint), keeps its options in every checkpoint (a resumed run must give the same ones) and
evaluates pass@k on ``--eval-prompts``. A subclass gives the objective, :meth:`~RolloutStage.annotate` (what
each micro-batch needs from the models at rollout time), optionally :meth:`~RolloutStage.prepare` (what needs
the whole rollout batch of every rank) and its own :attr:`~RolloutStage.batch_type`.

:func:`token_logps` / :func:`token_entropy`: per-token log-probabilities and entropies of
``softmax(logits / T)`` at the completion positions, the head run there only, chunked (``model/head.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core import tools as builtin_tools
from core.dtypes import canonical as canonical_dtype
from core.dtypes import dtype_flag
from core.dtypes import metavar as dtype_metavar
from model.head import chunked, head_logits
from train import loading
from train.agentic import BUILTIN, ToolConfig, load_executor
from train.checkpoint import Checkpoint, SourceRecord
from train.data import Split
from train.options import OptionError, Options, option
from train.passk import PassConfig, pass_metrics, pass_sums
from train.prompt_set import PromptSet
from train.reward_model import NORMS, RewardModel, parse_spec, reward_models
from train.rewards import load_rewards
from train.rollout import ROLLOUT_DTYPES, EvalChunk, RolloutBatch, RolloutConfig, RolloutLoader
from train.stages.base import Stage, StageContext, StageError, Supervised, supervised_forward
from train.weights import state_fingerprint, unwrap

TIME_LIMIT_S = builtin_tools.TIME_LIMIT_S


@dataclass(frozen=True)
class RLOptions(Options):
    """The flags every RL stage takes: how rollouts are drawn, scored, clipped and evaluated."""

    title = "reinforcement learning (--stage grpo / ppo: --prompts, no --data)"

    reward: tuple[str, ...] = option((), "reward function, repeatable (weights sum): gsm8k, format, length, "
                                     "tool_answer, tool_format, module:function or path/to/file.py:function in "
                                     "TRL's convention f(prompts, completions, **columns)", metavar="SPEC[@W]",
                                     action="append")
    group_size: int = option(8, "samples per prompt (default {default})", metavar="G", kind=int, low=2)
    prompts_per_step: int = option(8, "prompts per optimizer step, all ranks (default {default}); a multiple of "
                                   "--grad-accum x processes", metavar="P", kind=int, low=1)
    max_new_tokens: int = option(256, "completion length limit (default {default})", metavar="N", kind=int, low=1)
    rollout_temperature: float = option(1.0, "sampling temperature (default {default})", metavar="T", kind=float,
                                        low=0, low_open=True)
    rollout_top_k: int | None = option(None, "sample from the K most likely tokens only", metavar="K", kind=int,
                                       low=1)
    rollout_dtype: str = option("float32", "precision of the rollouts' decode matmuls: float32 (the model's, "
                                "default) or bfloat16 (faster on AMX / AVX512-BF16 CPUs and GPUs; tokens of a "
                                "bf16-rounded policy, while log-probs and the loss stay float32)",
                                type=dtype_flag(*ROLLOUT_DTYPES), metavar=dtype_metavar(*ROLLOUT_DTYPES))
    rollout_reuse: int = option(1, "optimizer steps per batch of rollouts (default {default}; ppo: its epochs over "
                                "each rollout batch)", metavar="K", kind=int, low=1)
    epsilon: float = option(0.2, "clip range low: ratio >= 1 - eps (default {default})", kind=float, low=0)
    epsilon_high: float | None = option(None, "clip range high: ratio <= 1 + eps_high (default --epsilon)",
                                        kind=float, low=0)
    kl_coef: float = option(0.0, "KL to the frozen --init-from model (default 0: not loaded); grpo: a k3 term in "
                            "the loss; ppo: a per-token penalty in the reward", kind=float, low=0)
    mask_truncated: bool = option(False, "no loss on completions cut by --max-new-tokens", action="store_true")
    eval_prompts: Path | None = option(None, "pass@1 / pass@k (sampled and greedy) on these prompts every "
                                       "--eval-every steps", metavar="FILE.jsonl", type=Path)
    pass_k: int | None = option(None, "the k of pass@k, <= --group-size (default G)", metavar="K", kind=int, low=1)
    success_threshold: float = option(1.0, "a sample succeeds when its total reward >= R (default {default})",
                                      metavar="R", kind=float)

    reward_model: tuple[str, ...] = option((), "a transformers sequence-classification reward model folder scoring "
                                           "(prompt, completion) with its own chat template, repeatable (weights "
                                           "sum with --reward)", metavar="DIR[@W]", action="append")
    reward_norm: str = option("none", "reward-model scores as they are (none, default) or through a sigmoid "
                              "(sigmoid: into (0, 1))", choices=NORMS)
    trust_remote_code: bool = option(False, "let a --reward-model folder run its own code (e.g. "
                                     "InternLM2-1.8B-Reward)", action="store_true")
    tools: str | None = option(None, "run the tool calls of the rollouts and continue them: builtin (core/tools.py; "
                               "offered to prompts that list no tools) or module:function / path/to/file.py:function "
                               "(f(name, arguments) -> str or dict); default: a rollout ends at its first answer",
                               metavar="SPEC")
    max_tool_rounds: int = option(3, "rounds of tool calls a rollout may run with --tools (default {default})",
                                  metavar="N", kind=int, low=1, high=100)
    tool_time_limit: float = option(TIME_LIMIT_S, "seconds one tool call may run before its result is an error "
                                    "(default {default})", metavar="S", kind=float, low=0, low_open=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "reward", tuple(self.reward))
        object.__setattr__(self, "reward_model", tuple(self.reward_model))
        if self.reward_norm not in NORMS:
            raise OptionError(f"--reward-norm is one of {', '.join(NORMS)}, got {self.reward_norm!r}")
        dtype = canonical_dtype(self.rollout_dtype)
        if dtype not in ROLLOUT_DTYPES:
            raise OptionError(f"--rollout-dtype is one of {', '.join(ROLLOUT_DTYPES)}, got {self.rollout_dtype}")
        object.__setattr__(self, "rollout_dtype", dtype)
        if self.pass_k is not None and not 1 <= self.pass_k <= self.group_size:
            raise OptionError(f"--pass-k must be in [1, --group-size {self.group_size}], got {self.pass_k}")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def advantage_scale(self) -> str:
        """``RolloutConfig.scale_rewards`` of the group-relative advantages (``none`` unless a stage scales them)."""
        return "none"

    def rollout_config(self, seed: int) -> RolloutConfig:
        return RolloutConfig(self.group_size, self.prompts_per_step, self.max_new_tokens, self.rollout_temperature,
                             self.rollout_top_k, self.rollout_reuse, self.advantage_scale, self.mask_truncated, seed,
                             ROLLOUT_DTYPES[self.rollout_dtype])

    def pass_config(self) -> PassConfig:
        return PassConfig(self.group_size, self.pass_k or self.group_size, self.success_threshold)

    def record(self) -> dict[str, Any]:
        """What every checkpoint of the run records (``stage_options``; a resumed run must match it)."""
        values = self.values()
        return {**values, "reward": list(self.reward), "reward_model": list(self.reward_model),
                "eval_prompts": None if self.eval_prompts is None else str(self.eval_prompts)}


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


class RolloutStage(Stage[RolloutBatch, EvalChunk]):
    """On-policy RL from prompts and reward functions (see the module docstring); subclasses give the objective."""

    dataset_stages = ("prompts",)
    rollouts = True
    Options = RLOptions
    batch_type: ClassVar[type[RolloutBatch]] = RolloutBatch  # what the loader builds for this stage

    def __init__(self, byte_lengths: Tensor | None = None, options: RLOptions | None = None, **values: Any):
        super().__init__(byte_lengths, options, **values)
        o: RLOptions = self.options  # type: ignore[assignment]
        self.rewards = load_rewards(list(o.reward)) if o.reward or not o.reward_model else []
        self.reward_model_specs = [parse_spec(spec) for spec in o.reward_model]  # checked before any loading
        self.eps, self.eps_high = o.epsilon, o.clip_high
        self.kl_coef = o.kl_coef
        self.temperature = o.rollout_temperature
        self.eval_path = o.eval_prompts
        self.pass_cfg = o.pass_config()
        self.tools = None if o.tools is None else ToolConfig(load_executor(o.tools, o.tool_time_limit),
                                                             o.max_tool_rounds)
        self.model: nn.Module | None = None
        self.ref_model: nn.Module | None = None
        self.reference: SourceRecord | None = None
        self.tok = None
        self.eval_set: PromptSet | None = None
        self.seed = 0  # the run's --seed (given to loader()): rollout and evaluation sample seeds derive from it

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
        offered = builtin_tools.tools_schema(builtin_tools.BUILTIN) if self.options.tools == BUILTIN else None
        dataset.attach(self.tok, self.options.max_new_tokens, limit, offered)
        if self.eval_set is not None:
            self.eval_set.attach(self.tok, self.options.max_new_tokens, limit, offered)

    def rollout_config(self, seed: int) -> RolloutConfig:
        return replace(self.options.rollout_config(seed), tools=self.tools)

    def loader(self, split: Split[PromptSet], micro_batch: int, rank: int, world: int, seed: int,
               pin_memory: bool) -> RolloutLoader:
        if self.model is None or self.tok is None:
            raise StageError(f"--stage {self.name}: setup() was not run before the loader was built")
        self.seed = seed
        return RolloutLoader(split, self.model, self.tok, self.rewards, self.rollout_config(seed), rank, world,
                             self.annotate, self.eval_set, batch_type=self.batch_type, prepare=self.prepare)

    # ---- models ----------------------------------------------------------------------------------------------
    def setup(self, ctx: StageContext) -> None:
        """Keep the policy (for rollouts); load the frozen reference when there is a KL term."""
        super().setup(ctx)
        self.model = ctx.model
        if ctx.resume is not None:
            self.check_same_options(ctx.resume)
        if self.kl_coef > 0:
            self._load_reference(ctx)
        if self.reward_model_specs and not any(isinstance(r.fn, RewardModel) for r in self.rewards):
            device = next(ctx.model.parameters()).device  # once per process, on the run's device
            self.rewards += reward_models(self.options.reward_model, device, self.options.trust_remote_code,
                                          self.options.reward_norm)
        ctx.say(self.summary())

    def summary(self) -> str:
        """The stage's line in the run's summary."""
        o = self.options
        return (f"{self.name}: {o.prompts_per_step} prompts x {o.group_size} samples per step{self.summary_detail()}, "
                f"rewards "
                f"{', '.join(f'{r.name}@{r.weight:g}' for r in self.rewards)}, kl_coef {self.kl_coef:g}, reuse "
                f"{o.rollout_reuse}")

    def summary_detail(self) -> str:
        """The stage's own settings in :meth:`summary` (", loss dapo")."""
        return ""

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
                "stage_options": {**self.options.record(), "reward": [r.spec for r in self.rewards
                                                                       if not isinstance(r.fn, RewardModel)]}}

    # ---- rollout time ----------------------------------------------------------------------------------------
    def annotate(self, batch: RolloutBatch) -> None:
        """At rollout time, per micro-batch: what the loss needs from the models (set on ``batch``)."""

    def prepare(self, micro: list[RolloutBatch]) -> None:
        """At rollout time, once per rollout batch, on every rank at once (collectives allowed): this rank's
        annotated micro-batches, for what needs all of them."""

    @torch.no_grad()
    def eval_logps(self, model: nn.Module, batch: RolloutBatch) -> Tensor:
        """[B, T] ``model``'s log-probs of the batch's completion tokens, in eval mode on its device, on the CPU."""
        was = model.training
        model.eval()
        on = batch.to(next(model.parameters()).device)
        out = token_logps(supervised_forward(model, on), on.targets, self.temperature).cpu()
        model.train(was)
        return out

    # ---- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: EvalChunk) -> dict[str, Tensor]:
        return pass_sums(unwrap(model), self.eval_set, batch.indices, self.tok, self.rewards,
                         self.rollout_config(self.seed), self.pass_cfg)

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return pass_metrics(sums, self.pass_cfg.k)
