"""PPO (actor + value head, GAE, clipped policy and value losses) on the policy's own rollouts: the rollouts,
rewards, tools, reference and evaluation of the RL stages (``train/stages/rl.py``), with TRL's PPO-RLHF
objective instead of group-relative advantages; everything else is the loop of ``train/loop.py``.

The value head (``train/value_head.py``: why a head on the policy's trunk and not a separate critic, where a
checkpoint stores it) maps the final hidden state h_t to V(h_t). At rollout time (:meth:`PPOStage.annotate`,
eval mode, no gradient) every micro-batch gets its old log-probs ``old_t``, its old values ``v_t`` and, with
``--kl-coef`` > 0, the frozen ``--init-from`` reference's log-probs ``ref_t``. Then, per completion i, over
its supervised positions t_1 < ... < t_n in order (the model's own tokens; a tool rollout's tool turns are
environment steps, skipped), with ``score_i`` its total reward, standardised (``(s - mean) / sqrt(var + 1e-8)``)
over the rollout batch of all ranks under ``--score-norm batch`` (the default: the returns then start at the
zero-initialised value head's scale, and ``--value-clip`` means the same in any reward's units), as it is under
``none`` (:func:`token_rewards`, :func:`gae`)::

    r_k = -kl_coef * (old_k - ref_k)  +  [k = n] * score_i        (per-token KL penalty, reward at the last token)
    delta_k = r_k + gamma * v_{k+1} - v_k,    v_{n+1} = 0
    A_k = delta_k + gamma * lam * A_{k+1},    A_{n+1} = 0
    R_k = A_k + v_k                                                (the value target)

and A is whitened over every completion token of the rollout batch, all ranks (:meth:`PPOStage.prepare`: one
all-reduce of the sums; unbiased variance): ``A' = (A - mean) / sqrt(var + 1e-8)``. The loss of a completion
token (:func:`ppo_token_loss`), ``logp`` and V under the current weights, ``rho = exp(logp - old)``::

    pg = max(-A' * rho, -A' * clip(rho, 1 - eps, 1 + eps_high))                   (--epsilon, --epsilon-high)
    vf = 0.5 * max((V - R)^2, (v + clip(V - v, -c, c) - R)^2)                       (c = --value-clip)
    l  = pg + vf_coef * vf

and the step loss is ``sum(l * m) / N`` (N = completion tokens of the whole step, all ranks: the loss contract
of ``base.py``). PPO's epochs over a rollout batch are ``--rollout-reuse`` K: K optimizer steps on the same
rollouts, each against the old log-probs, values and advantages of rollout time. Metrics (token means over the
step): ``pg_loss``, ``value_loss`` (vf), ``clip_frac`` (rho outside the range in the direction A' pushes),
``value_clip_frac`` (the clipped value term is the larger), ``approx_kl`` (``0.5 * (logp - old)^2``, to the
rollout policy), ``kl`` (``old - ref``, only with a reference), ``value`` (V), ``entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from train import dist
from train.options import OptionError, option
from train.rollout import RolloutBatch
from train.stages.base import StageContext, StageError, StepNorm, Supervised, supervised_forward
from train.stages.rl import RLOptions, RolloutStage, token_entropy, token_logps
from train.value_head import ValueHead, attach_value_head

WHITEN_EPS = 1e-8  # TRL's masked_whiten
SCORE_NORMS = ("batch", "none")


@dataclass(frozen=True)
class PPOOptions(RLOptions):
    """The --stage ppo flags: the RL flags (``train/stages/rl.py``) and GAE and the value loss."""

    title = "PPO (--stage ppo; it also takes the reinforcement learning flags above except --loss, --scale-rewards)"

    gamma: float = option(1.0, "ppo: discount per completion token in GAE (default {default})", kind=float, low=0,
                          high=1)
    lam: float = option(0.95, "ppo: GAE's lambda (default {default})", kind=float, low=0, high=1)
    vf_coef: float = option(0.1, "ppo: weight of the value loss (default {default})", kind=float, low=0)
    value_clip: float = option(0.2, "ppo: values move at most this far from their rollout-time values in the "
                               "clipped value loss (default {default})", kind=float, low=0, low_open=True)
    score_norm: str = option("batch", "ppo: the completions' rewards as they are (none) or standardised over the "
                             "rollout batch before GAE (batch, default: the value head starts at the returns' scale)",
                             choices=SCORE_NORMS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_norm not in SCORE_NORMS:
            raise OptionError(f"--score-norm is one of {', '.join(SCORE_NORMS)}, got {self.score_norm!r}")


@dataclass(kw_only=True)
class PPOBatch(RolloutBatch):
    """Rollouts with what PPO's loss needs per completion token [B, T] (0 off the completion positions)."""

    old_values: Tensor | None = None  # V at rollout time
    token_advantages: Tensor | None = None  # whitened GAE advantages A'
    returns: Tensor | None = None  # value targets R = A + V (before whitening)


def token_rewards(scores: Tensor, mask: Tensor, old: Tensor, ref: Tensor | None, kl_coef: float) -> Tensor:
    """[B, T] per-token rewards: ``-kl_coef * (old - ref)`` at the supervised positions (with a reference), plus
    each row's score at its last supervised position (none on a row without one)."""
    on = mask > 0
    rewards = torch.zeros_like(old)
    if ref is not None and kl_coef > 0:
        rewards = torch.where(on, -kl_coef * (old - ref), rewards)
    t = mask.shape[1]
    last = torch.where(on, torch.arange(t).expand_as(mask), -1).amax(dim=1)  # -1: no supervised position
    rows = (last >= 0).nonzero().squeeze(1)
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns) [B, T] by generalised advantage estimation over each row's supervised positions
    in order (others skipped, 0 in the output; the module docstring)."""
    on = mask > 0
    adv = torch.zeros_like(rewards)
    carry = rewards.new_zeros(rewards.shape[0])  # A_{k+1}
    next_v = rewards.new_zeros(rewards.shape[0])  # v_{k+1}
    for t in reversed(range(rewards.shape[1])):
        a = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * carry
        here = on[:, t]
        adv[:, t] = torch.where(here, a, 0.0)
        carry = torch.where(here, a, carry)
        next_v = torch.where(here, values[:, t], next_v)
    return adv, torch.where(on, adv + values, 0.0)


def moments(sums: Tensor) -> tuple[float, float]:
    """(mean, sqrt(unbiased var + 1e-8)) from float64 [sum, sum of squares, count], summed over all ranks."""
    total, squares, n = dist.all_reduce_sum(sums).tolist()
    mean = total / max(n, 1.0)
    return mean, (max(squares - n * mean * mean, 0.0) / max(n - 1.0, 1.0) + WHITEN_EPS) ** 0.5


def global_moments(parts: list[Tensor]) -> tuple[float, float]:
    """:func:`moments` of the values of ``parts`` (tensors) over every rank."""
    sums = torch.zeros(3, dtype=torch.float64)
    for x in parts:
        x = x.double()
        sums += torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)])
    return moments(sums)


def ppo_token_loss(logp: Tensor, values: Tensor, batch: PPOBatch, eps: float, eps_high: float, value_clip: float,
                   vf_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss l [B, T] (the module docstring) and per-token metric values."""
    adv = batch.token_advantages.to(logp.dtype)
    ratio = torch.exp(logp - batch.old_token_logps)
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps_high))
    old_v, target = batch.old_values, batch.returns
    clipped_v = old_v + torch.clamp(values - old_v, -value_clip, value_clip)
    plain, clipped = (values - target) ** 2, (clipped_v - target) ** 2
    vf = 0.5 * torch.max(plain, clipped)
    d = (logp - batch.old_token_logps).detach()
    metrics = {"pg_loss": pg.detach(), "value_loss": vf.detach(),
               "clip_frac": (((ratio < 1.0 - eps) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))).float(),
               "value_clip_frac": (clipped > plain).float(), "approx_kl": 0.5 * d * d, "value": values.detach()}
    return pg + vf_coef * vf, metrics


class PPOStage(RolloutStage):
    """PPO with a value head on the policy's trunk (the module docstring)."""

    name = "ppo"
    Options = PPOOptions
    batch_type = PPOBatch

    def __init__(self, byte_lengths: Tensor | None = None, options: PPOOptions | None = None, **values: Any):
        super().__init__(byte_lengths, options, **values)
        o: PPOOptions = self.options  # type: ignore[assignment]
        self.gamma, self.lam, self.vf_coef, self.value_clip = o.gamma, o.lam, o.vf_coef, o.value_clip
        self.value_head: ValueHead | None = None

    def summary_detail(self) -> str:
        return f", gamma {self.gamma:g}, lam {self.lam:g}, vf_coef {self.vf_coef:g}"

    def setup(self, ctx: StageContext) -> None:
        """The RL setup, then the value head on the policy: zero, or the resumed run's."""
        super().setup(ctx)
        state = None
        if ctx.resume is not None:
            state = ctx.resume.value_head
            if state is None:
                raise StageError(f"{ctx.resume.path}: holds no value head: not a --stage ppo checkpoint")
        self.value_head = attach_value_head(ctx.model, state)

    # ---- rollout time ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def annotate(self, batch: PPOBatch) -> None:
        """Old log-probs and values (one eval-mode forward of the policy), and the reference's log-probs."""
        model = self.model
        was = model.training
        model.eval()
        on = batch.to(next(model.parameters()).device)
        sup = supervised_forward(model, on)
        batch.old_token_logps = token_logps(sup, on.targets, self.temperature).cpu()
        batch.old_values = sup.per_position(self.value_head(sup.head.hidden)).cpu()
        model.train(was)
        if self.ref_model is not None:
            batch.ref_token_logps = self.eval_logps(self.ref_model, batch)

    def prepare(self, micro: list[PPOBatch]) -> None:
        """Per-token rewards and GAE per micro-batch, then the advantages whitened over the whole rollout batch."""
        if self.options.score_norm == "batch":
            mean, std = global_moments([b.scores for b in micro])
            scores = [(b.scores - mean) / std for b in micro]
        else:
            scores = [b.scores for b in micro]
        raw = []
        for b, score in zip(micro, scores, strict=True):
            rewards = token_rewards(score, b.weights, b.old_token_logps, b.ref_token_logps, self.kl_coef)
            adv, b.returns = gae(rewards, b.old_values, b.weights, self.gamma, self.lam)
            raw.append(adv)
        mean, std = global_moments([adv[b.weights > 0] for b, adv in zip(micro, raw, strict=True)])
        for b, adv in zip(micro, raw, strict=True):
            b.token_advantages = torch.where(b.weights > 0, (adv - mean) / std, 0.0)

    # ---- objective ---------------------------------------------------------------------------------------------
    def objective(self, sup: Supervised, batch: PPOBatch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """The step loss of the module docstring, and its token-mean metrics."""
        logp = token_logps(sup, batch.targets, self.temperature)
        values = sup.per_position(self.value_head(sup.head.hidden))
        loss, metrics = ppo_token_loss(logp, values, batch, self.eps, self.eps_high, self.value_clip, self.vf_coef)
        metrics["entropy"] = token_entropy(sup, self.temperature)
        if batch.ref_token_logps is not None:
            metrics["kl"] = batch.old_token_logps - batch.ref_token_logps
        m = batch.weights
        return (loss * m).sum() / norm.tokens, {k: ((v * m).sum() / norm.tokens).detach() for k, v in metrics.items()}
