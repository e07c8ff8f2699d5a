"""Policy losses, the value loss, importance corrections, loss aggregation and the whole objective,
as pure functions.

Per-token losses are [B, L] tensors and every loss is given `mask` ([B, L], 1 on tokens that
train). A loss is turned into a scalar ONCE, by `aggregate_weights`, over the whole objective
(policy + KL + entropy + value), with the normaliser of the whole minibatch (all processes
together), so that splitting a minibatch into micro-batches or across processes leaves the gradient
unchanged:

    token-mean   sum_{i,t} l_it / (tokens in the minibatch)
    seq-mean     sum_i (sum_t l_it / |y_i|) / (sequences in the minibatch)
    constant     sum_{i,t} l_it / (C * sequences in the minibatch)       (Dr.GRPO; C = max_new_tokens)

Policy losses are registered by name (`@register_policy_loss`). Each is
`fn(logprobs, old_logprobs, advantages, mask, *, settings...)` and returns (loss [B, L], clipped
indicator [B, L]); its keyword-only settings are the `algo.*` keys it reads (`PolicyLoss.keys`,
read from the signature, so what a loss reads and what the config refuses cannot disagree).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from cory.kl import ESTIMATORS as KL_ESTIMATORS
from cory.kl import masked_mean


def keyword_settings(fn: Callable) -> tuple[str, ...]:
    """The keyword-only parameters of `fn`: the `algo.*` settings a registered function reads."""
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class PolicyLoss:
    fn: Callable
    keys: tuple[str, ...]
    """The `algo.*` keys the loss reads (its keyword-only parameters)."""


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str):
    def deco(fn):
        POLICY_LOSSES[name] = PolicyLoss(fn, keyword_settings(fn))
        return fn

    return deco


def clip_bounds(clip_range: float, clip_range_high: float) -> tuple[float, float]:
    """(low, high): the ratio stays in [1 - clip_range, 1 + clip_range_high] (high 0 = low)."""
    return clip_range, clip_range_high or clip_range


@register_policy_loss("pg")
def policy_gradient_loss(logprobs, old_logprobs, advantages, mask):
    """[B, L] -A_t * log pi(a_t|s_t): the plain (on-policy) policy gradient of REINFORCE and A2C."""
    return -advantages * logprobs, torch.zeros_like(logprobs)


@register_policy_loss("vanilla")
def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_range, clip_range_high, dual_clip):
    """[B, L] PPO's max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old.

    With dual_clip = c > 1 (Ye et al., 2020) a negative-advantage token's loss is also capped at
    -A c, so a huge ratio cannot produce an unbounded step.
    """
    low, high = clip_bounds(clip_range, clip_range_high)
    loss, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, low, high)
    if dual_clip > 1:
        capped = torch.minimum(loss, -advantages * dual_clip)
        clipped = torch.where((advantages < 0) & (capped < loss), torch.ones_like(clipped), clipped)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clipped


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high=None):
    """[B, L] PPO's per-token policy loss and [B, L] clipped indicator (1 where the clip binds)."""
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped).to(logprobs.dtype)


@register_policy_loss("gspo")
def sequence_ratio_loss(logprobs, old_logprobs, advantages, mask, *, clip_range, clip_range_high):
    """[B, L] GSPO (Zheng et al., 2025): the clipped surrogate with the sequence-level ratio
    s_i = exp(mean_t log(pi / pi_old)) over the sequence's masked tokens in place of the token ratio.

    Written per token as s_it = sg(s_i) * pi_t / sg(pi_t) (same value as s_i; with seq-mean the
    gradient is exactly GSPO's, s_i * mean_t grad log pi_t).
    """
    low, high = clip_bounds(clip_range, clip_range_high)
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1).detach()
    ratio = torch.exp(seq_log_ratio)[:, None] * torch.exp(logprobs - logprobs.detach())
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return torch.maximum(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped).to(logprobs.dtype)


@register_policy_loss("cispo")
def clipped_weight_loss(logprobs, old_logprobs, advantages, mask, *, clip_range, clip_range_high):
    """[B, L] CISPO (MiniMax-M1, 2025): -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi.

    The importance weight is clipped and detached, so every token keeps a gradient (PPO's clip
    zeroes it); the clipped indicator marks tokens whose weight was clipped.
    """
    low, high = clip_bounds(clip_range, clip_range_high)
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return -weight * advantages * logprobs, (weight != ratio).to(logprobs.dtype)


def clipped_value_loss(values, old_values, returns, value_clip):
    """[B, L] 0.5 * squared value error, pessimistic over the clipped and unclipped prediction."""
    err = (values - returns) ** 2
    if value_clip <= 0:
        return 0.5 * err
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    return 0.5 * torch.maximum(err, (clipped - returns) ** 2)


VALUE_LOSS_KEYS = ("value_clip", "vf_coef")


# -- importance corrections -------------------------------------------------------------------------
IS_CORRECTIONS = ("token-tis", "token-mis", "seq-tis", "seq-mis", "icepop", "none")
"""`algo.is_correction`: how tokens sampled by another policy (another engine, precision, or an
older version of the weights in an asynchronous run) are weighted, with r = pi_train_old / pi_behaviour
and C = `algo.is_cap`:

    token-tis   w_t = min(r_t, C)                                   truncated importance sampling, per token
    token-mis   w_t = r_t if r_t <= C else 0                        masked importance sampling, per token
    seq-tis     w_t = min(R, C),  R = prod_t r_t over the sequence  truncated, per sequence (turn)
    seq-mis     w_t = R if R <= C else 0                            masked, per sequence
    icepop      w_t = r_t if floor <= r_t <= C else 0                IcePop: tokens outside [floor, C] masked
    none        w_t = 1
"""


@dataclass
class ImportanceWeights:
    """The importance correction of tokens sampled by another policy (`IS_CORRECTIONS`)."""

    weight: torch.Tensor
    """[B, L] each token's weight on masked tokens (1 with `none`), 0 elsewhere."""
    log_ratio_abs_mean: torch.Tensor
    """0-d: mean |log pi_train_old - log pi_behaviour| over masked tokens (the measured mismatch)."""
    log_ratio_abs_max: torch.Tensor
    corrected_fraction: torch.Tensor
    """0-d: share of tokens (token-level modes, icepop) or sequences (seq-level) truncated or masked."""
    metric: str
    """The name that share is logged under (`is/truncated_tokens`, `is/masked_sequences`, ...)."""


def importance_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                       correction: str = "token-tis", cap: float = 2.0, floor: float = 0.5) -> ImportanceWeights:
    """The weights of `correction` (see `IS_CORRECTIONS`) for [B, L] log-probs of the trainer's old
    policy and of the policy that sampled, over the response `mask` [B, L]."""
    log_ratio = (old_logprobs - behaviour_logprobs) * mask
    m = mask.bool()
    level = "sequences" if correction.startswith("seq-") else "tokens"
    if level == "sequences":  # R = exp(sum of the sequence's log-ratios), every token of it weighted alike
        ratio = torch.exp(log_ratio.sum(-1, keepdim=True)).expand_as(log_ratio)
    else:
        ratio = torch.exp(log_ratio)
    if correction in ("token-tis", "seq-tis"):
        hit, weight, kind = ratio > cap, ratio.clamp(max=cap), "truncated"
    elif correction in ("token-mis", "seq-mis"):
        hit, kind = ratio > cap, "masked"
        weight = torch.where(hit, torch.zeros_like(ratio), ratio)
    elif correction == "icepop":
        hit, kind = (ratio > cap) | (ratio < floor), "masked"
        weight = torch.where(hit, torch.zeros_like(ratio), ratio)
    elif correction == "none":
        hit, weight, kind = torch.zeros_like(m), torch.ones_like(ratio), "truncated"
    else:
        raise ValueError(f"unknown importance correction {correction!r}; choose one of: {', '.join(IS_CORRECTIONS)}")
    if level == "sequences":
        rows = m.any(-1)
        share = (hit.any(-1) & rows).to(log_ratio.dtype).sum() / rows.sum().clamp_min(1)
    else:
        share = masked_mean(hit.to(log_ratio.dtype), mask)
    return ImportanceWeights(
        weight=torch.where(m, weight, torch.zeros_like(weight)),
        log_ratio_abs_mean=masked_mean(log_ratio.abs(), mask),
        log_ratio_abs_max=torch.where(m, log_ratio.abs(), torch.zeros_like(log_ratio)).max(),
        corrected_fraction=share,
        metric=f"is/{kind}_{level}",
    )


# -- aggregation -------------------------------------------------------------------------------------
AGGREGATIONS = ("token-mean", "seq-mean", "constant")


def loss_counts(mask: torch.Tensor) -> torch.Tensor:
    """[2] (tokens, sequences) that train in `mask` [B, L]: the normaliser's inputs, summed over
    micro-batches and processes before use."""
    m = mask.to(torch.float64)
    return torch.stack([m.sum(), (m.sum(-1) > 0).to(m.dtype).sum()])


def aggregate_weights(mask: torch.Tensor, how: str, counts: torch.Tensor, constant: float) -> torch.Tensor:
    """[B, L] per-token weights w with loss = sum(w * l): `how` over a minibatch whose totals
    (tokens, sequences) are `counts` (see `loss_counts`); `mask` is this micro-batch's."""
    m = mask.to(torch.float64)
    tokens, seqs = counts[0].clamp_min(1.0), counts[1].clamp_min(1.0)
    if how == "token-mean":
        w = m / tokens
    elif how == "seq-mean":
        w = m / (m.sum(-1, keepdim=True).clamp_min(1.0) * seqs)
    elif how == "constant":
        w = m / (constant * seqs)
    else:
        raise ValueError(f"unknown loss aggregation {how!r}; choose one of: {', '.join(AGGREGATIONS)}")
    return w


# -- the whole objective -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectiveTerms:
    """Which terms the per-token objective has and their settings (an algorithm under a config)."""

    policy_loss: str
    """A registered policy loss."""
    policy_settings: dict = field(default_factory=dict)
    """The policy loss's keyword settings (`PolicyLoss.keys`)."""
    kl_estimator: str | None = None
    """The KL term's estimator (k1, k2, k3); None when KL is in the rewards instead."""
    ent_coef: float = 0.0
    value_loss: bool = False
    vf_coef: float = 0.0
    value_clip: float = 0.0
    teacher_coef: float = 0.0
    """On-policy distillation with the exact KL (distill.estimator=full): the weight of the per-token
    KL to the teacher as a loss term, its direct gradient, which a reward cannot carry (0 = none)."""


def objective(terms: ObjectiveTerms, logprobs, entropy, values, *, old_logprobs, ref_logprobs, old_values, advantages, returns,
              is_weight, mask, weights, beta: float, teacher_kl=None):
    """The scalar loss of one micro-batch and its diagnostics (detached tensors).

        l_t  = w_t * policy_loss_t                              (terms.policy_loss; w_t the importance
                                                                  weight, 1 unless another engine sampled)
             + beta * KL_t(pi || pi_ref)                         (terms.kl_estimator; None: KL is in the reward)
             - ent_coef * H_t(pi)
             + vf_coef * value_loss_t                            (actor-critic only)
             + teacher_coef * KL_t(pi || teacher)                (exact distillation: the direct gradient)
        loss = sum_t weights_t * l_t                            (the aggregation, applied once)

    logprobs, entropy, values: the policy's forward [B, L]; old_logprobs: behaviour log-probs;
    ref_logprobs; old_values, returns: the rollout's values and value targets (actor-critic);
    is_weight: importance weights or None; mask: the loss mask; weights: `aggregate_weights`;
    teacher_kl: [B, L] the exact KL from the policy's forward to the teacher (with teacher_coef).
    """
    spec = POLICY_LOSSES[terms.policy_loss]
    pg, clipped = spec.fn(logprobs, old_logprobs, advantages, mask, **terms.policy_settings)
    if is_weight is not None:
        pg = pg * is_weight
    per_token = pg
    info = {"loss/policy": (pg.detach() * weights).sum(), "policy/clip_fraction": masked_mean(clipped.detach(), mask)}
    if terms.kl_estimator is not None:
        kl = KL_ESTIMATORS[terms.kl_estimator](logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        info["loss/kl"] = (kl.detach() * weights).sum()
    if terms.ent_coef > 0:
        per_token = per_token - terms.ent_coef * entropy
        info["loss/entropy"] = (entropy.detach() * weights).sum()
    if terms.value_loss:
        vf = clipped_value_loss(values, old_values, returns, terms.value_clip)
        per_token = per_token + terms.vf_coef * vf
        info["loss/value"] = (vf.detach() * weights).sum()
    if terms.teacher_coef:
        per_token = per_token + terms.teacher_coef * teacher_kl
        info["loss/teacher_kl"] = (teacher_kl.detach() * weights).sum()
    log_ratio = (logprobs - old_logprobs).detach()
    info["policy/approx_kl_k1"] = masked_mean(-log_ratio, mask)
    info["policy/approx_kl_k3"] = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    # Padding may hold anything (even inf after exp): weights are 0 there, so select rather than multiply.
    loss = torch.where(weights > 0, per_token * weights.to(per_token.dtype), torch.zeros_like(per_token)).sum()
    return loss, info
