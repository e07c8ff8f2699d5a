"""An algorithm is a declaration: which advantage estimator, which policy loss, a value loss or not,
whether KL goes into the reward or the loss, and the config defaults it brings.

The estimators live in `cory.advantages`, the losses and the one objective in `cory.losses`; the
Learner runs them. Adding an algorithm is a few lines: `register(Algorithm(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cory.advantages import ESTIMATORS
from cory.losses import POLICY_LOSSES, VALUE_LOSS_KEYS, ObjectiveTerms

ALGORITHMS: dict[str, "Algorithm"] = {}


@dataclass(frozen=True)
class Algorithm:
    name: str
    estimator: str
    """Registered advantage estimator (`cory.advantages.ESTIMATORS`)."""
    policy_loss: str
    """Registered policy loss (`cory.losses.POLICY_LOSSES`)."""
    value_loss: bool = False
    """Actor-critic: the policy has a value head trained by the clipped value loss."""
    kl_in_reward: bool = True
    """With kl.penalty=auto: KL to the reference is a per-token reward penalty (False: a loss term)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Config defaults this algorithm brings (`section.key` -> value); explicit settings win."""
    group_size: int = 1
    """Samples per prompt; set from algo.group_size by `make_algorithm` when the estimator needs groups."""

    @property
    def needs_values(self) -> bool:
        return self.value_loss

    def keys(self) -> set[str]:
        """The algorithm-specific `algo.*` keys this algorithm reads."""
        keys = set(ESTIMATORS[self.estimator].keys) | set(POLICY_LOSSES[self.policy_loss].keys)
        if self.value_loss:
            keys |= set(VALUE_LOSS_KEYS)
        if self.grouped:
            keys.add("dynamic_sampling")
        return keys

    @property
    def grouped(self) -> bool:
        return ESTIMATORS[self.estimator].grouped

    def kl_in_rewards(self, penalty: str) -> bool:
        """Whether KL enters the rewards (else the loss) under kl.penalty (auto: the algorithm's choice)."""
        return self.kl_in_reward if penalty == "auto" else penalty == "reward"

    def estimate(self, rewards, mask, values, episode_ids, turn_index, group_ids, a):
        """(advantages [B, L], returns [B, L] or None): the estimator with its settings from `a` (algo.*)."""
        estimator = ESTIMATORS[self.estimator]
        settings = {k: getattr(a, k) for k in estimator.keys if k != "group_size"}
        return estimator.fn(rewards, mask, values, episode_ids, turn_index, group_ids, **settings)

    def objective_terms(self, a, kl_penalty: str, kl_estimator: str) -> ObjectiveTerms:
        """The objective's terms under `a` (algo.*), kl.penalty and kl.estimator."""
        loss = POLICY_LOSSES[self.policy_loss]
        return ObjectiveTerms(
            policy_loss=self.policy_loss, policy_settings={k: getattr(a, k) for k in loss.keys},
            kl_estimator=None if self.kl_in_rewards(kl_penalty) else kl_estimator, ent_coef=a.ent_coef,
            value_loss=self.value_loss, vf_coef=a.vf_coef, value_clip=a.value_clip)


def register(algorithm: Algorithm) -> Algorithm:
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def make_algorithm(cfg) -> Algorithm:
    """The declaration named by cfg.algo.name, with its group size for this config."""
    if cfg.algo.name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{cfg.algo.name}'; algorithms: {', '.join(sorted(ALGORITHMS))}")
    algorithm = ALGORITHMS[cfg.algo.name]
    # REINFORCE's leave-one-out baseline needs several samples per prompt too.
    grouped = algorithm.grouped or (algorithm.estimator == "returns" and cfg.algo.baseline == "loo")
    return replace(algorithm, group_size=cfg.algo.group_size if grouped else 1)
