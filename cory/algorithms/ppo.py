"""PPO (Schulman et al., 2017) for language models, with a value head.

Per token, with ratio r = pi(a_t|s_t) / pi_old(a_t|s_t) and GAE advantages A_t (whitened):
    policy loss = max(-A_t r, -A_t clip(r, 1 - eps_low, 1 + eps_high))   (algo.dual_clip optional)
    value loss  = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
    loss        = agg(policy loss + vf_coef * value loss [+ beta KL - ent_coef H])
Several epochs of shuffled minibatches reuse each rollout (algo.epochs, algo.minibatch_size).
The KL penalty is per-token in the reward. The whole objective is `cory.losses.objective`.
"""

from cory.algorithms.base import Algorithm, register

PPO = register(Algorithm(name="ppo", estimator="gae", policy_loss="vanilla", value_loss=True))
