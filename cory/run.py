"""A run's life-cycle: its directory, run id, RNG and learner state, checkpoints that resume
exactly, the logs, and `Run`, the iteration loop every kind of run shares.

Run directory (owned by one run: a fresh run refuses a directory that holds another, unless --overwrite):
    run.json             the run id; every checkpoint carries it
    config.yaml          the resolved configuration (the latest one, after allowed changes on --resume)
    config_history.jsonl the first configuration, then every change made on --resume (iteration, old, new)
    metrics.jsonl        one object per iteration (iteration, reward_mean, kl_mean, ...)
    eval.jsonl           evaluations on the fixed prompt set (iteration 0 = the initial model)
    cory/                TensorBoard event files (accelerate trackers)
    checkpoints/iter_N/  accelerate state (safetensors weights, optimizer) + run_state_rank{r}.json
                         (run id, iteration, RNG states, learner states, config, the position in
                         a task.dataset's stream) + DONE once complete;
                         FSDP runs keep each rank's shard in fsdp/rank{r}.safetensors
    final/               the trained policy (save_pretrained), loadable by AutoModelForCausalLM;
                         with model.lora.r the merged model, and the adapter alone in final/adapter/
    summary.json         initial and final evaluation
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Callable
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from cory.build import cpu_threads, make_accelerator
from cory.config import Config, to_flat_dict, to_yaml
from cory.errors import RunError, UsageError, warn

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
HISTORY_FILE = "config_history.jsonl"
RUN_ENTRIES = (RUN_FILE, "config.yaml", HISTORY_FILE, "metrics.jsonl", "eval.jsonl", "summary.json", CHECKPOINTS,
               "final", "agents", "cory", "plots")
"""What a run writes in its directory: any of these means the directory holds a run."""
RESUMABLE_KEYS = ("train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
                  "train.log_with", "train.progress", "train.num_threads", "train.worker_timeout")
"""Config keys that --resume may change (recorded in config_history.jsonl); others need --force.
Not train.max_staleness: the synchronous loop samples with the trainer's generators, an asynchronous
run with the worker's (`RunState.sampler`), so a change of k changes the data stream (forced to 0,
the trainer takes the worker's generators over: `Run._start`)."""


def check_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """The run directory can be written and is not another run's (unless overwrite); on resume it
    holds a run with a complete checkpoint. Writes nothing."""
    p = Path(output_dir)
    if p.exists() and not p.is_dir():
        raise UsageError(f"output directory {p} is a file")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"output directory {p} cannot be created: {parent} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cory-write-test-", dir=parent))
    except OSError as e:
        raise UsageError(f"output directory {p} is not writable ({e.strerror or e})") from None
    if resume:
        if overwrite:
            raise UsageError("--resume continues the run in the directory; --overwrite replaces it: pick one")
        if read_run_id(p) is None:
            raise UsageError(f"--resume: no checkpoint in {p / CHECKPOINTS} ({p} holds no cory run)")
        if latest_checkpoint(p) is None:
            raise UsageError(f"--resume: no checkpoint in {p / CHECKPOINTS} (the run stopped before it wrote one): "
                             "start it again with --overwrite")
        return
    held = [e for e in RUN_ENTRIES if (p / e).exists()]
    if held and not overwrite:
        rid = read_run_id(p)
        raise UsageError(f"output directory {p} holds a run{f' ({rid})' if rid else ''}: continue it with --resume, "
                         "or replace it with --overwrite")


def config_changes(old: dict, cfg: Config) -> dict[str, list]:
    """`section.key` -> [old, new] for every key whose value differs from the recorded config."""
    new = flat_config(cfg)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check_resume_config(cfg: Config, output_dir: str | Path, force: bool = False) -> dict[str, list]:
    """Compares the config with the newest readable checkpoint's: keys outside RESUMABLE_KEYS may not
    change unless forced. Returns the changes."""
    for path in checkpoints(Path(output_dir), read_run_id(Path(output_dir)))[::-1]:
        try:
            old = read_run_state(path)["config"]
        except (OSError, ValueError, KeyError):
            continue
        changes = config_changes(old, cfg)
        refused = [k for k in changes if k not in RESUMABLE_KEYS]
        if refused and not force:
            shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused)
            raise UsageError(f"--resume: the run was trained with other values of {shown}; "
                             "start a new run, or pass --force to continue with the new values")
        return changes
    return {}


# -- run state ------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Per-process state that makes a resumed run continue exactly. Saved as JSON: never a pickle."""

    iteration: int
    rng: np.random.Generator
    generator: torch.Generator
    sampler: dict | None = None
    """Asynchronous rollouts: the rollout worker's generators (`rng`, `generator`) after the last
    batch trained, where a resumed worker continues (`cory.rollout_worker`); None otherwise."""

    @classmethod
    def fresh(cls, seed: int, rank: int) -> "RunState":
        return cls(0, np.random.default_rng([seed, rank]), torch.Generator().manual_seed(seed * 1_000_003 + rank))

    def state_dict(self) -> dict:
        state = {"iteration": self.iteration, "rng": self.rng.bit_generator.state, "generator": self.generator.get_state().tolist()}
        if self.sampler is not None:
            state["sampler"] = self.sampler
        return state

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.sampler = state.get("sampler")


def _json_default(value):
    """Learner states hold numbers; numpy and 0-d tensor scalars become plain floats/ints."""
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    raise TypeError(f"run state value of type {type(value).__name__} cannot be saved as JSON")


def flat_config(cfg: Config) -> dict:
    """`section.key` -> value, as JSON would give it back (for comparing configs across a resume)."""
    return {f"{s}.{k}": v for s, values in json.loads(json.dumps(dataclasses.asdict(cfg))).items() for k, v in values.items()}


def _iteration_of(path: Path) -> int | None:
    m = re.fullmatch(r"iter_(\d+)", path.name)
    return int(m.group(1)) if m else None


def read_run_id(output_dir: Path) -> str | None:
    try:
        return str(json.loads((Path(output_dir) / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_run_state(path: Path, rank: int = 0) -> dict:
    """The JSON run state a checkpoint holds for `rank` (raises OSError/ValueError if unreadable)."""
    state = json.loads((path / f"run_state_rank{rank}.json").read_text())
    if not isinstance(state, dict):
        raise ValueError("run state is not a JSON object")
    return state


def checkpoints(output_dir: Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints (DONE written) of the run `run_id` (any run if None), oldest first."""
    found = []
    for p in (Path(output_dir) / CHECKPOINTS).glob("iter_*"):
        if _iteration_of(p) is None or not (p / "DONE").exists():
            continue
        if run_id is not None:
            try:
                if read_run_state(p).get("run_id") != run_id:
                    continue
            except (OSError, ValueError):
                pass  # unreadable run state: kept as a candidate, so that loading it warns and falls back
        found.append(p)
    return sorted(found, key=_iteration_of)


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = checkpoints(output_dir, read_run_id(output_dir))
    return done[-1] if done else None


def _drop_shared_tensor_warning(record: logging.LogRecord) -> bool:
    return "Removed shared tensor" not in record.getMessage()


def _reason(e: BaseException) -> str:
    """One line saying why a write failed."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def check_finite(learners: dict) -> None:
    """Raises RunError unless every trained weight is finite: nothing non-finite is ever written."""
    for name, learner in learners.items():
        for pname, p in learner.module.named_parameters():
            if p.requires_grad and not torch.isfinite(p.detach()).all():
                raise RunError(f"weights of '{name}' became non-finite ({pname}); nothing was saved from them "
                               "(learning rate or rewards too large?)")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: RunState, learners: dict, keep: int,
                    run_id: str = "", config: dict | None = None, extra: Callable[[Path], None] | None = None,
                    task: dict | None = None) -> Path:
    """accelerate state (weights, optimizers) + per-rank JSON run state (+ whatever `extra(path)`
    writes, e.g. FSDP shards, on every process; `task`: where the task's prompt stream stands);
    DONE marks it complete.

    Only finite weights are saved. A checkpoint that cannot be written (a full disk) is removed and
    the run stops with RunError; the previous complete checkpoint stays.
    """
    check_finite(learners)
    path = output_dir / CHECKPOINTS / f"iter_{state.iteration:06d}"
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)  # a stale DONE must never vouch for new, half-written files
    accelerator.wait_for_everyone()
    # accelerate warns that it drops the tied lm_head copy from the safetensors file; loading the
    # state restores the tie (test_resume_continues_exactly checks the weights bit for bit).
    quiet = logging.getLogger("accelerate.utils.other")
    quiet.addFilter(_drop_shared_tensor_warning)
    try:
        accelerator.save_state(str(path))
        if extra is not None:
            extra(path)
        saved = {"run_id": run_id, **state.state_dict(), "learners": {k: v.state_dict() for k, v in learners.items()}}
        if config is not None:
            saved["config"] = config
        if task:
            saved["task"] = task
        (path / f"run_state_rank{accelerator.process_index}.json").write_text(json.dumps(saved, default=_json_default))
    except Exception as e:  # noqa: BLE001  (a full disk is an OSError from Python, a SafetensorError from safetensors)
        shutil.rmtree(path, ignore_errors=True)
        raise RunError(f"cannot write checkpoint {path}: {_reason(e)}; the previous complete checkpoint is kept") from None
    finally:
        quiet.removeFilter(_drop_shared_tensor_warning)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            (path / "DONE").write_text(str(state.iteration))
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            raise RunError(f"cannot write checkpoint {path}: {_reason(e)}; the previous complete checkpoint is kept") from None
        done = checkpoints(output_dir, run_id)
        for old in done[: max(0, len(done) - max(keep, 1))]:
            (old / "DONE").unlink(missing_ok=True)  # first, so that a kill mid-removal leaves no "complete" husk
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, state: RunState, learners: dict, task=None) -> None:
    """Loads a checkpoint: accelerate reads tensors with weights_only=True, the run state is JSON
    (with the position of the `task`'s prompt stream, when it has one)."""
    saved = read_run_state(path, accelerator.process_index)
    accelerator.load_state(str(path))
    state.load_state_dict(saved)
    for name, learner in learners.items():
        learner.load_state_dict(saved["learners"][name])
    if task is not None and task.stream is not None:
        task.load_state_dict(saved["task"])


def load_latest(accelerator: Accelerator, output_dir: Path, run_id: str, state: RunState, learners: dict, task=None) -> Path:
    """Loads the newest checkpoint of this run that loads; ones that fail are skipped with a warning
    (and set aside as iter_N.unloadable, so rotation never keeps them instead of good ones)."""
    candidates = checkpoints(output_dir, run_id)[::-1]
    failed = []
    for path in candidates:
        try:
            load_checkpoint(accelerator, path, state, learners, task)
        except Exception as e:  # noqa: BLE001  (any failure: truncated file, bad JSON, wrong shapes)
            reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
            warn(f"checkpoint {path.name} cannot be loaded ({type(e).__name__}: {reason}); trying an older one")
            failed.append(path)
            continue
        if failed:
            warn(f"resuming from {path.name}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for bad in failed:
                bad.rename(bad.with_name(bad.name + ".unloadable"))
        return path
    raise UsageError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS} can be loaded")


def _write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Drop rows written after the checkpoint we resume from, so the log continues exactly."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill during the write
        if isinstance(row, dict) and row.get("iteration", math.inf) <= last_iteration:
            rows.append(line)
    path.write_text("".join(r + "\n" for r in rows))


def json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _append_jsonl(path: Path, row: dict) -> None:
    try:
        with path.open("a") as fh:
            fh.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
    except OSError as e:
        raise RunError(f"cannot write {path}: {_reason(e)}") from None


class Run:
    """What every kind of run shares: accelerator, run state, logging, evaluation rows, checkpoints
    and the iteration loop. Subclasses build their pieces and define `iterate`, `evaluate_all`,
    `learners` and `save_final`."""

    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.resume, self.overwrite = resume, overwrite
        self.run_id = ""
        # Nothing is written before _start: a run that fails while building leaves no trace.
        self.accelerator = make_accelerator(cfg, self.output_dir)
        set_seed(cfg.train.seed)
        # An asynchronous run's rollout worker is a process of its own.
        self.threads = cpu_threads(cfg.train.num_threads, self.accelerator.num_processes + (cfg.train.max_staleness > 0))
        torch.set_num_threads(self.threads)
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

    backend = None
    """The rollout engine when it holds resources (vLLM); released by `close`."""
    rollouts = None
    """The asynchronous rollout worker (`cory.rollout_worker.AsyncRollouts`, train.max_staleness > 0),
    started by a subclass's `_start`; stopped by `close`."""

    task = None
    """The `PromptTask` a run draws prompts from (None in an environment); a prompt stream's
    position is saved with every checkpoint."""

    def close(self) -> None:
        """Stop the rollout worker; release the rollout engine (its weights and KV cache)."""
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None

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

    def _claim(self) -> None:
        """A fresh run takes the directory (removing another run's files only with overwrite) and
        records its run id; a resumed run reads it."""
        acc = self.accelerator
        if self.is_main and not self.resume:
            if self.overwrite:
                for entry in RUN_ENTRIES:
                    target = self.output_dir / entry
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
            created = not self.output_dir.exists()
            run = {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                _write_atomic(self.output_dir / RUN_FILE, json.dumps(run))
            except OSError as e:
                if created:
                    shutil.rmtree(self.output_dir, ignore_errors=True)
                raise RunError(f"cannot write the run directory {self.output_dir}: {_reason(e)}; nothing was written") from None
        acc.wait_for_everyone()
        self.run_id = read_run_id(self.output_dir) or ""

    def _start(self, resume: bool | None = None) -> None:
        if resume is not None:
            self.resume = resume
        self._claim()
        history = self.output_dir / HISTORY_FILE
        if self.resume:
            ckpt = self.resumed_from = load_latest(self.accelerator, self.output_dir, self.run_id, self.state, self.learners, self.task)
            for learner in self.learners.values():  # a forced change of weight decay takes effect (lr is set each step)
                for group in learner.optimizer.param_groups:
                    group["weight_decay"] = self.cfg.algo.weight_decay
            if self.state.sampler is not None and not self.cfg.train.max_staleness:
                # An asynchronous run forced on synchronously: the trainer samples the next batch, so it
                # continues the prompt and token streams of the worker that sampled the last one.
                self.state.load_state_dict({**self.state.state_dict(), **self.state.sampler, "sampler": None})
            if self.is_main:
                _truncate_jsonl(self.metrics_path, self.state.iteration)
                # The final evaluation of a finished run is redone (and its row rewritten) below.
                done = self.state.iteration >= self.cfg.train.iterations
                _truncate_jsonl(self.eval_path, self.state.iteration - 1 if done else self.state.iteration)
                changes = config_changes(read_run_state(ckpt).get("config", {}), self.cfg)
                if changes:
                    _append_jsonl(history, {"iteration": self.state.iteration, "resumed_from": ckpt.name,
                                            "changed": changes, "forced": any(k not in RESUMABLE_KEYS for k in changes)})
        elif self.is_main:
            for p in (self.metrics_path, self.eval_path):
                p.unlink(missing_ok=True)
            history.write_text(json.dumps({"iteration": 0, "config": flat_config(self.cfg)}) + "\n")
        if self.is_main:
            (self.output_dir / "config.yaml").write_text(to_yaml(self.cfg))
        self.accelerator.init_trackers("cory", config=to_flat_dict(self.cfg))

    def checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, self.state, self.learners, self.cfg.train.keep_checkpoints,
                               run_id=self.run_id, config=flat_config(self.cfg), extra=self.save_extra,
                               task=self.task.state_dict() if self.task is not None else None)

    def save_extra(self, path: Path) -> None:
        """Files a kind of run adds to each checkpoint folder before it is marked complete."""

    def run(self, resume: bool | None = None) -> dict:
        """Trains to cfg.train.iterations; returns the summary (also written to summary.json)."""
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
            skipped = sum(learner.last_skipped for learner in self.learners.values())
            # Steps skipped for non-finite gradients are counted here and in metrics.jsonl (skipped_updates).
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_mean']:.3f}", **({"skipped": skipped} if skipped else {}))
            if cfg.train.eval_every and state.iteration % cfg.train.eval_every == 0 and state.iteration < cfg.train.iterations:
                if self.is_main:
                    self.evaluate()
                acc.wait_for_everyone()
            if cfg.train.checkpoint_every and state.iteration % cfg.train.checkpoint_every == 0:
                self.checkpoint()
        bar.close()
        diverged = [name for name, learner in self.learners.items() if learner.skipped_in_a_row]
        if diverged:
            raise RunError(f"every optimizer step of the last iteration had non-finite gradients ({', '.join(diverged)}): the run "
                           "is diverging (learning rate or rewards too large?); final/ was not written, the last checkpoint is kept")
        last = latest_checkpoint(self.output_dir)
        if last is None or last.name != f"iter_{state.iteration:06d}":
            self.checkpoint()
        summary = {}
        if self.is_main:
            final = self.evaluate()
            check_finite(self.learners)
            try:
                self.save_final(final)
            except OSError as e:
                raise RunError(f"cannot write {self.output_dir / 'final'}: {e.strerror or e}; resume to write it again") from None
            rows = [json.loads(line) for line in self.eval_path.read_text().splitlines() if line.strip()]
            summary = {
                "iterations": state.iteration,
                "initial_eval": rows[0] if rows and rows[0]["iteration"] == 0 else None,
                "final_eval": rows[-1],
            }
            (self.output_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        acc.wait_for_everyone()
        self.close()  # before end_training, which tears down torch.distributed that vLLM also uses
        acc.end_training()
        return summary
