"""Transcripts of cory's decision-making environments, played by imperfect agents: the zoo's agent
corpus (`cory:tiny-agent`, `cory:micro-agent`), with its identity (version, seeds, size), its texts
and the statistics of answers to them (`decision_stats`, which the zoo's build-time check reports).

Each text is one decision: the prompt a cory environment shows at some step (rendered by the
environment itself, so it is exactly what `gymnasium.make("cory/...")` shows a policy), then the
response ``"\\nACTION=<label>"``. Two environments:

- ``cory/Bandit-v0``, Gaussian, button variant (colour labels), 5, 10 or 20 arms (mostly 10),
  horizon 50, sigma mostly 1. Each episode is played by a mixture of three behaviours whose weights
  are drawn per episode (mean shares in ``BEHAVIOURS``): ``greedy`` (the arm with the best observed
  mean), ``frequent`` (the arm taken most often) and ``random`` (uniform). Ties are broken at
  random, and before the first pull every behaviour is random. A model trained on these texts
  starts frequency-biased, as the pretrained LLMs of arXiv 2504.16078 do: it rarely tries an arm it
  has not seen, and a repeated action pulls it to repeat it again.
- ``cory/TicTacToe-v0`` (``TICTACTOE_SHARE`` of the episodes): a random player or a noisy one (a
  perfect move half of the time), against random, noisy or perfect opponents. So the model writes
  legal-looking cells there, and plays only a little better than chance.

Prompts fit the zoo's 256 positions with the answer: every prompt is rendered with ``cot=False``,
bandit prompts with the options in ``BANDIT_KWARGS`` (10 arms: the last 10 steps of history; 20 arms:
the last 8; 5 arms: the per-arm summary of counts and means and the last 5 steps). The behaviours act
on what the prompt shows. ``env_kwargs(n_arms)`` gives the environment keyword arguments that render
the prompts a model of this corpus was trained on.

Seed streams
------------
``transcripts(n, seed)`` plays episodes one after another from ``numpy.random.default_rng(seed)``
and keeps ``TEXTS_PER_EPISODE`` decisions of each bandit episode (every decision of a game), so a
shorter draw is a prefix of a longer one. The zoo pretrains on ``pretraining_texts(n,
PRETRAIN_SEED)`` with ``n <= PRETRAIN_SIZE``; ``heldout_transcripts(n, seed)`` draws another stream
and drops every text that occurs in the first ``PRETRAIN_SIZE`` pretraining texts (an opening
prompt or a common board can still be shared, as any prompt set drawn from the training
distribution does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gymnasium
import numpy as np

# The cory/* environment ids are registered: importing this module ran cory/envs/__init__.py first.
from cory.envs.bandit import classify_frequency_bias
from cory.envs.base import argmax_random_tie
from cory.envs.parsing import format_action, parse_action
from cory.envs.tictactoe import best_moves

# Bump when the texts change: it is part of every zoo recipe hash, so cached models rebuild.
CORPUS_VERSION = 1
PRETRAIN_SEED = 5050
PRETRAIN_SIZE = 10_000
HELDOUT_SEED = 7070

RESPONSE = "\n{}"
"""How the answer follows the prompt: a new line, then ``ACTION=<label>``."""
HORIZON = 50
ARMS = {5: 0.15, 10: 0.7, 20: 0.15}
"""Bandit sizes and how often each is drawn."""
SIGMAS = {0.1: 0.15, 1.0: 0.7, 3.0: 0.15}
"""Gaussian reward noise and how often each is drawn (the prompt does not show it)."""
BANDIT_KWARGS = {
    5: {"summary": True, "history": 5},
    10: {"summary": False, "history": 10},
    20: {"summary": False, "history": 8},
}
"""Prompt options per bandit size: the longest that fit 256 tokens with the answer."""
BEHAVIOURS = {"greedy": 0.5, "frequent": 0.38, "random": 0.12}
"""The behaviours' mean shares; each episode draws its own weights from a Dirichlet around them."""
CONCENTRATION = 4.0
"""Dirichlet concentration of the per-episode weights (smaller: episodes differ more)."""
TEXTS_PER_EPISODE = 10
"""Decisions kept from each bandit episode, at distinct random steps."""
TICTACTOE_SHARE = 0.3
"""The share of episodes that are tic-tac-toe games (each gives 3-5 texts, one per agent move)."""
TICTACTOE_PLAYERS = {"random": 0.5, "noisy": 0.5}
TICTACTOE_OPPONENTS = {"random": 0.5, "noisy": 0.3, "minimax": 0.2}
AGENT_FIRST = 0.7
"""The share of games in which the agent moves first."""


@dataclass(frozen=True)
class Transcript:
    """One decision: what the environment showed, what the player answered, and why."""

    env_id: str
    prompt: str
    response: str
    """``"\\nACTION=<label>"``."""
    action: int
    """The index of the chosen label."""
    behaviour: str
    """Who chose it: greedy, frequent or random (bandits); random or minimax (tic-tac-toe)."""
    labels: tuple[str, ...]
    legal: tuple[int, ...]
    """The actions allowed at this step (every arm of a bandit; the empty cells of a board)."""
    history: tuple[tuple[int, float], ...] = ()
    """Bandits: the (arm, reward) pulls before this decision, oldest first."""

    @property
    def text(self) -> str:
        return self.prompt + self.response


def env_kwargs(n_arms: int = 10) -> dict:
    """Keyword arguments of ``cory/Bandit-v0`` whose prompts are the ones this corpus holds for
    ``n_arms`` (Gaussian, button variant, horizon 50, no chain of thought); add ``sigma``."""
    if n_arms not in BANDIT_KWARGS:
        raise ValueError(f"the agent corpus has bandits of {sorted(BANDIT_KWARGS)} arms, not {n_arms}")
    return {"n_arms": n_arms, "variant": "button", "distribution": "gaussian", "horizon": HORIZON, "cot": False,
            **BANDIT_KWARGS[n_arms]}


def _pick(rng: np.random.Generator, weights: dict):
    keys = list(weights)
    return keys[int(rng.choice(len(keys), p=np.array(list(weights.values())) / sum(weights.values())))]


def behaviour_action(behaviour: str, counts: np.ndarray, sums: np.ndarray, rng: np.random.Generator) -> int:
    """The arm a behaviour pulls given per-arm counts and reward sums ([K] each)."""
    if behaviour == "random" or not counts.any():
        return int(rng.integers(len(counts)))
    if behaviour == "frequent":
        return argmax_random_tie(counts.astype(float), rng)
    if behaviour == "greedy":
        means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
        return argmax_random_tie(means, rng)
    raise ValueError(f"unknown behaviour {behaviour!r}")


@functools.cache
def _env(env_id: str, **kwargs) -> gymnasium.Env:
    # One environment per configuration, reset for every episode: building one is the slow part.
    return gymnasium.make(env_id, disable_env_checker=True, **kwargs).unwrapped


def _bandit_episode(rng: np.random.Generator) -> list[Transcript]:
    n_arms = _pick(rng, ARMS)
    env = _env("cory/Bandit-v0", sigma=_pick(rng, SIGMAS), **env_kwargs(n_arms))
    observation, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    names = list(BEHAVIOURS)
    weights = rng.dirichlet(CONCENTRATION * np.array([BEHAVIOURS[b] for b in names]))
    kept = set(rng.choice(HORIZON, size=TEXTS_PER_EPISODE, replace=False).tolist())
    steps = max(kept) + 1
    behaviours = rng.choice(len(names), size=steps, p=weights).tolist()
    # The behaviours act on what the prompt shows: every step (through the summary) or the window.
    window = None if env.prompt_options.summary else env.prompt_options.history
    labels, out = tuple(env.labels), []
    for t in range(steps):
        counts, sums = shown_statistics(env.history, n_arms, window)
        arm = behaviour_action(names[behaviours[t]], counts, sums, rng)
        if t in kept:
            out.append(Transcript(env.env_name, observation, RESPONSE.format(format_action(labels[arm])), arm,
                                  names[behaviours[t]], labels, tuple(range(n_arms)), tuple(env.history)))
        observation, *_ = env.step(format_action(labels[arm]))
    return out


def shown_statistics(history: list[tuple[int, float]], n_arms: int, window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """[K] counts and [K] reward sums over the last ``window`` pulls of ``history`` (all if None)."""
    shown = history if window is None else history[-window:] if window > 0 else []
    counts, sums = np.zeros(n_arms, dtype=np.int64), np.zeros(n_arms)
    for arm, reward in shown:
        counts[arm] += 1
        sums[arm] += reward
    return counts, sums


def _tictactoe_game(rng: np.random.Generator) -> list[Transcript]:
    env = _env("cory/TicTacToe-v0", opponent=_pick(rng, TICTACTOE_OPPONENTS), agent_first=bool(rng.random() < AGENT_FIRST),
               cot=False)
    observation, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    noisy = _pick(rng, TICTACTOE_PLAYERS) == "noisy"
    labels, out, done = tuple(env.labels), [], False
    while not done:
        legal = env.legal_actions()
        if noisy and rng.random() < 0.5:
            best = best_moves(env.board, 1)
            cell, behaviour = int(best[rng.integers(len(best))]), "minimax"
        else:
            cell, behaviour = int(legal[rng.integers(len(legal))]), "random"
        out.append(Transcript(env.env_name, observation, RESPONSE.format(format_action(labels[cell])), cell, behaviour,
                              labels, tuple(legal)))
        observation, _, done, _, _ = env.step(format_action(labels[cell]))
    return out


def transcripts(n: int, seed: int = PRETRAIN_SEED) -> list[Transcript]:
    """The first ``n`` decisions of the stream of ``seed``; a prefix of any longer draw."""
    if seed == PRETRAIN_SEED and n <= PRETRAIN_SIZE:
        return list(_pretrain_stream()[:n])  # played once per process
    return _play(n, seed)


def _play(n: int, seed: int) -> list[Transcript]:
    rng = np.random.default_rng(seed)
    out: list[Transcript] = []
    while len(out) < n:
        out += _tictactoe_game(rng) if rng.random() < TICTACTOE_SHARE else _bandit_episode(rng)
    return out[:n]


@functools.lru_cache(maxsize=1)
def _pretrain_stream() -> tuple[Transcript, ...]:
    return tuple(_play(PRETRAIN_SIZE, PRETRAIN_SEED))


@functools.lru_cache(maxsize=1)
def _pretrain_texts() -> frozenset[str]:
    return frozenset(t.text for t in _pretrain_stream())


def pretraining_texts(n: int, seed: int = PRETRAIN_SEED) -> list[str]:
    """Prompt and answer of each of ``transcripts(n, seed)``, as one text."""
    return [t.text for t in transcripts(n, seed)]


def heldout_transcripts(n: int, seed: int = HELDOUT_SEED) -> list[Transcript]:
    """``n`` decisions from the stream of ``seed`` whose text is not among the pretraining texts."""
    seen = _pretrain_texts()
    rng_stream = _play(2 * n + 64, seed)
    out = [t for t in rng_stream if t.text not in seen]
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} held-out decisions in a draw of {len(rng_stream)}")
    return out[:n]


def heldout_texts(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """The texts of ``heldout_transcripts(n, seed)``: the zoo's held-out loss."""
    return [t.text for t in heldout_transcripts(n, seed)]


# -- the build-time check of a model pretrained on these texts (cory.zoo.evals.LM_EVALS["agent"]) --
def decision_stats(decisions: list[Transcript], responses: list[str]) -> dict:
    """How ``responses`` to the decisions' prompts act: the valid-action rate overall, on bandits and
    on tic-tac-toe boards (a legal cell), and for bandit answers the share that picks the most
    frequent arm (``F_f``), else a best-mean arm (``F_g``), else another (``F_o``), and the share
    that picks an arm not tried yet (``untried``)."""
    valid = {"bandit": [], "tictactoe": []}
    classes, untried = [], []
    for decision, response in zip(decisions, responses):
        action = parse_action(response, decision.labels)
        ok = action is not None and action in decision.legal
        kind = "bandit" if decision.env_id == "cory/Bandit-v0" else "tictactoe"
        valid[kind].append(ok)
        if ok and kind == "bandit" and decision.history:
            classes.append(classify_frequency_bias(action, decision.history, len(decision.labels)))
            untried.append(action not in {a for a, _ in decision.history})
    everything = valid["bandit"] + valid["tictactoe"]
    out = {"valid_rate": round(sum(everything) / max(len(everything), 1), 4)}
    for kind, oks in valid.items():
        out[f"valid_rate_{kind}"] = round(sum(oks) / max(len(oks), 1), 4)
    for name in ("frequent", "greedy", "other"):
        out[f"F_{name[0]}"] = round(classes.count(name) / max(len(classes), 1), 4)
    out["untried"] = round(sum(untried) / max(len(untried), 1), 4)
    return out
