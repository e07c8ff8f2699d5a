"""CORY: coevolving RL fine-tuning of two copies of one model (Ma et al., NeurIPS 2024).

Two agents start from the same model. Each iteration the *pioneer* answers the prompt alone; the
*observer* answers a prompt that also holds the pioneer's answer. Each agent is rewarded with its
own task reward plus `c` times its partner's (c = 1: the paper's cooperative sum), and each is
updated by its own Learner — so any registered algorithm runs inside CORY unchanged. The two
answers are the two turns of a `PioneerObserverEnv` episode (`cory.tasks.pioneer_observer`), played
by the ordinary `Sampler` (the pioneer generates the first turn, the observer the second), which
applies the run's sampling control and the group replication exactly as in single-agent runs. Every
`swap_every` iterations the roles are exchanged; the agents keep their optimizer and KL-controller
state across exchanges (the original code rebuilt its trainers at each swap, resetting them).

Memory: with `model.lora.r > 0` both agents are LoRA adapters on one frozen base model, which also
serves as the KL reference with the adapters disabled (`cory.build.build_agents`), so CORY needs
about one model's memory instead of three (two policies and a reference).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from cory.algorithms import make_algorithm
from cory.build import build_agents, eval_params, eval_scorer, make_backends, make_control, sampling_params, save_policy
from cory.config import Config
from cory.drift.control import EachTurnAnEpisode
from cory.errors import UsageError
from cory.evaluate import evaluate
from cory.learner import Learner
from cory.metrics.training import reduce_metrics
from cory.policy import Policy
from cory.rollout import Rollout, Sampler
from cory.rollout_worker import WorkerSide, start_worker
from cory.run import Run
from cory.tasks import make_task
from cory.tasks.pioneer_observer import PioneerObserverEnv, collective_rewards, resolve_template

AGENTS = ("a", "b")


@dataclass
class Agent:
    name: str
    policy: Policy
    learner: Learner
    adapter: str | None = None
    """Its LoRA adapter on the shared base, or None for a full copy."""
    backend: object = None
    """Who generates this agent's responses (`cory.generation`)."""

    def generate(self, prompts: list[str], params, generator=None, **hook):
        """The Sampler's backend for this agent's turn: its adapter made active, then its backend."""
        self.activate()
        return self.backend.generate(prompts, params, generator=generator, **hook)

    def activate(self) -> None:
        """Make this agent's adapter the active one (LoRA); a no-op for full copies."""
        if self.adapter is not None:
            self.policy.model.set_adapter(self.adapter)
            # set_adapter freezes the other adapters; this agent's must stay trainable.
            for p in self.learner.optimizer.param_groups[0]["params"] if self.learner is not None else ():
                p.requires_grad_(True)


def roles_at(cfg: Config, agents: dict[str, Agent], iteration: int) -> tuple[Agent, Agent]:
    """(pioneer, observer) at an iteration: agent a pioneers first; roles swap every T."""
    swapped = cfg.cory.exchange and (iteration // cfg.cory.swap_every) % 2 == 1
    a, b = agents["a"], agents["b"]
    return (b, a) if swapped else (a, b)


def collect_episodes(cfg: Config, agents: dict[str, Agent], env: PioneerObserverEnv, control, group_size: int, iteration: int,
                     rng, generator) -> Rollout:
    """One iteration's pioneer/observer episodes, each agent generating its turn with its own backend."""
    pioneer, observer = roles_at(cfg, agents, iteration)
    sampler = Sampler(pioneer.policy, env, sampling_params(cfg), max_turns=2, control=control, backend=[pioneer, observer])
    return sampler.collect(cfg.train.batch_size, rng, generator, group_size=group_size)


def make_env(cfg: Config, process_index: int = 0, num_processes: int = 1) -> PioneerObserverEnv:
    task = make_task(cfg.task, cfg.train.seed, process_index, num_processes)
    return PioneerObserverEnv(task, resolve_template(cfg.cory.observer_template, task.name, cfg.task.chat_template), cfg.cory.observe)


def make_cory_control(cfg: Config, reference):
    """(control, fallback): one sampling control serves both agents, each response its own episode."""
    control, fallback = make_control(cfg, reference, multi_turn=False)
    return (EachTurnAnEpisode(control) if control is not None else None), fallback


def cory_rollout_side(cfg: Config) -> WorkerSide:
    """What the rollout worker of a CORY run builds (`cory.rollout_worker`): both agents (their
    weights arrive from the trainer), the sampling control and the pioneer/observer environment."""
    algorithm = make_algorithm(cfg)
    built = build_agents(cfg, list(AGENTS), algorithm.needs_values)
    control, _ = make_cory_control(cfg, built.reference)
    backends = make_backends(cfg, built.policies, built.adapters, cfg.model.name)
    agents = {n: Agent(n, built.policies[n], None, adapter=built.adapters[n], backend=backends[n]) for n in AGENTS}
    env = make_env(cfg)

    def collect(index, rng, generator):
        return collect_episodes(cfg, agents, env, control, algorithm.group_size, index, rng, generator)

    def loaded():
        for backend in backends.values():
            backend.mark_stale()

    return WorkerSide({n: built.policies[n].module for n in AGENTS}, collect, loaded)


class CoryRun(Run):
    """Two agents, a shared frozen reference, and the pioneer/observer schedule."""

    def __init__(self, cfg: Config, output_dir: str | Path, **options):
        super().__init__(cfg, output_dir, **options)
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise UsageError("CORY does not run under FSDP yet; use DDP (accelerate launch --multi_gpu)")
        if cfg.model.lora.r and self.accelerator.num_processes > 1:
            raise UsageError("CORY with model.lora.r (two adapters on one base) runs in one process; use full copies for data parallelism")
        if cfg.train.max_staleness and self.accelerator.num_processes > 1:
            raise UsageError("train.max_staleness runs one trainer process and one rollout worker: launch a single process")
        algorithms = {n: make_algorithm(cfg) for n in AGENTS}
        self.group_size = algorithms["a"].group_size
        built = build_agents(cfg, list(AGENTS), algorithms["a"].needs_values)
        # One sampling control (hard budget or asking for help) serves both agents: each of their
        # responses is its own episode with its own budget.
        self.control, fallback = make_cory_control(cfg, built.reference)
        self.agents = {
            n: Agent(n, built.policies[n], Learner(built.policies[n], built.reference, algorithms[n], cfg, self.accelerator,
                                                   built.parameters[n], fallback=fallback, teacher=built.teacher),
                     adapter=built.adapters[n])
            for n in AGENTS
        }
        # One engine serves both agents: full copies take turns holding it, adapters are LoRA requests.
        backends = make_backends(cfg, built.policies, built.adapters, cfg.model.name, self.accelerator.num_processes)
        for n, agent in self.agents.items():
            agent.backend = backends[n]
        self.backend = backends["a"]
        self.env = make_env(cfg, self.accelerator.process_index, self.accelerator.num_processes)
        self.task = self.env.task

    def _start(self, resume: bool | None = None) -> None:
        super()._start(resume)
        modules = {n: agent.policy.module for n, agent in self.agents.items()}
        self.rollouts = start_worker(cory_rollout_side, self.cfg, self.state, modules, self.learners, self.threads)

    # -- schedule ------------------------------------------------------------------------------------
    def roles(self, iteration: int) -> tuple[Agent, Agent]:
        return roles_at(self.cfg, self.agents, iteration)

    @property
    def learners(self) -> dict:
        return {n: agent.learner for n, agent in self.agents.items()}

    def iterate(self) -> dict:
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        pioneer, observer = self.roles(state.iteration)
        rollouts, metrics = self.rollouts, {}
        if rollouts is None:
            rollout = collect_episodes(cfg, self.agents, self.env, self.control, self.group_size, state.iteration, state.rng,
                                       state.generator)
            t_gen = time.perf_counter() - t0
        else:  # sampled by the worker while the previous iterations trained
            batch = rollouts.take(state.iteration, lambda rows: self.sampled_logprobs(rows, (pioneer, observer)))
            rollout, t_gen = batch.rollout, batch.seconds
        observer.backend.pause()  # both agents share the engine: it sleeps once both have generated
        answered = rollout.select((rollout.turn_index == 1).nonzero()[:, 0])  # the observer's turn holds both scores
        r_p, r_o = [info["pioneer_score"] for info in answered.infos], [info["observer_score"] for info in answered.infos]
        c = cfg.cory.partner_coef
        for role, agent, turn, own, partner in (("pioneer", pioneer, 0, r_p, r_o), ("observer", observer, 1, r_o, r_p)):
            agent.activate()
            _, m = agent.learner.step(own_turn(rollout, turn, collective_rewards(own, partner, c)), state.iteration, state.generator)
            agent.backend.mark_stale()
            m["task_reward"] = sum(own) / len(own)
            m["collective_reward"] = m.pop("reward_mean")
            for k, v in m.items():
                metrics[f"{role}/{k}"] = v
                metrics[f"{agent.name}/{k}"] = v
        state.iteration += 1
        if rollouts is not None:
            metrics.update(rollouts.trained(batch, state))
        metrics["pioneer_is_a"] = float(pioneer.name == "a")
        metrics["reward_mean"] = (metrics["pioneer/task_reward"] + metrics["observer/task_reward"]) / 2
        metrics["kl_mean"] = (metrics["pioneer/kl_mean"] + metrics["observer/kl_mean"]) / 2
        metrics["time/generate"] = t_gen
        metrics["tokens_per_s/generate"] = float(rollout.response_mask.sum()) / max(t_gen, 1e-9)
        metrics["time/iteration"] = time.perf_counter() - t0
        return reduce_metrics(self.accelerator, metrics)

    def sampled_logprobs(self, rows: Rollout, roles: tuple[Agent, Agent]) -> torch.Tensor:
        """[B, Lr] each row's log-probs by the agent whose turn it is (`Learner.sampled_logprobs`)."""
        out = torch.zeros_like(rows.logprobs)
        for turn, agent in enumerate(roles):
            idx = (rows.turn_index == turn).nonzero()[:, 0]
            if len(idx):
                agent.activate()
                out[idx] = agent.learner.sampled_logprobs(rows.select(idx)).to(out.device)
        return out

    # -- evaluation and saving ----------------------------------------------------------------------
    def evaluate_all(self) -> dict:
        """Each agent answers alone from the prompt (the paper's standalone "pioneer mode")."""
        cfg = self.cfg
        out: dict = {"samples": []}
        per_agent = {}
        for n, agent in self.agents.items():
            agent.activate()
            res = evaluate(agent.policy, self.task.eval_prompts, self.task.reward, eval_params(cfg),
                           cfg.eval.samples_per_prompt, cfg.eval.seed, reference=eval_scorer(cfg, agent.learner.reference),
                           backend=agent, exact_kl=cfg.kl.exact_accounting)
            per_agent[n] = res
            for k, v in res.items():
                if isinstance(v, (int, float)):
                    out[f"{n}/{k}"] = v
            out["samples"] += [{"agent": n, **s} for s in res["samples"]]
            out[f"{n}/answers"] = res["answers"]
        for k in ("reward_mean", "kl_mean", "response_length", "eos_rate"):
            out[k] = sum(r[k] for r in per_agent.values()) / len(per_agent)
        out["best_agent"] = max(per_agent, key=lambda n: per_agent[n]["reward_mean"])
        return out

    def save_final(self, evaluation: dict) -> None:
        agents_dir = self.output_dir / "agents"
        for n, agent in self.agents.items():
            save_policy(self.cfg, agent.policy, agent.adapter, agents_dir / n)
        best = evaluation["best_agent"]
        final = self.output_dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        # Hard links: the best agent's weights are not written a second time (540 MB per copy at 135M
        # in fp32). final/ is removed and linked afresh after every save of the agents.
        shutil.copytree(agents_dir / best, final, copy_function=_link_or_copy)
        (final / "CORY_AGENT").write_text(f"{best}\n")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def own_turn(rollout: Rollout, turn: int, rewards: list[float]) -> Rollout:
    """One agent's rows of a pioneer/observer rollout as its own single-turn episodes: the rows of
    `turn`, without padding the other agent's rows needed, rewarded with `rewards` (the sum with the
    partner's score), each row one finished episode."""
    rows = (rollout.turn_index == turn).nonzero()[:, 0]
    mine = rollout.select(rows).compact()
    n = len(mine)
    return replace(mine, scores=torch.tensor(rewards, dtype=torch.float32), turn_index=torch.zeros(n, dtype=torch.long),
                   done=torch.ones(n, dtype=torch.bool))
