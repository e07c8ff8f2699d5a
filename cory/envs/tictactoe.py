"""Tic-tac-toe as a text environment (after LMAct), plus the game's rules and perfect play.

The board is 9 cells, row by row from the top left, written as 9 digits: 0 empty, 1 the agent, 2 the
opponent. The agent's action is a cell 0-8. The reward is 0 per move and +1 / 0 / -1 for a win / draw
/ loss on the move that ends the game, so episodes have variable length (3 to 5 agent moves).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from cory.envs.base import AgentView, StepOutcome, TextDecisionEnv
from cory.envs.prompts import assemble, output_instructions

Board = tuple[int, ...]
EMPTY_BOARD: Board = (0,) * 9
LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))
OPPONENTS = ("random", "minimax", "noisy")
TIEBREAKS = ("first", "random")


def winner(board: Board) -> int:
    """1 or 2 if that player has three in a line, else 0."""
    for a, b, c in LINES:
        if board[a] and board[a] == board[b] == board[c]:
            return board[a]
    return 0


def legal_moves(board: Board) -> list[int]:
    return list(_legal(board))


@lru_cache(maxsize=None)
def _legal(board: Board) -> tuple[int, ...]:
    # Memoised: a game asks for the legal cells of the same board several times per move.
    return tuple(i for i, v in enumerate(board) if v == 0)


def play(board: Board, cell: int, player: int) -> Board:
    return board[:cell] + (player,) + board[cell + 1 :]


@lru_cache(maxsize=None)
def _negamax(board: Board, player: int) -> int:
    """Game value for `player`, who is to move: > 0 win, 0 draw, < 0 loss under perfect play.

    The magnitude is 1 + the empty cells left when the game is decided, so a quicker win (and a slower
    loss) scores higher; perfect players then take an immediate win instead of dawdling. Memoised on
    the board: there are fewer than 6,000 reachable positions.
    """
    if winner(board):
        # The previous mover completed a line: `player` has lost.
        return -(1 + board.count(0))
    moves = legal_moves(board)
    if not moves:
        return 0
    other = 3 - player
    return max(-_negamax(play(board, m, player), other) for m in moves)


def move_values(board: Board, player: int) -> dict[int, int]:
    """{cell: game value for `player` after playing it} for every legal cell."""
    return {m: -_negamax(play(tuple(board), m, player), 3 - player) for m in legal_moves(tuple(board))}


def best_moves(board: Board, player: int) -> list[int]:
    """The legal cells with the highest minimax value for `player` (ascending)."""
    values = move_values(board, player)
    top = max(values.values())
    return [m for m, v in values.items() if v == top]


def board_digits(board: Board) -> str:
    return "".join(str(v) for v in board)


def board_grid(board: Board) -> str:
    """The 9 digits as three rows of three (same digits as the one-line form)."""
    return "\n".join(" ".join(str(board[r * 3 + c]) for c in range(3)) for r in range(3))


class TicTacToeEnv(TextDecisionEnv):
    """The agent (1) against a built-in opponent (2).

    Keyword arguments (besides cot, question, invalid_penalty, reward_norm and reward_scale):
      opponent: "random" (uniform over empty cells), "minimax" (perfect play) or "noisy" (a random
        move with probability `noise`, perfect play otherwise).
      agent_first: the agent moves first (True) or the opponent does.
      tiebreak: how the minimax opponent picks among equally good moves: "random" or "first"
        (lowest cell, deterministic).
      noise: the noisy opponent's probability of a random move (0.5).
      show_legal: list the legal cells in the prompt.
    An occupied or unknown cell is an invalid action: a random empty cell is played and
    `invalid_penalty` is added. info adds: board (after the opponent's reply), outcome (at the end).
    """

    env_name = "cory/TicTacToe-v0"

    def __init__(
        self,
        opponent: str = "random",
        agent_first: bool = True,
        tiebreak: str = "random",
        noise: float = 0.5,
        show_legal: bool = True,
        cot: bool = True,
        question: str | None = "What is your next move?",
        invalid_penalty: float = -5.0,
        reward_norm: str = "none",
        reward_scale: float = 1.0,
        render_mode: str | None = None,
    ):
        super().__init__(
            cot=cot, question=question, invalid_penalty=invalid_penalty,
            reward_norm=reward_norm, reward_scale=reward_scale, render_mode=render_mode,
        )
        if opponent not in OPPONENTS:
            raise ValueError(f"opponent must be one of {', '.join(OPPONENTS)}; got {opponent!r}")
        if tiebreak not in TIEBREAKS:
            raise ValueError(f"tiebreak must be one of {', '.join(TIEBREAKS)}; got {tiebreak!r}")
        if not 0 <= noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {noise!r}")
        self.labels = [str(i) for i in range(9)]
        self.opponent = opponent
        self.agent_first = bool(agent_first)
        self.tiebreak = tiebreak
        self.noise = float(noise)
        self.show_legal = bool(show_legal)
        self.board: Board = EMPTY_BOARD
        self.last_opponent_move: int | None = None
        self._header: str | None = None

    def _new_instance(self, rng: np.random.Generator) -> None:
        # A game has no hidden instance; the opponent's randomness comes from the episode seed.
        self.board = EMPTY_BOARD
        self.last_opponent_move = None

    def _start(self) -> None:
        if not self.agent_first:
            self._opponent_move()

    def legal_actions(self) -> list[int]:
        return legal_moves(self.board)

    def agent_view(self) -> AgentView:
        return AgentView(t=self.t, legal=_legal(self.board), board=self.board)

    def _opponent_move(self) -> None:
        moves = _legal(self.board)
        rng = self.np_random
        if self.opponent == "random" or (self.opponent == "noisy" and rng.random() < self.noise):
            cell = moves[rng.integers(len(moves))]
        else:
            best = best_moves(self.board, 2)
            cell = best[0] if self.tiebreak == "first" else best[rng.integers(len(best))]
        self.board = play(self.board, cell, 2)
        self.last_opponent_move = cell

    def _finish(self, outcome: float) -> StepOutcome:
        self.record.outcome = outcome
        return StepOutcome(env_reward=outcome, terminated=True, info={"board": board_digits(self.board), "outcome": outcome})

    def _execute(self, action: int) -> StepOutcome:
        self.board = play(self.board, action, 1)
        if winner(self.board) == 1:
            return self._finish(1.0)
        if not _legal(self.board):
            return self._finish(0.0)
        self._opponent_move()
        if winner(self.board) == 2:
            return self._finish(-1.0)
        if not _legal(self.board):
            return self._finish(0.0)
        return StepOutcome(env_reward=0.0, terminated=False, info={"board": board_digits(self.board)})

    def _instructions(self) -> str:
        order = "You move first." if self.agent_first else "Your opponent moves first."
        return (
            "You are playing tic-tac-toe as player 1 against an opponent, player 2. "
            f"{order} The board is written as 9 digits, the cells 0-8 row by row from the top left: "
            "0 is an empty cell, 1 is your mark, 2 is your opponent's mark. Place three of your marks in a row, "
            "column or diagonal to win. You may only play an empty cell. At the end of the game you receive "
            "+1 for a win, 0 for a draw and -1 for a loss. Your goal is to maximize your reward."
        )

    def _render_prompt(self) -> str:
        if self._header is None:
            # Instructions and output format never change within an env: build them once.
            choices = "one of the legal cells listed below" if self.show_legal else "an empty cell (0-8)"
            self._header = assemble(self._instructions(), output_instructions(self.prompt_options.cot, choices))
        last = "" if self.last_opponent_move is None else f"Your opponent played cell {self.last_opponent_move}.\n"
        return f"{self._header}\n\n{last}{_board_section(self.board, self.show_legal)}\n\n{self.prompt_options.question}"


@lru_cache(maxsize=None)
def _board_section(board: Board, show_legal: bool) -> str:
    """The board lines of a prompt; memoised (a few thousand boards) since rendering dominates a step."""
    lines = [f"Board: {board_digits(board)}", board_grid(board)]
    legal = _legal(board)
    if show_legal and legal:
        lines.append("Legal actions: " + ", ".join(str(c) for c in legal))
    return "\n".join(lines)
