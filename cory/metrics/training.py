"""What one training iteration says: reward, KL per episode (sampled and exact), lengths, the
controls' rates, the critic's explained variance; averaged over processes."""

from __future__ import annotations

import torch

from cory.advantages import episode_sums
from cory.kl import kl_k1, kl_k3, masked_mean, masked_sum
from cory.rollout import Rollout

EPISODE_KL_PERCENTILES = (50, 90, 99)


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Per-iteration diagnostics of a scored rollout (per-process values)."""
    mask = rollout.response_mask.float()
    kl = rollout.scored.kl
    lengths = mask.sum(-1)
    # Per episode: the sum over its turns (a single-turn task has one turn per episode).
    scores = episode_sums(rollout.scores.float(), rollout.episode_ids)
    seq_kl = episode_sums(masked_sum(kl, mask).float(), rollout.episode_ids)
    out = {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl_mean": seq_kl.mean().item(),
        "kl_max": seq_kl.max().item(),
        "kl_token_mean": masked_mean(kl, mask).item(),
        "response_length": lengths.mean().item(),
        "turns_per_episode": len(rollout) / len(scores),
        "truncated_rate": (~rollout.finished).float().mean().item(),
    }
    out.update(episode_kl_metrics(rollout))
    if rollout.scored.teacher_kl is not None:  # on-policy distillation: the reverse KL to the teacher per episode
        out["teacher_kl_mean"] = episode_sums(masked_sum(rollout.scored.teacher_kl, mask).float(), rollout.episode_ids).mean().item()
    control = rollout.control
    if control is not None and control.help is not None:
        out["help_rate"] = masked_mean(control.help.float(), mask).item()
    if rollout.scored.help_mass is not None:
        out["help_mass_mean"] = masked_mean(rollout.scored.help_mass, mask).item()
    if control is not None and control.fallback_is_reference:
        out["budget/mixed_token_rate"] = masked_mean((control.mix_weight < 1).float(), mask).item()
        out["budget/reference_token_rate"] = masked_mean((control.mix_weight < 1e-3).float(), mask).item()
    targets = rollout.targets
    if targets is not None:
        out["loss_token_fraction"] = (targets.loss_mask.sum() / rollout.response_mask.sum().clamp_min(1)).item()
        if rollout.scored.values is not None and targets.returns is not None:
            out["value/explained_variance"] = explained_variance(rollout.scored.values, targets.returns, rollout.response_mask)
    return out


def episode_kl_metrics(rollout: Rollout) -> dict[str, float]:
    """Total KL per episode (summed over all of the agent's tokens in every turn) by the sampled
    estimators k1 and k3 and, when scored, exactly (and against the unnormalised pessimistic
    reference): mean, max and percentiles over the batch's episodes."""
    mask = rollout.response_mask.float()
    scored = rollout.scored
    per_token = {"k1": kl_k1(rollout.logprobs, scored.ref_logprobs), "k3": kl_k3(rollout.logprobs, scored.ref_logprobs)}
    if scored.kl_exact is not None:
        per_token["exact"] = scored.kl_exact
    if scored.kl_semi is not None:
        per_token["semi"] = scored.kl_semi
    out = {}
    for name, kl in per_token.items():
        totals = episode_sums(masked_sum(kl.float(), mask), rollout.episode_ids)
        out[f"episode_kl/{name}_mean"] = totals.mean().item()
        out[f"episode_kl/{name}_max"] = totals.max().item()
        if name in ("exact", "semi"):
            for q in EPISODE_KL_PERCENTILES:
                out[f"episode_kl/{name}_p{q}"] = torch.quantile(totals, q / 100).item()
    return out


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over masked tokens: 1 is a perfect critic, <= 0 a useless one."""
    m = mask.bool()
    r, v = returns[m].float(), values[m].float()
    var_r = r.var(unbiased=False)
    return float("nan") if var_r <= 1e-12 else float(1 - (r - v).var(unbiased=False) / var_r)


def reduce_metrics(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over processes (max for *_max), the same dict on every rank."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device, dtype=torch.float64)
    gathered = accelerator.gather(values[None]).reshape(accelerator.num_processes, len(keys))
    out = {}
    for i, k in enumerate(keys):
        col = gathered[:, i]
        out[k] = float(col.max() if k.endswith("_max") else col.mean())
    return out
