"""The interface every classical agent follows.

An agent plays one episode at a time on the environment's structured state (`AgentView`), never on
the prompt text:

    agent.reset(n_actions, rng)             before each episode
    a = agent.act(view)                     an action index in view.legal
    agent.update(view, a, reward)           the environment's own reward for that step
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cory.envs.base import AgentView


class Agent(Protocol):
    name: str

    def reset(self, n_actions: int, rng: np.random.Generator) -> None: ...

    def act(self, view: AgentView) -> int: ...

    def update(self, view: AgentView, action: int, reward: float) -> None: ...


class RandomAgent:
    """Uniform over the legal actions; the regret baseline and the random tic-tac-toe player."""

    name = "random"

    def reset(self, n_actions: int, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, view: AgentView) -> int:
        return int(view.legal[self.rng.integers(len(view.legal))])

    def update(self, view: AgentView, action: int, reward: float) -> None:
        pass
