"""Play classical agents in N parallel text environments, through the same batch adapter a language
model uses, so both produce the same `EpisodeRecord`s."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cory.agents.base import Agent
from cory.agents.registry import make_agent
from cory.envs.batch import GymTextEnvBatch
from cory.envs.records import EpisodeRecord


def run_agent(
    agent_factory: Callable[[], Agent] | str,
    env_id: str,
    n_envs: int,
    seed: int,
    pool_size: int | None = None,
    max_parallel: int = 1024,
    **env_kwargs,
) -> list[EpisodeRecord]:
    """Play one episode in each of `n_envs` environments, one fresh agent per environment.

    agent_factory: a zero-argument callable returning an agent, or a name from `AGENTS`.
    max_parallel: at most this many environments exist at once; more episodes are played in rounds
      that reuse them (20,000 tic-tac-toe games need not build 20,000 environments).
    The environments (instances, noise) depend only on `seed`, `env_id`, `pool_size`, `max_parallel`
    and `env_kwargs`, not on the agent, so agents compared under one seed face the same instances.
    Agents act through the text channel (`ACTION=<label>`) and update on the environment's own
    reward. Returns the per-episode records in episode order.
    """
    if isinstance(agent_factory, str):
        name = agent_factory
        agent_factory = lambda: make_agent(name)  # noqa: E731
    if n_envs < 1 or max_parallel < 1:
        raise ValueError(f"need n_envs >= 1 and max_parallel >= 1, got {n_envs}, {max_parallel}")
    env_seq, agent_seq = np.random.SeedSequence(seed).spawn(2)
    env_rng = np.random.default_rng(env_seq)
    agent_seqs = agent_seq.spawn(n_envs)
    batch = GymTextEnvBatch(env_id, pool_size=pool_size, **env_kwargs)
    records: list[EpisodeRecord] = []
    for start in range(0, n_envs, max_parallel):
        n = min(max_parallel, n_envs - start)
        batch.reset(n, env_rng)
        agents = [agent_factory() for _ in range(n)]
        for e, agent in enumerate(agents):
            agent.reset(batch.env(e).n_actions, np.random.default_rng(agent_seqs[start + e]))
        _play(batch, agents)
        records.extend(batch.episodes())
    return records


def _play(batch: GymTextEnvBatch, agents: list[Agent]) -> None:
    """Step every episode of `batch` to its end, agent e acting in episode e."""
    while batch.live:
        live = list(batch.live)
        views = batch.agent_views()
        actions = [agents[e].act(v) for e, v in zip(live, views)]
        _, _, _, infos = batch.step([batch.action_text(e, a) for e, a in zip(live, actions)])
        for e, view, info in zip(live, views, infos):
            agents[e].update(view, info["executed"], info["env_reward"])
