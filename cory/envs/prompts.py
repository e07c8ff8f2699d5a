"""Prompt rendering shared by the text environments.

A prompt is, in order: the task instructions (role, actions, horizon, "maximize the total reward"),
the output instructions (with or without chain-of-thought), the last C steps of history as
`Step=3 Action=green Reward=0.31` lines, an optional per-action summary (count, mean reward), and a
closing question. Every environment builds its own instructions and calls these helpers for the rest,
so a change of wording here changes every environment the same way.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

# Observations and responses are plain text. Text spaces check every character against a charset;
# the environments only ever write printable ASCII, so that is the observation charset.
PRINTABLE = frozenset(string.printable)
MAX_OBSERVATION_CHARS = 65_536
MAX_RESPONSE_CHARS = 8_192

COT_INSTRUCTIONS = (
    "Think step-by-step and output your final answer in the format ACTION=X where X is {choices}. "
    "Provide your (SHORT!) thinking process and your answer ACTION=X"
)
DIRECT_INSTRUCTIONS = "Output ONLY your final answer in the format ACTION=X."
DEFAULT_QUESTION = "What do you predict next?"


@dataclass(frozen=True)
class PromptOptions:
    """How an environment renders its prompts (set through the environment's keyword arguments)."""

    cot: bool = True
    """Ask for short step-by-step reasoning before ACTION=X (False: the answer only)."""
    history: int | None = None
    """Show only the last C steps of history (None: all of it; 0: none)."""
    summary: bool = False
    """Add a per-action summary: how often each action was taken and its mean reward."""
    question: str = DEFAULT_QUESTION
    """The closing line."""

    def __post_init__(self):
        if self.history is not None and (not isinstance(self.history, int) or self.history < 0):
            raise ValueError(f"history must be None or a non-negative int, got {self.history!r}")


def output_instructions(cot: bool, choices: str = "one of the arms listed above") -> str:
    """The answer-format paragraph; `choices` completes "where X is ..." in the CoT variant."""
    return COT_INSTRUCTIONS.format(choices=choices) if cot else DIRECT_INSTRUCTIONS


def format_reward(reward: float) -> str:
    return f"{reward:.2f}"


def step_line(step: int, label: str, reward: float, **fields: str) -> str:
    """`Step=3 Action=green Reward=0.31`; extra `fields` (e.g. User=[...]) go between Step and Action."""
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    return f"Step={step}{extra} Action={label} Reward={format_reward(reward)}"


def history_block(lines: Sequence[str], window: int | None) -> str:
    """The last `window` history lines with a header saying how much is shown ('' when nothing)."""
    if not lines or window == 0:
        return ""
    shown = list(lines) if window is None else list(lines[-window:])
    if len(shown) == len(lines):
        header = f"So far you have taken {len(lines)} step(s) with the following choices and rewards:"
    else:
        header = f"So far you have taken {len(lines)} steps; the last {len(shown)} choices and rewards are:"
    return "\n".join([header, *shown])


def summary_block(labels: Sequence[str], counts: Sequence[int], sums: Sequence[float]) -> str:
    """One line per action: `blue: chosen 3 times, mean reward 0.52` (or `not chosen yet`)."""
    rows = []
    for label, n, s in zip(labels, counts, sums):
        times = "1 time" if n == 1 else f"{n} times"
        rows.append(f"{label}: chosen {times}, mean reward {format_reward(s / n)}" if n else f"{label}: not chosen yet")
    return "\n".join(["Summary of your choices so far:", *rows])


def assemble(*sections: str) -> str:
    """Join the non-empty sections with blank lines."""
    return "\n\n".join(s.strip("\n") for s in sections if s and s.strip())
