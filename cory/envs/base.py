"""The shared skeleton of cory's text decision-making environments.

A `TextDecisionEnv` is a gymnasium environment whose observation is a prompt and whose action is the
model's response text. Each step it (1) parses `ACTION=X` from the response, (2) executes that action,
or a uniformly random legal one when the response named none or an illegal one, (3) shapes the reward
(normalisation, the invalid-action penalty, an optional exploration bonus) and (4) appends the step
to an `EpisodeRecord`. Subclasses supply the world: the action labels, the legal actions, what an
action does, and the prompt.

Classical agents do not read text: `agent_view()` hands them the structured state (`AgentView`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Text

from cory.envs.parsing import parse_action
from cory.envs.prompts import MAX_OBSERVATION_CHARS, MAX_RESPONSE_CHARS, PRINTABLE, PromptOptions
from cory.envs.records import EpisodeRecord


def argmax_random_tie(values: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the largest value, ties broken uniformly (a fixed tie-break biases early play)."""
    top = np.flatnonzero(values == values.max())
    return int(top[rng.integers(len(top))]) if len(top) > 1 else int(top[0])


REWARD_NORMS = ("none", "scale", "standard")


@dataclass(frozen=True)
class AgentView:
    """The structured state a classical agent acts on (no text parsing needed)."""

    t: int
    """Steps already taken in this episode."""
    legal: tuple[int, ...]
    """Indices of the actions allowed now (all arms for a bandit, empty squares for a game)."""
    context: np.ndarray | None = None
    """Contextual bandit: the current user's feature vector, shape [d]."""
    board: tuple[int, ...] | None = None
    """Tic-tac-toe: 9 cells, 0 empty, 1 the agent, 2 the opponent."""


@dataclass
class StepOutcome:
    """What executing one action did, in the environment's own units."""

    env_reward: float
    terminated: bool
    regret: float = math.nan
    best_action: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


class TextDecisionEnv(gym.Env):
    """Base class: text in, text out, shaped rewards, a per-episode record.

    Keyword arguments shared by every environment:
      cot, history, summary, question: prompt rendering (see `PromptOptions`).
      invalid_penalty: added to the reward of a step whose response named no legal action (-5).
      exploration_bonus: added the first time a valid response picks a not-yet-executed action (0).
      reward_norm: "none" (raw), "scale" (divide by reward_scale) or "standard" (subtract the
        environment's known reward mean, divide by its known reward std). Penalty and bonus are added
        after normalisation.
      reward_scale: the divisor for reward_norm="scale".
    """

    metadata = {"render_modes": ["ansi"]}
    env_name = "cory/TextDecision"

    def __init__(
        self,
        *,
        cot: bool = True,
        history: int | None = None,
        summary: bool = False,
        question: str | None = None,
        invalid_penalty: float = -5.0,
        exploration_bonus: float = 0.0,
        reward_norm: str = "none",
        reward_scale: float = 1.0,
        render_mode: str | None = None,
    ):
        if reward_norm not in REWARD_NORMS:
            raise ValueError(f"reward_norm must be one of {', '.join(REWARD_NORMS)}; got {reward_norm!r}")
        if reward_norm == "scale" and not reward_scale > 0:
            raise ValueError(f"reward_scale must be > 0, got {reward_scale!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        opts = {"cot": cot, "history": history, "summary": summary}
        if question is not None:
            opts["question"] = question
        self.prompt_options = PromptOptions(**opts)
        self.invalid_penalty = float(invalid_penalty)
        self.exploration_bonus = float(exploration_bonus)
        self.reward_norm = reward_norm
        self.reward_scale = float(reward_scale)
        self.render_mode = render_mode
        self.observation_space = Text(MAX_OBSERVATION_CHARS, min_length=1, charset=PRINTABLE)
        # Responses may hold any unicode; step() accepts every str (junk is an invalid action).
        # The declared space is what `action_space.sample()` draws from.
        self.action_space = Text(MAX_RESPONSE_CHARS, min_length=0, charset=PRINTABLE)
        self.labels: list[str] = []
        self.t = 0
        self.record: EpisodeRecord | None = None
        self._done = True
        self._tried: set[int] = set()
        self._observation = ""

    # ---- what a subclass provides -------------------------------------------------------------
    reward_mean = 0.0
    """Known mean of the environment reward (for reward_norm="standard")."""
    reward_std = 1.0
    """Known standard deviation of the environment reward (for reward_norm="standard")."""

    def _new_instance(self, rng: np.random.Generator) -> None:
        """Draw the hidden parameters of a fresh instance (bandit means, item vectors)."""
        raise NotImplementedError

    def _start(self) -> None:
        """Episode-start work after the instance exists (e.g. the opponent moving first)."""

    def legal_actions(self) -> list[int]:
        return list(range(len(self.labels)))

    def _execute(self, action: int) -> StepOutcome:
        raise NotImplementedError

    def _render_prompt(self) -> str:
        raise NotImplementedError

    def agent_view(self) -> AgentView:
        return AgentView(t=self.t, legal=tuple(self.legal_actions()))

    # ---- the gymnasium API --------------------------------------------------------------------
    @property
    def n_actions(self) -> int:
        return len(self.labels)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode. `seed` seeds the env's randomness (reward noise, random fallbacks,
        opponents); `options={"instance_seed": s}` draws the hidden instance from `s` instead of from
        the env's generator, so a fixed pool of instances can be replayed with fresh noise."""
        super().reset(seed=seed)
        instance_seed = (options or {}).get("instance_seed")
        rng = self.np_random if instance_seed is None else np.random.default_rng(int(instance_seed))
        self._new_instance(rng)
        self.t = 0
        self._tried = set()
        self._done = False
        self.record = EpisodeRecord(
            env_id=self.env_name, labels=list(self.labels), instance_seed=None if instance_seed is None else int(instance_seed)
        )
        self._start()
        self._observation = self._render_prompt()
        return self._observation, {"step": 0, "legal": self.legal_actions()}

    def step(self, action: str):
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        legal = self.legal_actions()
        parsed = parse_action(action, self.labels)
        valid = parsed is not None and parsed in legal
        executed = parsed if valid else int(legal[self.np_random.integers(len(legal))])
        self.t += 1
        out = self._execute(executed)
        reward = self._normalise(out.env_reward)
        if not valid:
            reward += self.invalid_penalty
        elif self.exploration_bonus and executed not in self._tried:
            reward += self.exploration_bonus
        self._tried.add(executed)
        self.record.add_step(parsed, executed, valid, out.env_reward, reward, out.regret, out.best_action)
        self._done = bool(out.terminated)
        self._observation = self._render_prompt()
        info = {
            "step": self.t,
            "action": parsed,
            "action_label": None if parsed is None else self.labels[parsed],
            "valid": valid,
            "executed": executed,
            "executed_label": self.labels[executed],
            "env_reward": out.env_reward,
            # None, not NaN, where regret is undefined (games): NaN != NaN breaks equality checks on infos.
            "regret": None if math.isnan(out.regret) else out.regret,
            "best_action": out.best_action,
            **out.info,
        }
        return self._observation, float(reward), self._done, False, info

    def render(self):
        if self.render_mode == "ansi":
            return self._observation
        return None

    def _normalise(self, reward: float) -> float:
        if self.reward_norm == "scale":
            return reward / self.reward_scale
        if self.reward_norm == "standard":
            return (reward - self.reward_mean) / self.reward_std
        return reward
