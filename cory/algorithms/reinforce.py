"""REINFORCE: the policy gradient with an optional baseline.

    A_t = G_t - b,   loss = agg(-A_t * log pi(a_t | s_t))
G_t is the return from token t (task score plus the per-token KL penalty); b is none, the batch
mean return of turns at the same index (Monte-Carlo baseline), or the leave-one-out mean of the
other samples of the same prompt at the same turn (algo.group_size samples per prompt).
"""

from cory.algorithms.base import Algorithm, register

REINFORCE = register(Algorithm(name="reinforce", estimator="returns", policy_loss="pg"))
