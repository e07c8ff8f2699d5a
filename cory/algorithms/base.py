"""The algorithm plug-in interface and its registry.

The Learner owns the loop (rollout scoring, KL shaping, epochs of minibatches, the optimizer); an
algorithm only says how to turn per-token rewards into advantages and how to compute its loss.
"""

from __future__ import annotations

from typing import Callable

import torch

from cory.rollout import Rollout

ALGORITHMS: dict[str, type["Algorithm"]] = {}


def register(name: str) -> Callable[[type["Algorithm"]], type["Algorithm"]]:
    def deco(cls: type["Algorithm"]) -> type["Algorithm"]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return deco


class Algorithm:
    name = "base"
    needs_values = False
    """The policy needs a value head (actor-critic)."""
    kl_in_reward = True
    """KL to the reference is a per-token reward penalty (False: the algorithm adds a loss term)."""
    group_size = 1
    """Samples per prompt."""

    def __init__(self, cfg):
        self.cfg = cfg

    def advantages(self, batch: Rollout, token_rewards: torch.Tensor) -> None:
        """Fill batch.extras (at least 'advantages' [B, Lr]) from per-token rewards [B, Lr]."""
        raise NotImplementedError

    def loss(self, out, mb: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of one minibatch from the policy's forward outputs, and diagnostics."""
        raise NotImplementedError


def make_algorithm(cfg) -> Algorithm:
    if cfg.algo.name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{cfg.algo.name}'; algorithms: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[cfg.algo.name](cfg)
