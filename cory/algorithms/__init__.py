"""RL algorithms, registered by name. Each is a declaration: estimator, policy loss, value loss."""

from cory.algorithms.base import ALGORITHMS, Algorithm, make_algorithm, register
from cory.algorithms import a2c, distill, grpo, ppo, reinforce, rloo  # noqa: F401  (registers)

__all__ = ["ALGORITHMS", "Algorithm", "make_algorithm", "register"]
