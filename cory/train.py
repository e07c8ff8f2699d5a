"""`TrainingRun`: one policy trained by one Learner on a task or a text environment (single-agent
RL fine-tuning). `cory.coevolve.CoryRun` is the two-agent run; both share `cory.run.Run`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from cory.build import eval_params, make_backend, make_control, make_reference, sampling_params
from cory.config import Config
from cory.errors import UsageError
from cory.run import Run


class TrainingRun(Run):
    """One policy trained by one Learner on a task (single-agent RL fine-tuning)."""

    def __init__(self, cfg: Config, output_dir: str | Path, **options):
        from cory.algorithms import make_algorithm
        from cory.learner import Learner
        from cory.policy import Policy
        from cory.rollout import Sampler
        from cory.tasks import TaskEnv, make_task

        super().__init__(cfg, output_dir, **options)
        self.algorithm = make_algorithm(cfg)
        dtype = getattr(torch, cfg.model.dtype)
        if cfg.model.lora.r:
            from cory.lora import lora_policy

            # The frozen base with the adapter disabled is the reference: no second copy.
            self.policy, reference = lora_policy(cfg.model.name, cfg.model.lora, dtype, value_head=self.algorithm.needs_values)
        else:
            self.policy = Policy.from_pretrained(cfg.model.name, value_head=self.algorithm.needs_values, dtype=dtype)
            reference = make_reference(cfg, dtype)
        # accelerate's FSDP config turns on the same sharding: cory shards the policy itself, so that
        # sampling and evaluation get the whole weights (cory.sharding). On CPUs accelerate drops its
        # FSDP setting (it keeps DDP for MULTI_CPU), hence the look at the launcher's variable.
        from accelerate.utils import DistributedType

        self.fsdp = (cfg.train.fsdp or self.accelerator.distributed_type == DistributedType.FSDP
                     or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
        if self.fsdp and cfg.model.lora.r:
            raise UsageError("FSDP runs full fine-tuning for now; leave model.lora.r=0")
        if self.fsdp:
            from cory.sharding import shard_policy

            shard_policy(self.policy.module)
        control, fallback = make_control(cfg, reference, dtype, multi_turn=bool(cfg.env.id))
        self.backend = make_backend(cfg, self.accelerator, {"policy": (self.policy, None)})["policy"]
        if cfg.env.id:
            from cory.envs.batch import GymTextEnvBatch

            self.task = None
            env = GymTextEnvBatch(cfg.env.id, cfg.env.pool_size or None, pool_seed=cfg.train.seed, **cfg.env.kwargs)
            self.sampler = Sampler(self.policy, env, sampling_params(cfg), max_turns=cfg.env.max_turns, control=control,
                                   backend=self.backend)
        else:
            self.task = make_task(cfg.task)
            self.sampler = Sampler(self.policy, TaskEnv(self.task), sampling_params(cfg), control=control, backend=self.backend)
        self.learner = Learner(self.policy, reference, self.algorithm, cfg, self.accelerator, fallback=fallback)

    @property
    def learners(self) -> dict:
        return {"policy": self.learner}

    def evaluate_all(self) -> dict:
        from cory.evaluate import evaluate, evaluate_env

        cfg = self.cfg
        if cfg.env.id:
            return evaluate_env(self.policy, cfg.env.id, cfg.env.kwargs, cfg.env.eval_episodes, eval_params(cfg),
                                seed=cfg.eval.seed, reference=self.learner.reference, max_turns=cfg.env.max_turns,
                                shared_prefix=cfg.train.shared_prefix)
        return evaluate(self.policy, self.task.eval_prompts, self.task.reward, eval_params(cfg),
                        cfg.eval.samples_per_prompt, cfg.eval.seed, reference=self.learner.reference,
                        shared_prefix=cfg.train.shared_prefix)

    def iterate(self) -> dict:
        """One rollout and one learner step; returns the iteration's metrics (mean over processes)."""
        from cory.learner import reduce_metrics

        t0 = time.perf_counter()
        rollout = self.sampler.collect(self.cfg.train.batch_size, self.state.rng, self.state.generator, group_size=self.algorithm.group_size)
        self.backend.pause()  # vLLM on a GPU: sleep while the trainer trains
        t_gen = time.perf_counter() - t0
        n_generated = int(rollout.response_mask.sum())
        _, metrics = self.learner.step(rollout, self.state.iteration, self.state.generator)
        self.backend.mark_stale()  # the engine gets the new weights before the next rollout
        self.state.iteration += 1
        metrics.update({"time/generate": t_gen, "time/iteration": time.perf_counter() - t0,
                        "tokens_per_s/generate": n_generated / max(t_gen, 1e-9)})
        return reduce_metrics(self.accelerator, metrics)

    def save_extra(self, path: Path) -> None:
        if self.fsdp:  # each process's shard, before the DONE marker
            from cory.sharding import gather_full, release_full, save_sharded

            release_full(self.learner.module)
            save_sharded(path / "fsdp", self.learner.module, self.learner.optimizer)
            gather_full(self.learner.module)

    def _start(self, resume: bool | None = None) -> None:
        super()._start(resume)
        if self.resume and self.fsdp:
            from cory.sharding import gather_full, load_sharded, release_full

            release_full(self.learner.module)
            load_sharded(self.resumed_from / "fsdp", self.learner.module, self.learner.optimizer)
            gather_full(self.learner.module)

    def save_final(self, evaluation: dict) -> None:
        if self.fsdp:
            from safetensors.torch import save_file

            from cory.policy import VALUE_HEAD_FILE
            from cory.sharding import gathered_state_dict

            final = self.output_dir / "final"
            state = gathered_state_dict(self.policy.module)
            self.policy.model.save_pretrained(final, state_dict={k[3:]: v for k, v in state.items() if k.startswith("lm.")})
            self.policy.tokenizer.save_pretrained(final)
            head = {k[len("value_head."):]: v.contiguous().cpu() for k, v in state.items() if k.startswith("value_head.")}
            if head:
                save_file(head, str(final / VALUE_HEAD_FILE))
            return
        if self.cfg.model.lora.r:
            from cory.lora import save_lora_policy

            save_lora_policy(self.policy, self.output_dir / "final", self.cfg.model.name, getattr(torch, self.cfg.model.dtype))
            return
        self.policy.save_pretrained(self.output_dir / "final")
