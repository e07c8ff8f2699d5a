"""KL control while sampling: how far a policy may drift from its reference, enforced token by token.

    exact.py     the exact KL over the vocabulary and the log-probs of a two-distribution mixture
    ensemble.py  the pessimistic ensemble reference (pointwise minimum of K members, missing mass h)
    lockstep.py  a frozen model (or ensemble) that follows a generation with its own KV cache
    control.py   the sampling-control protocol and its typed per-token output (`ControlOutput`)
    budget.py    the hard per-episode KL budget (`HardBudgetHook`, `EpisodeBudget`)
    help.py      asking a trusted model for help where the ensemble's missing mass is high

The KL estimators over sampled tokens (k1, k2, k3) and the penalty-coefficient controllers stay in
`cory.kl`: they act in training, on log-probs of sampled tokens, not while sampling.
"""
