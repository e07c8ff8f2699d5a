"""RLOO (Ahmadian et al., 2024): G samples per prompt, leave-one-out baseline, no critic.

    R_i = score_i - beta * sum_t KL_t          (sequence-level KL penalty, in the shaped rewards)
    A_i = R_i - mean_{j != i} R_j              (over the other samples of the same prompt)
    loss = agg(max(-A_i * ratio_t, -A_i * clip(ratio_t, 1 - eps, 1 + eps)))
On the first (on-policy) pass the ratio is 1 and this is REINFORCE with the leave-one-out baseline.
"""

from cory.algorithms.base import Algorithm, register

RLOO = register(Algorithm(name="rloo", estimator="loo", policy_loss="vanilla"))
