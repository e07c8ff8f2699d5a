"""LinUCB with disjoint linear models (Li et al. 2010), the contextual bandit baseline."""

from __future__ import annotations

import numpy as np

from cory.envs.base import argmax_random_tie
from cory.envs.base import AgentView


class LinUCBAgent:
    """Per arm a: ridge regression of reward on the context, A_a = lambda I + sum x x^T,
    b_a = sum r x, theta_a = A_a^-1 b_a; act on argmax theta_a . x + alpha sqrt(x^T A_a^-1 x)."""

    name = "linucb"

    def __init__(self, alpha: float = 1.0, ridge: float = 1.0):
        if alpha < 0 or not ridge > 0:
            raise ValueError(f"need alpha >= 0 and ridge > 0, got {alpha!r}, {ridge!r}")
        self.alpha, self.ridge = alpha, ridge

    def reset(self, n_actions: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.n_actions = n_actions
        self.A_inv: np.ndarray | None = None  # [K, d, d], created on the first context
        self.b: np.ndarray | None = None  # [K, d]

    def _ensure(self, d: int) -> None:
        if self.A_inv is None:
            self.A_inv = np.tile(np.eye(d) / self.ridge, (self.n_actions, 1, 1))
            self.b = np.zeros((self.n_actions, d))

    def act(self, view: AgentView) -> int:
        if view.context is None:
            raise ValueError("LinUCB needs a contextual environment (view.context is None)")
        x = np.asarray(view.context, dtype=float)
        self._ensure(x.shape[0])
        theta = np.einsum("kij,kj->ki", self.A_inv, self.b)
        width = np.sqrt(np.einsum("i,kij,j->k", x, self.A_inv, x))
        return argmax_random_tie(theta @ x + self.alpha * width, self.rng)

    def update(self, view: AgentView, action: int, reward: float) -> None:
        x = np.asarray(view.context, dtype=float)
        self._ensure(x.shape[0])
        # Sherman-Morrison keeps A^-1 current without a solve per step.
        A_inv = self.A_inv[action]
        Ax = A_inv @ x
        self.A_inv[action] = A_inv - np.outer(Ax, Ax) / (1.0 + x @ Ax)
        self.b[action] += reward * x
