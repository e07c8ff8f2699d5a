"""Advantage actor-critic: a value head learns V(s), the policy follows A = GAE(r, V).

    loss = agg(-A_t * log pi(a_t|s_t) + vf_coef * 0.5 * (V(s_t) - R_t)^2)
With algo.lam = 0 the advantage is the TD(0) error r_t + gamma V(s_{t+1}) - V(s_t); with lam = 1
it is the Monte-Carlo return minus V(s_t). The value loss is unclipped unless algo.value_clip is set.
"""

from cory.algorithms.base import Algorithm, register

A2C = register(Algorithm(name="a2c", estimator="gae", policy_loss="pg", value_loss=True,
                         defaults={"algo.value_clip": 0.0}))
