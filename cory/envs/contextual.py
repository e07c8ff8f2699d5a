"""A synthetic linear contextual bandit with users described in words (the offline stand-in for
BanditBench's MovieLens task, which needs a download).

Each step a new user arrives with a feature vector x in [0, 1]^5: (age, action, comedy, drama,
romance), age scaled from 15-75 years. The prompt describes the user in words (age group, what they
love and dislike) and lists the numbers. There are K movies, each with a hidden parameter vector
theta_k ~ N(0, I/d) (its genre mix and age appeal, described in words in the prompt); recommending
movie k pays x . theta_k + N(0, noise). Regret is the expected one: max_k x.theta_k - x.theta_a.
"""

from __future__ import annotations

import math

import numpy as np

from cory.envs.base import AgentView, StepOutcome, TextDecisionEnv
from cory.envs.prompts import assemble, history_block, output_instructions, step_line, summary_block

GENRES = ("action", "comedy", "drama", "romance")
FEATURES = ("age",) + GENRES
AGE_RANGE = (15, 75)
AGE_GROUPS = ((19, "teenager"), (34, "young adult"), (54, "middle-aged adult"), (75, "senior"))
_TITLE_ADJ = ("Silent", "Crimson", "Last", "Golden", "Broken", "Hidden", "Electric", "Midnight", "Lonely", "Wild")
_TITLE_NOUN = ("Harbor", "Summer", "Empire", "Promise", "Orbit", "Garden", "Signal", "Frontier", "Waltz", "Storm")


def _fmt_vector(x: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in x) + "]"


def describe_user(x: np.ndarray) -> str:
    """Words for a user vector x = (age scaled to [0,1], four genre tastes in [0,1])."""
    age = int(round(AGE_RANGE[0] + x[0] * (AGE_RANGE[1] - AGE_RANGE[0])))
    group = next(name for top, name in AGE_GROUPS if age <= top)
    loves = [g for g, v in zip(GENRES, x[1:]) if v >= 2 / 3]
    dislikes = [g for g, v in zip(GENRES, x[1:]) if v <= 1 / 3]
    parts = []
    if loves:
        parts.append("loves " + " and ".join(loves))
    if dislikes:
        parts.append("dislikes " + " and ".join(dislikes))
    taste = ", and ".join(parts) if parts else "has no strong genre preferences"
    return f"The current user is a {group} ({age} years old) who {taste}."


def describe_item(theta: np.ndarray) -> str:
    """Words for an item vector theta = (age appeal, four genre weights), any real numbers."""
    order = np.argsort(-theta[1:])
    text = f"mostly {GENRES[order[0]]}"
    if theta[1 + order[1]] > 0.2:
        text += f" with some {GENRES[order[1]]}"
    if theta[0] > 0.25:
        text += ", popular with older viewers"
    elif theta[0] < -0.25:
        text += ", popular with younger viewers"
    return text


class ContextualBanditEnv(TextDecisionEnv):
    """K movies, a new described user each step, linear rewards.

    Keyword arguments (besides the shared ones of `TextDecisionEnv`):
      n_items: K, 5 / 10 / 20 in the paper (2..100 allowed).
      noise: standard deviation of the reward noise (0.1).
      horizon: users (steps) per episode (50).
    info adds: regret, best_action, context (the user's x, list of d floats).
    """

    env_name = "cory/ContextualBandit-v0"
    dim = len(FEATURES)

    def __init__(self, n_items: int = 10, noise: float = 0.1, horizon: int = 50, **shared):
        super().__init__(**shared)
        if not 2 <= n_items <= len(_TITLE_ADJ) * len(_TITLE_NOUN):
            raise ValueError(f"n_items must be in 2..{len(_TITLE_ADJ) * len(_TITLE_NOUN)}, got {n_items}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.labels = [str(i) for i in range(n_items)]
        self.noise = float(noise)
        self.horizon = int(horizon)
        self.thetas = np.zeros((n_items, self.dim))
        self.titles: list[str] = []
        self.context = np.zeros(self.dim)
        self._history: list[tuple[np.ndarray, int, float]] = []
        # x_j ~ U(0,1) (E[x_j^2] = 1/3), theta_kj ~ N(0, 1/d): Var(x.theta) = d * 1/3 * 1/d.
        self.reward_mean, self.reward_std = 0.0, math.sqrt(1 / 3 + self.noise**2)

    def _new_instance(self, rng: np.random.Generator) -> None:
        k = len(self.labels)
        self.thetas = rng.normal(0.0, 1.0 / math.sqrt(self.dim), size=(k, self.dim))
        pick = rng.choice(len(_TITLE_ADJ) * len(_TITLE_NOUN), size=k, replace=False)
        self.titles = [f"The {_TITLE_ADJ[i // len(_TITLE_NOUN)]} {_TITLE_NOUN[i % len(_TITLE_NOUN)]}" for i in pick]
        self._history = []
        self._lines: list[str] = []  # formatted once per step, not once per prompt
        self._header_text: str | None = None

    def _new_user(self) -> None:
        # Users come from the episode's generator, not the instance's: a pooled instance meets new users.
        self.context = self.np_random.uniform(0.0, 1.0, size=self.dim)

    def _start(self) -> None:
        self._new_user()

    def expected_rewards(self, x: np.ndarray | None = None) -> np.ndarray:
        """[K] x . theta_k for the current (or given) user."""
        return self.thetas @ (self.context if x is None else x)

    def _execute(self, action: int) -> StepOutcome:
        x = self.context
        values = self.expected_rewards(x)
        reward = float(values[action] + self.noise * self.np_random.normal())
        self._history.append((x, action, reward))
        self._lines.append(step_line(self.t, self.labels[action], reward, User=_fmt_vector(x)))
        best = int(np.argmax(values))
        outcome = StepOutcome(
            env_reward=reward,
            terminated=self.t >= self.horizon,
            regret=float(values[best] - values[action]),
            best_action=best,
            info={"context": x.tolist()},
        )
        if not outcome.terminated:
            self._new_user()
        return outcome

    def agent_view(self) -> AgentView:
        return AgentView(t=self.t, legal=tuple(range(len(self.labels))), context=self.context.copy())

    def _header(self) -> str:
        k = len(self.labels)
        items = "\n".join(f"{i}: {title} ({describe_item(th)})" for i, (title, th) in enumerate(zip(self.titles, self.thetas)))
        instructions = (
            f"You are a movie recommendation system. There are {k} movies, numbered 0 to {k - 1}:\n{items}\n"
            "At every step a new user arrives; you recommend one movie and receive a reward saying how much "
            f"the user enjoyed it (higher is better). You have {self.horizon} steps in total (the time horizon). "
            f"Your goal is to maximize the total reward over the {self.horizon} steps."
        )
        return assemble(instructions, output_instructions(self.prompt_options.cot, "one of the movie numbers listed above"))

    def _render_prompt(self) -> str:
        if self._header_text is None:
            # The movie list is fixed for the episode: describe it once, not once per step.
            self._header_text = self._header()
        summary = ""
        if self.prompt_options.summary:
            k = len(self.labels)
            counts, sums = [0] * k, [0.0] * k
            for _, a, r in self._history:
                counts[a] += 1
                sums[a] += r
            summary = summary_block(self.labels, counts, sums)
        user = (
            f"{describe_user(self.context)}\n"
            f"User features ({', '.join(FEATURES)}; age scaled to 0-1 over {AGE_RANGE[0]}-{AGE_RANGE[1]} years): "
            f"{_fmt_vector(self.context)}"
        )
        return assemble(
            self._header_text,
            history_block(self._lines, self.prompt_options.history),
            summary,
            user,
            self.prompt_options.question,
        )
