"""What happened in one episode, step by step: the record every text environment keeps.

The same record comes back whether a classical agent or a language model played the episode
(`cory.agents.run_agent`, `GymTextEnvBatch.episodes()`), so metrics and plots take one input type.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class EpisodeRecord:
    """Per-step sequences of one episode; every list has one entry per agent step."""

    env_id: str
    labels: list[str]
    """The action labels; actions below are indices into this list."""
    instance_seed: int | None = None
    """The seed that drew the instance (bandit means, item vectors); None if drawn from the reset seed."""
    actions: list[int | None] = field(default_factory=list)
    """The action parsed from the response (None: no `ACTION=` naming a label)."""
    executed: list[int] = field(default_factory=list)
    """The action actually executed (a random one when the response was invalid)."""
    valid: list[bool] = field(default_factory=list)
    env_rewards: list[float] = field(default_factory=list)
    """The environment's own reward (raw units, before normalisation, penalty and bonus)."""
    rewards: list[float] = field(default_factory=list)
    """The reward returned to the learner (normalised, plus invalid penalty and exploration bonus)."""
    regrets: list[float] = field(default_factory=list)
    """Expected regret of the executed action (best mean minus its mean); NaN where undefined."""
    best_actions: list[int | None] = field(default_factory=list)
    outcome: float | None = None
    """Games only: +1 win, 0 draw, -1 loss, once the game is over."""

    @property
    def n_actions(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return len(self.executed)

    @property
    def total_reward(self) -> float:
        return float(sum(self.rewards))

    @property
    def total_regret(self) -> float:
        return float(sum(self.regrets)) if self.regrets else math.nan

    @property
    def valid_rate(self) -> float:
        return sum(self.valid) / len(self.valid) if self.valid else math.nan

    def add_step(self, action: int | None, executed: int, valid: bool, env_reward: float, reward: float,
                 regret: float, best_action: int | None) -> None:
        self.actions.append(action)
        self.executed.append(int(executed))
        self.valid.append(bool(valid))
        self.env_rewards.append(float(env_reward))
        self.rewards.append(float(reward))
        self.regrets.append(float(regret))
        self.best_actions.append(best_action)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (NaN regrets stay NaN; json writes them as NaN)."""
        return asdict(self)
