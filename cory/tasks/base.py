"""A single-turn task and its adapter to the Sampler's environment protocol."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cory.errors import UsageError
from cory.jsonl import jsonl_rows
from cory.rewards import RewardFn


class TaskDataError(UsageError):
    """A prompt file that cannot be used."""


def load_prompt_file(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts from a JSONL file (one object per line) or a CSV file with a header row."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"prompt file not found: {path}")
    head = path.read_bytes()[:8192]
    if b"\0" in head:
        raise TaskDataError(f"prompt file {path} is binary, not JSONL or CSV text")
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    prompts: list[str] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise TaskDataError(f"{path}: no column '{column}' (columns: {', '.join(reader.fieldnames or [])})")
            prompts = [row[column] for row in reader]
    else:
        prompts = [str(row[column]) for _, row in jsonl_rows(path, TaskDataError, (column,), "prompt file")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise TaskDataError(f"{path}: no prompts found")
    return prompts


class PromptStream(Protocol):
    """Training prompts read in a run's order (`cory.tasks.dataset_prompts.DatasetPrompts`): its
    position is part of a checkpoint."""

    def draw(self, n: int) -> list[str]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class PromptTask:
    """Prompts to train on, a fixed evaluation set, and a reward for (prompt, response) pairs."""

    name: str
    train_prompts: list[str]
    eval_prompts: list[str]
    reward: RewardFn
    stream: PromptStream | None = None
    """Training prompts read in order from a dataset (task.dataset) instead of drawn from train_prompts."""

    def sample_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """n training prompts: the stream's next ones, or drawn with replacement by the run's `rng`."""
        if self.stream is not None:
            return self.stream.draw(n)
        idx = rng.integers(0, len(self.train_prompts), size=n)
        return [self.train_prompts[i] for i in idx]

    def state_dict(self) -> dict:
        """Where the prompt stream stands (empty without one: the run's generator holds the order)."""
        return self.stream.state_dict() if self.stream is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.stream is not None:
            self.stream.load_state_dict(state)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.reward(prompts, responses)


class TaskEnv:
    """A PromptTask as a batch of one-turn episodes (the Sampler's environment protocol)."""

    def __init__(self, task: PromptTask, prompts: list[str] | None = None):
        self.task = task
        self.fixed_prompts = prompts
        self.prompts: list[str] = []

    def reset(self, n: int, rng: np.random.Generator, group_size: int = 1) -> list[str]:
        base = self.fixed_prompts[:n] if self.fixed_prompts is not None else self.task.sample_prompts(n, rng)
        self.prompts = [p for p in base for _ in range(group_size)]
        return list(self.prompts)

    def step(self, responses: list[str]):
        rewards = self.task.score(self.prompts, responses)
        n = len(responses)
        return [""] * n, rewards, [True] * n, [{} for _ in range(n)]
