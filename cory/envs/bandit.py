"""Multi-armed bandits as text environments (after BanditBench).

Two presentations: `button` (arms are colour names) and `continuous` (arms `0, 1, 2, ...`). Two
reward families: Gaussian (means ~ U(0, 1), reward ~ N(mean, sigma)) and Bernoulli (the best arm, at
a random index, pays 1 with probability 0.5 + gap/2, the others 0.5 - gap/2). Horizon 50 by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cory.envs.base import StepOutcome, TextDecisionEnv
from cory.envs.prompts import PromptOptions, assemble, history_block, output_instructions, step_line, summary_block

COLOURS = (
    "blue", "green", "red", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "gray", "cyan", "magenta", "olive", "navy", "teal", "maroon", "lime", "gold", "silver",
)
VARIANTS = ("button", "continuous")
DISTRIBUTIONS = ("gaussian", "bernoulli")


def arm_labels(n_arms: int, variant: str) -> list[str]:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if n_arms < 2:
        raise ValueError(f"n_arms must be at least 2, got {n_arms}")
    if variant == "button":
        if n_arms > len(COLOURS):
            raise ValueError(f"the button variant has {len(COLOURS)} colours; n_arms={n_arms} is too many")
        return list(COLOURS[:n_arms])
    return [str(i) for i in range(n_arms)]


def bandit_instructions(labels: Sequence[str], variant: str, horizon: int) -> str:
    names = ", ".join(labels)
    if variant == "button":
        world = (
            f"You are a bandit algorithm in a room with {len(labels)} buttons labeled {names}. "
            "Each time you press a button you receive a reward, drawn from a distribution that belongs "
            "to that button and does not change."
        )
    else:
        world = (
            f"You are a bandit algorithm choosing among {len(labels)} arms labeled {names}. "
            "Each time you pull an arm you receive a reward, drawn from a distribution that belongs "
            "to that arm and does not change."
        )
    return f"{world} You have {horizon} steps in total (the time horizon). Your goal is to maximize the total reward over the {horizon} steps."


def render_bandit_prompt(
    labels: Sequence[str],
    variant: str,
    horizon: int,
    history: Sequence[tuple[int, float]],
    options: PromptOptions = PromptOptions(),
) -> str:
    """The full prompt for a bandit given its history of (arm index, reward) pairs, oldest first.

    A pure function, so probes (frequency bias, knowing-doing) can render prompts for histories that
    no environment produced.
    """
    lines = [step_line(i + 1, labels[a], r) for i, (a, r) in enumerate(history)]
    counts = [0] * len(labels)
    sums = [0.0] * len(labels)
    for a, r in history:
        counts[a] += 1
        sums[a] += r
    return _assemble_bandit_prompt(labels, variant, horizon, lines, counts, sums, options)


def _assemble_bandit_prompt(labels, variant, horizon, lines, counts, sums, options: PromptOptions) -> str:
    # The environment keeps `lines`, `counts` and `sums` up to date step by step: re-formatting the
    # whole history every step would make an episode quadratic in the horizon.
    choices = "one of the buttons listed above" if variant == "button" else "one of the arms listed above"
    return assemble(
        bandit_instructions(labels, variant, horizon),
        output_instructions(options.cot, choices),
        history_block(lines, options.history),
        summary_block(labels, counts, sums) if options.summary else "",
        options.question,
    )


class BanditEnv(TextDecisionEnv):
    """A K-armed bandit; one step = one response = one pull.

    Keyword arguments (besides the shared ones of `TextDecisionEnv`):
      n_arms: 5, 10 or 20 in the paper (2..20 allowed).
      variant: "button" (colour labels) or "continuous" (0..K-1).
      distribution: "gaussian" or "bernoulli".
      sigma: Gaussian reward noise (0.1 low, 1 medium, 3 high).
      gap: Bernoulli gap between the best arm and the others (0.2 hard, 0.5 easy).
      horizon: steps per episode (50).
    info adds: regret (best mean minus the executed arm's mean), best_action, means (the instance).
    """

    env_name = "cory/Bandit-v0"

    def __init__(
        self,
        n_arms: int = 10,
        variant: str = "button",
        distribution: str = "gaussian",
        sigma: float = 1.0,
        gap: float = 0.2,
        horizon: int = 50,
        **shared,
    ):
        super().__init__(**shared)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}")
        if distribution == "gaussian" and not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        if distribution == "bernoulli" and not 0 < gap <= 1:
            raise ValueError(f"gap must be in (0, 1], got {gap!r}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.labels = arm_labels(n_arms, variant)
        self.variant = variant
        self.distribution = distribution
        self.sigma = float(sigma)
        self.gap = float(gap)
        self.horizon = int(horizon)
        self.means = np.zeros(n_arms)
        self._history: list[tuple[int, float]] = []
        if distribution == "gaussian":
            # Marginal moments of a reward from a random arm: U(0,1) mean plus N(0, sigma) noise.
            self.reward_mean, self.reward_std = 0.5, math.sqrt(1 / 12 + self.sigma**2)
        else:
            self.reward_mean, self.reward_std = 0.5, 0.5

    def _new_instance(self, rng: np.random.Generator) -> None:
        k = len(self.labels)
        if self.distribution == "gaussian":
            self.means = rng.uniform(0.0, 1.0, size=k)
        else:
            self.means = np.full(k, 0.5 - self.gap / 2)
            self.means[rng.integers(k)] = 0.5 + self.gap / 2
        self._history = []
        self._lines: list[str] = []
        self._counts = [0] * k
        self._sums = [0.0] * k

    def _execute(self, action: int) -> StepOutcome:
        mean = self.means[action]
        if self.distribution == "gaussian":
            reward = float(self.np_random.normal(mean, self.sigma))
        else:
            reward = float(self.np_random.random() < mean)
        self._history.append((action, reward))
        self._lines.append(step_line(self.t, self.labels[action], reward))
        self._counts[action] += 1
        self._sums[action] += reward
        best = int(np.argmax(self.means))
        return StepOutcome(
            env_reward=reward,
            terminated=self.t >= self.horizon,
            regret=float(self.means[best] - mean),
            best_action=best,
        )

    def _render_prompt(self) -> str:
        return _assemble_bandit_prompt(
            self.labels, self.variant, self.horizon, self._lines, self._counts, self._sums, self.prompt_options
        )

    @property
    def history(self) -> list[tuple[int, float]]:
        """(arm index, env reward) per step so far, oldest first."""
        return list(self._history)


# -- what a history of pulls shows: (action index, reward) pairs, oldest first ---------------------
History = Sequence[tuple[int, float]]


def counts_and_means(history: History, n_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """[K] counts N(a) and [K] empirical means (NaN for untried actions)."""
    counts = np.zeros(n_actions, dtype=np.int64)
    sums = np.zeros(n_actions)
    for a, r in history:
        counts[a] += 1
        sums[a] += r
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return counts, means


def most_frequent_actions(history: History, n_actions: int) -> set[int]:
    """The actions taken most often (a set: ties are all 'most frequent')."""
    counts, _ = counts_and_means(history, n_actions)
    return set(np.flatnonzero(counts == counts.max()).tolist())


def greedy_actions(history: History, n_actions: int) -> set[int]:
    """The tried actions with the best observed mean reward (empty before any step)."""
    _, means = counts_and_means(history, n_actions)
    if np.all(np.isnan(means)):
        return set()
    return set(np.flatnonzero(means == np.nanmax(means)).tolist())


def classify_frequency_bias(action: int, history: History, n_actions: int) -> str:
    """'frequent' if `action` is a most-taken action, else 'greedy' if it has the best observed mean,
    else 'other'. Frequent is checked first: when the repeated action also has the best mean the
    choice counts as frequency-driven (the bias the probe looks for)."""
    if action in most_frequent_actions(history, n_actions):
        return "frequent"
    if action in greedy_actions(history, n_actions):
        return "greedy"
    return "other"
