"""PPO (Schulman et al., 2017) for language models, with a value head.

Per token, with ratio = pi(a_t|s_t) / pi_old(a_t|s_t) and GAE advantages A_t:
    policy loss = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))
    value loss  = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
    loss        = mean(policy loss) + vf_coef * mean(value loss)
Several epochs of shuffled minibatches reuse each rollout (algo.epochs, algo.minibatch_size).
Advantages are whitened over the rollout; the KL penalty is per-token in the reward.
"""

from __future__ import annotations

import torch

from cory.algorithms.a2c import fill_gae_advantages
from cory.algorithms.base import Algorithm, register
from cory.kl import masked_mean


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_range):
    """[B, L] PPO's per-token policy loss and [B, L] clipped indicator."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped).float()


def clipped_value_loss(values, old_values, returns, value_clip):
    """[B, L] 0.5 * squared value error, pessimistic over the clipped and unclipped prediction."""
    err = (values - returns) ** 2
    if value_clip <= 0:
        return 0.5 * err
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    return 0.5 * torch.maximum(err, (clipped - returns) ** 2)


def policy_diagnostics(logprobs, old_logprobs, mask) -> dict[str, float]:
    """Approximate KL between the updated and the behaviour policy (k1 and k3)."""
    log_ratio = (logprobs - old_logprobs).detach()
    return {
        "policy/approx_kl_k1": masked_mean(-log_ratio, mask).item(),
        "policy/approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
    }


@register("ppo")
class PPO(Algorithm):
    needs_values = True

    def advantages(self, batch, token_rewards):
        fill_gae_advantages(batch, token_rewards, self.cfg.algo)

    def loss(self, out, mb):
        a = self.cfg.algo
        mask = mb.response_mask
        pg, clipped = clipped_surrogate(out.logprobs, mb.logprobs, mb.extras["advantages"], a.clip_range)
        vf = clipped_value_loss(out.values, mb.values, mb.extras["returns"], a.value_clip)
        pg_loss, vf_loss = masked_mean(pg, mask), masked_mean(vf, mask)
        info = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "policy/clip_fraction": masked_mean(clipped, mask).item()}
        info.update(policy_diagnostics(out.logprobs, mb.logprobs, mask))
        return pg_loss + a.vf_coef * vf_loss, info
