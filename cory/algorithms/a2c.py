"""Advantage actor-critic: a value head learns V(s), the policy follows A = GAE(r, V).

    loss = -mean(A_t * log pi(a_t|s_t)) + vf_coef * 0.5 * mean((V(s_t) - R_t)^2)
With algo.lam = 0 the advantage is the TD(0) error r_t + gamma V(s_{t+1}) - V(s_t); with lam = 1
it is the Monte-Carlo return minus V(s_t).
"""

from __future__ import annotations

from cory.advantages import gae, whiten
from cory.algorithms.base import Algorithm, register
from cory.kl import masked_mean


def fill_gae_advantages(batch, token_rewards, algo_cfg) -> None:
    """batch.extras['advantages'] (whitened if asked) and ['returns'] (value targets) by GAE."""
    mask = batch.response_mask
    adv, returns = gae(token_rewards, batch.values, mask, algo_cfg.gamma, algo_cfg.lam, batch.episode_ids, batch.turn_index,
                       algo_cfg.turn_gamma)
    batch.extras["returns"] = returns
    batch.extras["advantages"] = whiten(adv, mask) if algo_cfg.whiten_advantages else adv


@register("a2c")
class A2C(Algorithm):
    needs_values = True

    def advantages(self, batch, token_rewards):
        fill_gae_advantages(batch, token_rewards, self.cfg.algo)

    def loss(self, out, mb):
        mask = mb.response_mask
        pg_loss = -masked_mean(mb.extras["advantages"] * out.logprobs, mask)
        vf_loss = masked_mean(0.5 * (out.values - mb.extras["returns"]) ** 2, mask)
        return pg_loss + self.cfg.algo.vf_coef * vf_loss, {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item()}
