"""Classical baselines for the text environments: random, epsilon-greedy, UCB1, Thompson sampling
(Gaussian and Beta-Bernoulli), LinUCB and minimax. `run_agent` plays them in N parallel environments.
"""

from __future__ import annotations

from cory.agents.bandit import BetaThompsonAgent, EpsilonGreedyAgent, GaussianThompsonAgent, UCB1Agent
from cory.agents.base import Agent, RandomAgent
from cory.agents.linucb import LinUCBAgent
from cory.agents.minimax import MinimaxAgent
from cory.agents.registry import AGENTS, make_agent
from cory.agents.run import run_agent

__all__ = [
    "AGENTS", "Agent", "BetaThompsonAgent", "EpsilonGreedyAgent", "GaussianThompsonAgent", "LinUCBAgent",
    "MinimaxAgent", "RandomAgent", "UCB1Agent", "make_agent", "run_agent",
]
