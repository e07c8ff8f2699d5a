"""On-policy distillation (Agarwal et al., 2024; Lu and Thinking Machines, 2025): the policy samples,
a teacher grades every token it wrote by its own log-probability.

With the teacher's distribution p_T (distill.teacher) and the policy's q, per token t:
    r_t = -coef x KL_t(q || p_T)        k1: log q(x_t) - log p_T(x_t);  full: sum_v q(v) (log q(v) - log p_T(v))
          + task_coef x score            at the turn's last token (0 by default: distillation alone)
    A_t = G_t = sum_{s >= t} r_s         (rewards-to-go, no baseline: the policy gradient of minus the
                                          reverse KL of whole responses)
    loss = agg(max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)))
The teacher's reward is shaping (`cory.shaping.shaped_rewards`), so any other algorithm takes it
too when distill.teacher is set; this declaration is the usual recipe.
"""

from cory.algorithms.base import Algorithm, register

DISTILL = register(Algorithm(name="distill", estimator="returns", policy_loss="vanilla",
                             defaults={"algo.baseline": "none", "distill.task_coef": 0.0, "kl.beta": 0.0}))
