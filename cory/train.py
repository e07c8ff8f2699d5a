"""`cory train`: build a run from a Config, then iterate rollout -> learner step, with logging,
evaluation, checkpoints that resume exactly, and the final model as an HF folder.

Run directory:
    config.yaml          the resolved configuration
    metrics.jsonl        one object per iteration (iteration, reward_mean, kl_mean, ...)
    eval.jsonl           evaluations on the fixed prompt set (iteration 0 = the initial model)
    cory/                TensorBoard event files (accelerate trackers)
    checkpoints/iter_N/  accelerate state (safetensors weights, optimizer, RNG) + run_state_rank{r}.pt
    final/               the trained policy (save_pretrained), loadable by AutoModelForCausalLM
    summary.json         initial and final evaluation
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from cory.config import Config, ConfigError, to_flat_dict, to_yaml

CHECKPOINTS = "checkpoints"


class UsageError(ValueError):
    """Bad input found before any work starts; its message is one line."""


# -- pre-flight checks ------------------------------------------------------------------------
def check_model_name(name: str) -> None:
    """A zoo name must be registered; a path must exist; anything else must be a reachable hub id."""
    from cory import zoo

    if zoo.is_zoo_name(name):
        try:
            zoo.registry.entry(name)
        except zoo.registry.UnknownModelError:
            known = [m["name"] for m in zoo.list_models()]
            raise UsageError(f"unknown model '{name}'; the zoo has: {', '.join(known)} (NAME@seedN: NAME from seed N)") from None
        return
    if Path(name).expanduser().is_dir():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise UsageError(f"model folder not found: {name}")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"model '{name}' is not a cory: zoo name, a local folder, or a hub id that can be loaded ({reason[:120]})") from None


def preflight(cfg: Config) -> None:
    """Everything that can be checked without loading models; raises UsageError/ConfigError."""
    from cory.rewards import RewardError, validate_spec
    from cory.tasks import BUILTIN_REWARD, TASKS

    if cfg.env.id:
        import gymnasium

        import cory.envs  # noqa: F401  (registers the cory/* ids)

        if cfg.env.id not in gymnasium.registry:
            ids = ", ".join(sorted(k for k in gymnasium.registry if k.startswith("cory/")))
            raise ConfigError(f"bad value for config key 'env.id': {cfg.env.id!r}; cory environments: {ids}")
    if cfg.task.name not in TASKS:
        raise ConfigError(f"bad value for config key 'task.name': {cfg.task.name!r}; choose one of: {', '.join(sorted(TASKS))}")
    check_model_name(cfg.model.name)
    for name in [cfg.model.reference, cfg.model.trusted, *cfg.model.reference_ensemble]:
        if name:
            check_model_name(name)
    if cfg.task.name in BUILTIN_REWARD or cfg.env.id:
        return
    try:
        validate_spec(cfg.task.reward)
    except (RewardError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None


# -- run state ------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Per-process state that makes a resumed run continue exactly."""

    iteration: int
    rng: np.random.Generator
    generator: torch.Generator

    @classmethod
    def fresh(cls, seed: int, rank: int) -> "RunState":
        return cls(0, np.random.default_rng([seed, rank]), torch.Generator().manual_seed(seed * 1_000_003 + rank))

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "rng": self.rng.bit_generator.state, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / CHECKPOINTS).glob("iter_*"), key=lambda p: int(p.name.split("_")[1]))
    done = [p for p in ckpts if (p / "DONE").exists()]
    return done[-1] if done else None


def _drop_shared_tensor_warning(record: logging.LogRecord) -> bool:
    return "Removed shared tensor" not in record.getMessage()


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: RunState, learners: dict, keep: int) -> Path:
    """accelerate state (weights, optimizers, RNG) + per-rank run state and learner states."""
    path = output_dir / CHECKPOINTS / f"iter_{state.iteration:06d}"
    # accelerate warns that it drops the tied lm_head copy from the safetensors file; loading the
    # state restores the tie (test_resume_continues_exactly checks the weights bit for bit).
    quiet = logging.getLogger("accelerate.utils.other")
    quiet.addFilter(_drop_shared_tensor_warning)
    try:
        accelerator.save_state(str(path))
    finally:
        quiet.removeFilter(_drop_shared_tensor_warning)
    saved = {"run": state.state_dict(), "learners": {k: v.state_dict() for k, v in learners.items()}}
    torch.save(saved, path / f"run_state_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / "DONE").write_text(str(state.iteration))
        ckpts = sorted((output_dir / CHECKPOINTS).glob("iter_*"))
        for old in ckpts[: max(0, len(ckpts) - max(keep, 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, state: RunState, learners: dict) -> None:
    accelerator.load_state(str(path))
    saved = torch.load(path / f"run_state_rank{accelerator.process_index}.pt", weights_only=False)
    state.load_state_dict(saved["run"])
    for name, learner in learners.items():
        learner.load_state_dict(saved["learners"][name])


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Drop rows written after the checkpoint we resume from, so the log continues exactly."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["iteration"] <= last_iteration]
    path.write_text("".join(r + "\n" for r in rows))


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


# -- building a run -------------------------------------------------------------------------------
def load_reference(name: str, dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from cory import zoo

    return AutoModelForCausalLM.from_pretrained(zoo.resolve(name), dtype=dtype).eval().requires_grad_(False)


def make_reference(cfg: Config, dtype) -> torch.nn.Module:
    """The frozen reference: model.reference (default the initial model) or, with
    model.reference_ensemble, the pessimistic ensemble of those models."""
    if cfg.model.reference_ensemble:
        from cory.ensemble import EnsembleReference

        members = [load_reference(name, dtype) for name in cfg.model.reference_ensemble]
        return EnsembleReference(members, temperature=cfg.generation.temperature)
    return load_reference(cfg.model.reference or cfg.model.name, dtype)


def make_control(cfg: Config, reference: torch.nn.Module, dtype, multi_turn: bool):
    """(sampling control, fallback model) for a hard episode budget (kl.hard_budget) or asking for
    help (kl.help_threshold); (None, None) when neither is on."""
    temperature = cfg.generation.temperature or 1.0
    if cfg.kl.hard_budget > 0:
        from cory.budget import EpisodeBudget

        return EpisodeBudget(reference, cfg.kl.hard_budget, temperature, note=cfg.kl.budget_note and multi_turn), None
    if cfg.kl.help_threshold > 0:
        from cory.ensemble import AskForHelp

        trusted = load_reference(cfg.model.trusted or cfg.model.reference_ensemble[0], dtype)
        return AskForHelp(reference, trusted, cfg.kl.help_threshold, cfg.kl.help_scope, temperature), trusted
    return None, None


def sampling_params(cfg: Config):
    from cory.policy import SamplingParams

    g = cfg.generation
    source = cfg.env if cfg.env.id else cfg.task  # the prompts' chat rendering
    return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                          stop_strings=tuple(g.stop_strings), chat=source.chat_template, system_prompt=source.system_prompt,
                          chat_examples=_chat_examples(cfg))


def _chat_examples(cfg: Config) -> tuple:
    """A built-in task's example chat turns (the arithmetic one-shot) when its prompts are chat."""
    if cfg.env.id or not cfg.task.chat_template:
        return ()
    from cory.tasks.registry import CHAT_EXAMPLES

    return CHAT_EXAMPLES.get(cfg.task.name, ())


def eval_params(cfg: Config):
    from dataclasses import replace

    return replace(sampling_params(cfg), temperature=cfg.eval.temperature)


def cpu_threads(requested: int, processes: int) -> int:
    """Torch CPU threads: the request, else OMP_NUM_THREADS, else the cores shared among processes.

    Oversubscribed threads spin-wait: on a busy machine too many threads make every step many times
    slower, so an explicit OMP_NUM_THREADS is always honoured.
    """
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // processes)


def make_accelerator(cfg: Config, output_dir: Path) -> Accelerator:
    trackers = list(cfg.train.log_with) or None
    # cpu=True where there is no GPU: accelerate then sets up multi-process CPU training (gloo) when
    # started by torchrun or `accelerate launch`, instead of silently running each rank alone.
    return Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers, project_dir=str(output_dir),
                       cpu=not torch.cuda.is_available())


class Run:
    """What every kind of run shares: accelerator, run state, logging, evaluation rows, checkpoints
    and the iteration loop. Subclasses build their pieces and define `iterate`, `evaluate_all`,
    `learners` and `save_final`."""

    def __init__(self, cfg: Config, output_dir: str | Path):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = make_accelerator(cfg, self.output_dir)
        set_seed(cfg.train.seed)
        torch.set_num_threads(cpu_threads(cfg.train.num_threads, self.accelerator.num_processes))
        self.state = RunState.fresh(cfg.train.seed, self.accelerator.process_index)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.eval_path = self.output_dir / "eval.jsonl"

    # -- to be defined by subclasses ---------------------------------------------------------------
    @property
    def learners(self) -> dict:
        raise NotImplementedError

    def iterate(self) -> dict:
        raise NotImplementedError

    def evaluate_all(self) -> dict:
        """Evaluation on the fixed prompt set: a flat dict of numbers plus `samples`."""
        raise NotImplementedError

    def save_final(self, evaluation: dict) -> None:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def evaluate(self) -> dict:
        """Evaluates, appends the row to eval.jsonl and logs it to the trackers."""
        result = self.evaluate_all()
        _append_jsonl(self.eval_path, {"iteration": self.state.iteration, **result})
        self.accelerator.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=self.state.iteration)
        return result

    def _start(self, resume: bool) -> None:
        if resume:
            ckpt = latest_checkpoint(self.output_dir)
            if ckpt is None:
                raise UsageError(f"--resume: no checkpoint in {self.output_dir / CHECKPOINTS}")
            load_checkpoint(self.accelerator, ckpt, self.state, self.learners)
            if self.is_main:
                _truncate_jsonl(self.metrics_path, self.state.iteration)
                _truncate_jsonl(self.eval_path, self.state.iteration)
        elif self.is_main:
            for p in (self.metrics_path, self.eval_path):
                p.unlink(missing_ok=True)
        if self.is_main:
            (self.output_dir / "config.yaml").write_text(to_yaml(self.cfg))
        self.accelerator.init_trackers("cory", config=to_flat_dict(self.cfg))

    def checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, self.state, self.learners, self.cfg.train.keep_checkpoints)

    def run(self, resume: bool = False) -> dict:
        """Trains to cfg.train.iterations; returns the summary (also written to summary.json)."""
        from tqdm.auto import tqdm

        cfg, acc, state = self.cfg, self.accelerator, self.state
        self._start(resume)
        if self.is_main and state.iteration == 0:
            self.evaluate()
        acc.wait_for_everyone()
        bar = tqdm(total=cfg.train.iterations, initial=state.iteration, desc="train",
                   disable=not (self.is_main and cfg.train.progress), dynamic_ncols=True)
        while state.iteration < cfg.train.iterations:
            metrics = self.iterate()
            if self.is_main:
                _append_jsonl(self.metrics_path, {"iteration": state.iteration, **metrics})
            acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state.iteration)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_mean']:.3f}")
            if cfg.train.eval_every and state.iteration % cfg.train.eval_every == 0 and state.iteration < cfg.train.iterations:
                if self.is_main:
                    self.evaluate()
                acc.wait_for_everyone()
            if cfg.train.checkpoint_every and state.iteration % cfg.train.checkpoint_every == 0:
                self.checkpoint()
        bar.close()
        last = latest_checkpoint(self.output_dir)
        if last is None or last.name != f"iter_{state.iteration:06d}":
            self.checkpoint()
        summary = {}
        if self.is_main:
            final = self.evaluate()
            self.save_final(final)
            rows = [json.loads(line) for line in self.eval_path.read_text().splitlines() if line.strip()]
            summary = {
                "iterations": state.iteration,
                "initial_eval": rows[0] if rows and rows[0]["iteration"] == 0 else None,
                "final_eval": rows[-1],
            }
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        acc.end_training()
        return summary


class TrainingRun(Run):
    """One policy trained by one Learner on a task (single-agent RL fine-tuning)."""

    def __init__(self, cfg: Config, output_dir: str | Path):
        from cory.algorithms import make_algorithm
        from cory.learner import Learner
        from cory.policy import Policy
        from cory.rollout import Sampler
        from cory.tasks import TaskEnv, make_task

        super().__init__(cfg, output_dir)
        self.algorithm = make_algorithm(cfg)
        dtype = getattr(torch, cfg.model.dtype)
        self.policy = Policy.from_pretrained(cfg.model.name, value_head=self.algorithm.needs_values, dtype=dtype)
        reference = make_reference(cfg, dtype)
        control, fallback = make_control(cfg, reference, dtype, multi_turn=bool(cfg.env.id))
        if cfg.env.id:
            from cory.envs.batch import GymTextEnvBatch

            self.task = None
            env = GymTextEnvBatch(cfg.env.id, cfg.env.pool_size or None, pool_seed=cfg.train.seed, **cfg.env.kwargs)
            self.sampler = Sampler(self.policy, env, sampling_params(cfg), max_turns=cfg.env.max_turns, control=control)
        else:
            self.task = make_task(cfg.task)
            self.sampler = Sampler(self.policy, TaskEnv(self.task), sampling_params(cfg), control=control)
        self.learner = Learner(self.policy, reference, self.algorithm, cfg, self.accelerator, fallback=fallback)

    @property
    def learners(self) -> dict:
        return {"policy": self.learner}

    def evaluate_all(self) -> dict:
        from cory.evaluate import evaluate, evaluate_env

        cfg = self.cfg
        if cfg.env.id:
            return evaluate_env(self.policy, cfg.env.id, cfg.env.kwargs, cfg.env.eval_episodes, eval_params(cfg),
                                seed=cfg.eval.seed, reference=self.learner.reference, max_turns=cfg.env.max_turns)
        return evaluate(self.policy, self.task.eval_prompts, self.task.reward, eval_params(cfg),
                        cfg.eval.samples_per_prompt, cfg.eval.seed, reference=self.learner.reference)

    def iterate(self) -> dict:
        """One rollout and one learner step; returns the iteration's metrics (mean over processes)."""
        from cory.learner import reduce_metrics

        t0 = time.perf_counter()
        rollout = self.sampler.collect(self.cfg.train.batch_size, self.state.rng, self.state.generator, group_size=self.algorithm.group_size)
        t_gen = time.perf_counter() - t0
        n_generated = int(rollout.response_mask.sum())
        _, metrics = self.learner.step(rollout, self.state.iteration, self.state.generator)
        self.state.iteration += 1
        metrics.update({"time/generate": t_gen, "time/iteration": time.perf_counter() - t0,
                        "tokens_per_s/generate": n_generated / max(t_gen, 1e-9)})
        return reduce_metrics(self.accelerator, metrics)

    def save_final(self, evaluation: dict) -> None:
        self.policy.save_pretrained(self.output_dir / "final")


def train(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict:
    """Builds the run the config asks for (single agent, or CORY when cory.enabled) and runs it."""
    if getattr(cfg, "cory", None) is not None and cfg.cory.enabled:
        from cory.coevolve import CoryRun

        return CoryRun(cfg, output_dir).run(resume=resume)
    return TrainingRun(cfg, output_dir).run(resume=resume)
