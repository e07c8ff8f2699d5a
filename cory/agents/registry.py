"""The classical agents by name: `AGENTS` and `make_agent`."""

from __future__ import annotations

from collections.abc import Callable

from cory.agents.bandit import BetaThompsonAgent, EpsilonGreedyAgent, GaussianThompsonAgent, UCB1Agent
from cory.agents.base import Agent, RandomAgent
from cory.agents.linucb import LinUCBAgent
from cory.agents.minimax import MinimaxAgent

AGENTS: dict[str, Callable[..., Agent]] = {
    "random": RandomAgent,
    "epsilon-greedy": EpsilonGreedyAgent,
    "ucb1": UCB1Agent,
    "thompson": GaussianThompsonAgent,
    "thompson-beta": BetaThompsonAgent,
    "linucb": LinUCBAgent,
    "minimax": MinimaxAgent,
}


def make_agent(name: str, **kwargs) -> Agent:
    """A fresh agent by name, e.g. make_agent("ucb1", c=0.5)."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}")
    return AGENTS[name](**kwargs)
