"""Classical multi-armed bandit agents: epsilon-greedy, UCB1 and Thompson sampling.

All keep per-arm counts N(a) and reward sums; "mean" is the empirical mean S(a) / N(a).
"""

from __future__ import annotations

import math

import numpy as np

from cory.envs.base import argmax_random_tie
from cory.envs.base import AgentView


class _CountingAgent:
    """Per-arm counts and reward sums, shared by the bandit agents."""

    name = "counting"

    def reset(self, n_actions: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.counts = np.zeros(n_actions, dtype=np.int64)
        self.sums = np.zeros(n_actions)

    def update(self, view: AgentView, action: int, reward: float) -> None:
        self.counts[action] += 1
        self.sums[action] += reward

    def _untried(self) -> np.ndarray:
        return np.flatnonzero(self.counts == 0)

    def _means(self) -> np.ndarray:
        return np.divide(self.sums, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0)


class EpsilonGreedyAgent(_CountingAgent):
    """Tries every arm once (random order), then the best empirical mean, or with probability
    `epsilon` a uniformly random arm."""

    name = "epsilon-greedy"

    def __init__(self, epsilon: float = 0.1):
        if not 0 <= epsilon <= 1:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        self.epsilon = epsilon

    def act(self, view: AgentView) -> int:
        untried = self._untried()
        if len(untried):
            return int(untried[self.rng.integers(len(untried))])
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(len(self.counts)))
        return argmax_random_tie(self._means(), self.rng)


class UCB1Agent(_CountingAgent):
    """UCB1-style index (Auer et al. 2002): every arm once, then argmax mean(a) + alpha *
    sqrt(ln t / N(a)), t = steps so far.

    alpha = sqrt(2) is the textbook UCB1 constant for rewards in [0, 1]; the default 0.5 is
    BanditBench's alpha-UCB, which explores less and does better over a 50-step horizon.
    """

    name = "ucb1"

    def __init__(self, alpha: float = 0.5):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        self.alpha = alpha

    def act(self, view: AgentView) -> int:
        untried = self._untried()
        if len(untried):
            return int(untried[self.rng.integers(len(untried))])
        return argmax_random_tie(ucb_index(self.sums, self.counts, self.alpha), self.rng)


def ucb_index(sums: np.ndarray, counts: np.ndarray, alpha: float) -> np.ndarray:
    """[K] mean + alpha * sqrt(ln t / N) with t = sum of counts; +inf for arms never tried."""
    t = max(int(counts.sum()), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        index = sums / counts + alpha * np.sqrt(math.log(t) / counts)
    return np.where(counts > 0, index, np.inf)


class GaussianThompsonAgent(_CountingAgent):
    """Thompson sampling with a N(prior_mean, prior_std^2) prior per arm and known noise `sigma`.

    Posterior of arm a after N(a) rewards with sum S(a): precision 1/prior_std^2 + N/sigma^2,
    mean (prior_mean/prior_std^2 + S/sigma^2) / precision. Act on one draw per arm.
    """

    name = "thompson"

    def __init__(self, sigma: float = 1.0, prior_mean: float = 0.5, prior_std: float = 1.0):
        if not sigma > 0 or not prior_std > 0:
            raise ValueError(f"sigma and prior_std must be > 0, got {sigma!r}, {prior_std!r}")
        self.sigma, self.prior_mean, self.prior_std = sigma, prior_mean, prior_std

    def act(self, view: AgentView) -> int:
        precision = 1 / self.prior_std**2 + self.counts / self.sigma**2
        mean = (self.prior_mean / self.prior_std**2 + self.sums / self.sigma**2) / precision
        return argmax_random_tie(self.rng.normal(mean, 1 / np.sqrt(precision)), self.rng)


class BetaThompsonAgent(_CountingAgent):
    """Beta-Bernoulli Thompson sampling, Beta(1, 1) priors. A reward r outside {0, 1} is clipped to
    [0, 1] and replaced by a Bernoulli(r) draw (Agrawal & Goyal 2012), which keeps the posterior
    update exact in distribution for any bounded reward."""

    name = "thompson-beta"

    def reset(self, n_actions: int, rng: np.random.Generator) -> None:
        super().reset(n_actions, rng)
        self.successes = np.zeros(n_actions)

    def update(self, view: AgentView, action: int, reward: float) -> None:
        super().update(view, action, reward)
        r = min(max(reward, 0.0), 1.0)
        self.successes[action] += r if r in (0.0, 1.0) else float(self.rng.random() < r)

    def act(self, view: AgentView) -> int:
        draws = self.rng.beta(1 + self.successes, 1 + self.counts - self.successes)
        return argmax_random_tie(draws, self.rng)
