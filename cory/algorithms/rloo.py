"""RLOO (Ahmadian et al., 2024): G samples per prompt, leave-one-out baseline, no critic.

    R_i = score_i - beta * sum_t KL_t          (sequence-level KL penalty)
    A_i = R_i - mean_{j != i} R_j              (over the other samples of the same prompt)
    loss = mean_t max(-A_i * ratio_t, -A_i * clip(ratio_t, 1 - eps, 1 + eps))
On the first (on-policy) pass the ratio is 1 and this is REINFORCE with the leave-one-out baseline.
"""

from __future__ import annotations

import torch

from cory.advantages import loo_baseline
from cory.algorithms.base import Algorithm, register
from cory.algorithms.ppo import clipped_surrogate, policy_diagnostics
from cory.kl import masked_mean


@register("rloo")
class RLOO(Algorithm):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.group_size = cfg.algo.group_size

    def advantages(self, batch, token_rewards):
        mask = batch.response_mask
        # The shaped per-token rewards already hold -beta * KL and the score; their sum per row is
        # the sequence-level return. Multi-turn: sum over the episode's turns.
        totals: dict[int, float] = {}
        row_return = (token_rewards * mask).sum(-1)
        for e, r in zip(batch.episode_ids.tolist(), row_return.tolist()):
            totals[e] = totals.get(e, 0.0) + r
        returns = torch.tensor([totals[e] for e in batch.episode_ids.tolist()], dtype=row_return.dtype, device=mask.device)
        adv = returns - loo_baseline(returns, batch.group_ids)
        batch.extras["advantages"] = adv[:, None] * mask

    def loss(self, out, mb):
        mask = mb.response_mask
        pg, clipped = clipped_surrogate(out.logprobs, mb.logprobs, mb.extras["advantages"], self.cfg.algo.clip_range)
        pg_loss = masked_mean(pg, mask)
        info = {"loss/policy": pg_loss.item(), "policy/clip_fraction": masked_mean(clipped, mask).item()}
        info.update(policy_diagnostics(out.logprobs, mb.logprobs, mask))
        return pg_loss, info
