"""The GRPO family: G samples per prompt, group-normalised outcome advantages, no critic, KL as a
loss term (kl.penalty=auto; k3 by default).

    R_i = the episode's total shaped reward (score, penalties; KL too with kl.penalty=reward)
    A_i = (R_i - mean_group R) / std_group R            (std scaling: algo.scale_rewards)
    loss = agg(policy_loss_it + beta * KL_it - ent_coef * H_it)

grpo     (Shao et al., 2024)   clipped token ratio, token-mean.
dr_grpo  (Liu et al., 2025)    no std scaling; constant normaliser: sum / (max_new_tokens * G).
dapo     (Yu et al., 2025)     decoupled clip [1 - 0.2, 1 + 0.28], token-mean, groups whose scores
                               are all equal dropped (algo.dynamic_sampling); overlong penalty
                               (algo.overlong_buffer) or filtering (algo.overlong_filter) optional.
gspo     (Zheng et al., 2025)  sequence ratio exp(mean_t log r_t) clipped to [1 - 3e-4, 1 + 4e-4], seq-mean.
cispo    (MiniMax, 2025)       -sg(clip(r, 0, 5)) * A * log pi: clipped importance weight, every
                               token keeps its gradient.
"""

from cory.algorithms.base import Algorithm, register

_K3 = {"kl.estimator": "k3"}

GRPO = register(Algorithm(name="grpo", estimator="group", policy_loss="vanilla", kl_in_reward=False, defaults=_K3))
DR_GRPO = register(Algorithm(name="dr_grpo", estimator="group", policy_loss="vanilla", kl_in_reward=False,
                             defaults={**_K3, "algo.scale_rewards": False, "algo.loss_aggregation": "constant"}))
DAPO = register(Algorithm(name="dapo", estimator="group", policy_loss="vanilla", kl_in_reward=False,
                          defaults={**_K3, "algo.clip_range_high": 0.28, "algo.dynamic_sampling": True}))
GSPO = register(Algorithm(name="gspo", estimator="group", policy_loss="gspo", kl_in_reward=False,
                          defaults={**_K3, "algo.loss_aggregation": "seq-mean", "algo.clip_range": 3e-4,
                                    "algo.clip_range_high": 4e-4}))
CISPO = register(Algorithm(name="cispo", estimator="group", policy_loss="cispo", kl_in_reward=False,
                           defaults={**_K3, "algo.clip_range": 1.0, "algo.clip_range_high": 4.0}))
