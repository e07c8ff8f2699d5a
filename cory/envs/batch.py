"""`GymTextEnvBatch`: many copies of a registered text environment behind the Sampler's protocol.

The Sampler (`cory.rollout.Sampler`) steps n * group_size episodes in lockstep and passes, at every
step, one response per episode that is still live, in episode order. This adapter creates the
environments, gives the `group_size` copies of one episode the same instance and the same seed (so a
group-relative algorithm compares responses to the same bandit / the same opponent), and keeps every
episode's record for metrics afterwards.
"""

from __future__ import annotations

import gymnasium
import numpy as np

# Importing this module imports the `cory.envs` package first, which registers the cory/* ids.
from cory.envs.base import AgentView, TextDecisionEnv
from cory.envs.parsing import format_action
from cory.envs.records import EpisodeRecord

_SEED_HIGH = 2**31 - 1


class GymTextEnvBatch:
    """A batch of `gymnasium.make(env_id, **env_kwargs)` environments.

    pool_size: when set, episode instances (bandit means, movie vectors) come from a fixed pool of
      that many instance seeds, drawn with replacement only when more episodes than pool members are
      asked for (the paper's RLFT keeps 512 bandits and samples 16 per rollout). The reward noise,
      users and opponents still get a fresh seed per episode. When None, every episode is a fresh
      instance.
    pool_seed: which pool (the pool's instance seeds are a function of it), so training and evaluation
      can use disjoint pools.
    """

    def __init__(self, env_id: str, pool_size: int | None = None, pool_seed: int = 0, **env_kwargs):
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be a positive int or None, got {pool_size!r}")
        self.env_id = env_id
        self.env_kwargs = env_kwargs
        self.pool_size = pool_size
        self.pool = None
        if pool_size is not None:
            self.pool = np.random.default_rng([pool_seed, 0xC0A1]).integers(0, _SEED_HIGH, size=pool_size)
        self.envs: list[gymnasium.Env] = [self._make()]
        self.size = 0
        self.live: list[int] = []
        """Indices of the episodes still running, in the order step() expects responses."""

    def _make(self) -> gymnasium.Env:
        # The passive checker re-validates every environment's first reset and step (a full scan of
        # the Text space per character); the contracts are checked once in the tests instead.
        env = gymnasium.make(self.env_id, disable_env_checker=True, **self.env_kwargs)
        if not isinstance(env.unwrapped, TextDecisionEnv):
            raise TypeError(f"{self.env_id} is not a cory text environment (got {type(env.unwrapped).__name__})")
        return env

    def env(self, episode: int) -> TextDecisionEnv:
        """The unwrapped environment running `episode` (its labels, record, agent_view)."""
        return self.envs[episode].unwrapped

    def reset(self, n: int, rng, group_size: int = 1) -> list[str]:
        """Start n * group_size episodes; copy j of episode i is episode i * group_size + j.

        rng: a numpy Generator; it draws the instance (or pool member) and the seed of each episode.
        Returns the first observations, one per episode.
        """
        if n < 1 or group_size < 1:
            raise ValueError(f"need n >= 1 and group_size >= 1, got n={n}, group_size={group_size}")
        total = n * group_size
        while len(self.envs) < total:
            self.envs.append(self._make())
        if self.pool is not None:
            picks = rng.choice(len(self.pool), size=n, replace=n > len(self.pool))
            instance_seeds = [int(self.pool[i]) for i in picks]
        else:
            instance_seeds = [int(s) for s in rng.integers(0, _SEED_HIGH, size=n)]
        seeds = [int(s) for s in rng.integers(0, _SEED_HIGH, size=n)]
        observations = []
        for e in range(total):
            g = e // group_size
            obs, _ = self.envs[e].reset(seed=seeds[g], options={"instance_seed": instance_seeds[g]})
            observations.append(obs)
        self.size = total
        self.live = list(range(total))
        return observations

    def step(self, responses: list[str]) -> tuple[list[str], list[float], list[bool], list[dict]]:
        """One response per live episode (in `self.live` order). Returns, for those same episodes,
        the next observations, rewards, done flags and infos (info["episode"] is the episode index).
        Episodes that are done leave `self.live` and are not stepped again."""
        if len(responses) != len(self.live):
            raise ValueError(f"step() got {len(responses)} responses for {len(self.live)} live episodes")
        observations, rewards, dones, infos = [], [], [], []
        # An environment class may step many instances at once (batched student replies, say).
        step_many = getattr(type(self.envs[self.live[0]].unwrapped), "step_many", None) if self.live else None
        if step_many is not None:
            results = step_many([self.envs[e].unwrapped for e in self.live], list(responses))
        else:
            results = [self.envs[e].step(text) for e, text in zip(self.live, responses)]
        for e, (obs, reward, terminated, truncated, info) in zip(self.live, results):
            info["episode"] = e
            observations.append(obs)
            rewards.append(float(reward))
            dones.append(bool(terminated or truncated))
            infos.append(info)
        self.live = [e for e, d in zip(self.live, dones) if not d]
        return observations, rewards, dones, infos

    def agent_views(self) -> list[AgentView]:
        """The structured state of every live episode, in `self.live` order (for classical agents)."""
        return [self.env(e).agent_view() for e in self.live]

    def action_text(self, episode: int, action: int) -> str:
        """The response that selects action index `action` in `episode`."""
        return format_action(self.env(episode).labels[action])

    def episodes(self) -> list[EpisodeRecord]:
        """The records of the episodes of the last reset (finished or not), in episode order.
        Each reset starts new records, so the returned ones stay valid afterwards."""
        return [self.env(e).record for e in range(self.size)]
