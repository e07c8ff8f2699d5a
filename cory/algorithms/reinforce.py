"""REINFORCE: the policy gradient with an optional baseline.

    A_t = G_t - b,   loss = -mean_t A_t * log pi(a_t | s_t)
G_t is the return from token t (task score plus the per-token KL penalty); b is none, the batch
mean return of turns at the same index (Monte-Carlo baseline), or the leave-one-out mean of the
other samples of the same prompt.
"""

from __future__ import annotations

import torch

from cory.advantages import loo_baseline, mc_baseline, rewards_to_go
from cory.algorithms.base import Algorithm, register
from cory.kl import masked_mean


@register("reinforce")
class Reinforce(Algorithm):
    def advantages(self, batch, token_rewards):
        mask = batch.response_mask
        returns = rewards_to_go(token_rewards, mask, self.cfg.algo.gamma, batch.episode_ids, batch.turn_index,
                                self.cfg.algo.turn_gamma)
        turn_returns = returns[:, 0]
        kind = self.cfg.algo.baseline
        if kind == "none":
            baseline = torch.zeros_like(turn_returns)
        elif kind == "mean":
            baseline = mc_baseline(turn_returns, batch.turn_index)
        else:
            baseline = loo_baseline(turn_returns, batch.group_ids)
        batch.extras["returns"] = returns
        batch.extras["advantages"] = (returns - baseline[:, None]) * mask

    def loss(self, out, mb):
        mask = mb.response_mask
        pg_loss = -masked_mean(mb.extras["advantages"] * out.logprobs, mask)
        return pg_loss, {"loss/policy": pg_loss.item()}
