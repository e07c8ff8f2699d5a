"""`TrainingRun`: one policy trained by one Learner on a task or a text environment (single-agent
RL fine-tuning). `cory.coevolve.CoryRun` is the two-agent run; both share `cory.run.Run` and
`cory.build.build_agents`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from accelerate.utils import DistributedType
from safetensors.torch import save_file

from cory.algorithms import make_algorithm
from cory.build import build_agents, eval_params, eval_scorer, make_backends, make_control, sampling_params, save_policy
from cory.config import Config
from cory.envs.batch import GymTextEnvBatch
from cory.errors import UsageError
from cory.evaluate import evaluate, evaluate_env
from cory.learner import Learner
from cory.metrics.training import reduce_metrics
from cory.policy import VALUE_HEAD_FILE
from cory.rollout import Sampler
from cory.rollout_worker import WorkerSide, start_worker
from cory.run import Run
from cory.sharding import gather_full, gathered_state_dict, load_sharded, release_full, save_sharded, shard_policy
from cory.tasks import PromptTask, TaskEnv, make_task


def make_sampler(cfg: Config, policy, control, backend, process_index: int = 0,
                 num_processes: int = 1) -> tuple[Sampler, PromptTask | None]:
    """A single-agent run's Sampler (its task, or its text environment) and the task (None for an
    environment): the trainer's and the rollout worker's alike."""
    if cfg.env.id:
        env = GymTextEnvBatch(cfg.env.id, cfg.env.pool_size or None, pool_seed=cfg.train.seed, **cfg.env.kwargs)
        return Sampler(policy, env, sampling_params(cfg), max_turns=cfg.env.max_turns, control=control, backend=backend), None
    task = make_task(cfg.task, cfg.train.seed, process_index, num_processes)
    return Sampler(policy, TaskEnv(task), sampling_params(cfg), control=control, backend=backend), task


def rollout_side(cfg: Config) -> WorkerSide:
    """What the rollout worker of a single-agent run builds (`cory.rollout_worker`): the trainer's
    policy (its weights arrive from the trainer), sampling control and Sampler."""
    algorithm = make_algorithm(cfg)
    agents = build_agents(cfg, ["policy"], algorithm.needs_values)
    control, _ = make_control(cfg, agents.reference, multi_turn=bool(cfg.env.id))
    backend = make_backends(cfg, agents.policies, agents.adapters, cfg.model.name)["policy"]
    sampler, _ = make_sampler(cfg, agents.policies["policy"], control, backend)

    def collect(index, rng, generator):
        return sampler.collect(cfg.train.batch_size, rng, generator, group_size=algorithm.group_size)

    return WorkerSide({"policy": agents.policies["policy"].module}, collect, backend.mark_stale)


class TrainingRun(Run):
    """One policy trained by one Learner on a task (single-agent RL fine-tuning)."""

    def __init__(self, cfg: Config, output_dir: str | Path, **options):
        super().__init__(cfg, output_dir, **options)
        self.algorithm = make_algorithm(cfg)
        # accelerate's FSDP config turns on the same sharding: cory shards the policy itself, so that
        # sampling and evaluation get the whole weights (cory.sharding). On CPUs accelerate drops its
        # FSDP setting (it keeps DDP for MULTI_CPU), hence the look at the launcher's variable.
        self.fsdp = (cfg.train.fsdp or self.accelerator.distributed_type == DistributedType.FSDP
                     or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
        if self.fsdp and (cfg.model.lora.r or cfg.model.trainable_layers):
            raise UsageError("FSDP runs full fine-tuning of every layer for now; leave model.lora.r=0 and model.trainable_layers=0")
        agents = build_agents(cfg, ["policy"], self.algorithm.needs_values)
        self.policy, self.adapter = agents.policies["policy"], agents.adapters["policy"]
        if self.fsdp:
            shard_policy(self.policy.module)
        if cfg.train.max_staleness and self.accelerator.num_processes > 1:
            raise UsageError("train.max_staleness runs one trainer process and one rollout worker: launch a single process")
        control, fallback = make_control(cfg, agents.reference, multi_turn=bool(cfg.env.id))
        self.backend = make_backends(cfg, agents.policies, agents.adapters, cfg.model.name, self.accelerator.num_processes)["policy"]
        self.sampler, self.task = make_sampler(cfg, self.policy, control, self.backend, self.accelerator.process_index,
                                               self.accelerator.num_processes)
        self.learner = Learner(self.policy, agents.reference, self.algorithm, cfg, self.accelerator,
                               agents.parameters["policy"], fallback=fallback, teacher=agents.teacher)

    @property
    def learners(self) -> dict:
        return {"policy": self.learner}

    def evaluate_all(self) -> dict:
        cfg = self.cfg
        reference = eval_scorer(cfg, self.learner.reference)
        if cfg.env.id:
            return evaluate_env(self.policy, cfg.env.id, cfg.env.kwargs, cfg.env.eval_episodes, eval_params(cfg),
                                seed=cfg.eval.seed, reference=reference, max_turns=cfg.env.max_turns, backend=self.backend)
        return evaluate(self.policy, self.task.eval_prompts, self.task.reward, eval_params(cfg), cfg.eval.samples_per_prompt,
                        cfg.eval.seed, reference=reference, backend=self.backend, exact_kl=cfg.kl.exact_accounting)

    def iterate(self) -> dict:
        """One rollout and one learner step; returns the iteration's metrics (mean over processes)."""
        t0 = time.perf_counter()
        state, rollouts = self.state, self.rollouts
        if rollouts is None:
            rollout = self.sampler.collect(self.cfg.train.batch_size, state.rng, state.generator, group_size=self.algorithm.group_size)
            t_gen = time.perf_counter() - t0
        else:  # sampled by the worker while the previous iterations trained
            batch = rollouts.take(state.iteration, self.learner.sampled_logprobs)
            rollout, t_gen = batch.rollout, batch.seconds
        self.backend.pause()  # vLLM on a GPU: sleep while the trainer trains
        n_generated = int(rollout.response_mask.sum())
        _, metrics = self.learner.step(rollout, state.iteration, state.generator)
        self.backend.mark_stale()  # the engine gets the new weights before the next rollout
        state.iteration += 1
        if rollouts is not None:
            metrics.update(rollouts.trained(batch, state))
        metrics.update({"time/generate": t_gen, "time/iteration": time.perf_counter() - t0,
                        "tokens_per_s/generate": n_generated / max(t_gen, 1e-9)})
        return reduce_metrics(self.accelerator, metrics)

    def save_extra(self, path: Path) -> None:
        if self.fsdp:  # each process's shard, before the DONE marker
            release_full(self.learner.module)
            save_sharded(path / "fsdp", self.learner.module, self.learner.optimizer)
            gather_full(self.learner.module)

    def _start(self, resume: bool | None = None) -> None:
        super()._start(resume)
        if self.resume and self.fsdp:
            release_full(self.learner.module)
            load_sharded(self.resumed_from / "fsdp", self.learner.module, self.learner.optimizer)
            gather_full(self.learner.module)
        self.rollouts = start_worker(rollout_side, self.cfg, self.state, {"policy": self.policy.module}, self.learners, self.threads)

    def save_final(self, evaluation: dict) -> None:
        final = self.output_dir / "final"
        if not self.fsdp:
            save_policy(self.cfg, self.policy, self.adapter, final)
            return
        state = gathered_state_dict(self.policy.module)
        self.policy.model.save_pretrained(final, state_dict={k[3:]: v for k, v in state.items() if k.startswith("lm.")})
        self.policy.tokenizer.save_pretrained(final)
        head = {k[len("value_head."):]: v.contiguous().cpu() for k, v in state.items() if k.startswith("value_head.")}
        if head:
            save_file(head, str(final / VALUE_HEAD_FILE))
