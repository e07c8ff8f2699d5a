"""Perfect tic-tac-toe play as an agent (the game solver itself lives with the game)."""

from __future__ import annotations

import numpy as np

from cory.envs.base import AgentView
from cory.envs.tictactoe import best_moves


class MinimaxAgent:
    """Plays a minimax-optimal cell for player 1 (the agent), never loses.

    tiebreak: "first" (lowest cell among the best, deterministic) or "random".
    """

    name = "minimax"

    def __init__(self, tiebreak: str = "random"):
        if tiebreak not in ("first", "random"):
            raise ValueError(f"tiebreak must be 'first' or 'random', got {tiebreak!r}")
        self.tiebreak = tiebreak

    def reset(self, n_actions: int, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, view: AgentView) -> int:
        if view.board is None:
            raise ValueError("MinimaxAgent needs a board (view.board is None): use cory/TicTacToe-v0")
        best = best_moves(view.board, 1)
        return best[0] if self.tiebreak == "first" else best[self.rng.integers(len(best))]

    def update(self, view: AgentView, action: int, reward: float) -> None:
        pass
