"""RL algorithms, registered by name. Each is a short file: which advantage estimator, which loss."""

from cory.algorithms.base import ALGORITHMS, Algorithm, make_algorithm, register
from cory.algorithms import a2c, grpo, ppo, reinforce, rloo  # noqa: F401  (registers)

__all__ = ["ALGORITHMS", "Algorithm", "make_algorithm", "register"]
