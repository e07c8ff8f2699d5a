"""GRPO (Shao et al., 2024): G samples per prompt, group-normalised outcome advantages, no critic.

    A_i = (R_i - mean_group R) / std_group R      (std scaling optional: algo.scale_rewards)
    loss = agg(max(-A_i * ratio_t, -A_i * clip(ratio_t, 1 - eps, 1 + eps))) + beta * mean k3
The KL to the reference is a k3 loss term by default (kl.penalty=auto). `agg` is token-mean over
all tokens of the minibatch or seq-mean (mean over each sequence's tokens, then over sequences).
For multi-turn episodes R is the episode's total score and every turn of it gets the same A.
"""

from __future__ import annotations

import torch

from cory.advantages import group_normalized
from cory.algorithms.base import Algorithm, register
from cory.algorithms.ppo import clipped_surrogate, policy_diagnostics
from cory.kl import masked_mean


def episode_returns(batch) -> torch.Tensor:
    """[B] the total score of the episode each row belongs to."""
    totals: dict[int, float] = {}
    for e, s in zip(batch.episode_ids.tolist(), batch.scores.tolist()):
        totals[e] = totals.get(e, 0.0) + s
    return torch.tensor([totals[e] for e in batch.episode_ids.tolist()], dtype=torch.float32)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """token-mean: over all masked tokens; seq-mean: per sequence, then over sequences."""
    if how == "seq-mean":
        return masked_mean(loss, mask, dim=-1).mean()
    return masked_mean(loss, mask)


@register("grpo")
class GRPO(Algorithm):
    kl_in_reward = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.group_size = cfg.algo.group_size

    def advantages(self, batch, token_rewards):
        returns = episode_returns(batch).to(batch.scores.device)
        adv = group_normalized(returns, batch.group_ids, scale=self.cfg.algo.scale_rewards)
        batch.extras["advantages"] = adv[:, None] * batch.response_mask

    def loss(self, out, mb):
        mask = mb.response_mask
        pg, clipped = clipped_surrogate(out.logprobs, mb.logprobs, mb.extras["advantages"], self.cfg.algo.clip_range)
        pg_loss = aggregate(pg, mask, self.cfg.algo.loss_aggregation)
        info = {"loss/policy": pg_loss.item(), "policy/clip_fraction": masked_mean(clipped, mask).item()}
        info.update(policy_diagnostics(out.logprobs, mb.logprobs, mask))
        return pg_loss, info
