"""`cory train`: build a run from a Config, then iterate rollout -> learner step, with logging,
evaluation, checkpoints that resume exactly, and the final model as an HF folder.

Run directory (owned by one run: a fresh run refuses a directory that holds another, unless --overwrite):
    run.json             the run id; every checkpoint carries it
    config.yaml          the resolved configuration (the latest one, after allowed changes on --resume)
    config_history.jsonl the first configuration, then every change made on --resume (iteration, old, new)
    metrics.jsonl        one object per iteration (iteration, reward_mean, kl_mean, ...)
    eval.jsonl           evaluations on the fixed prompt set (iteration 0 = the initial model)
    cory/                TensorBoard event files (accelerate trackers)
    checkpoints/iter_N/  accelerate state (safetensors weights, optimizer) + run_state_rank{r}.json
                         (run id, iteration, RNG states, learner states, config) + DONE once complete;
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
import sys
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

from cory.config import Config, ConfigError, to_flat_dict, to_yaml

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
HISTORY_FILE = "config_history.jsonl"
RUN_ENTRIES = (RUN_FILE, "config.yaml", HISTORY_FILE, "metrics.jsonl", "eval.jsonl", "summary.json", CHECKPOINTS,
               "final", "agents", "cory", "plots")
"""What a run writes in its directory: any of these means the directory holds a run."""
RESUMABLE_KEYS = ("train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
                  "train.log_with", "train.progress", "train.num_threads")
"""Config keys that --resume may change (recorded in config_history.jsonl); others need --force."""


class UsageError(ValueError):
    """Bad input found before any work starts; its message is one line."""


class RunError(RuntimeError):
    """A run that cannot go on (non-finite weights, a full disk); its message is one line."""


# -- pre-flight checks ------------------------------------------------------------------------
CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_model_folder(path: str | Path, kind: str = "causal-lm", label: str | None = None) -> dict:
    """A local HF folder that `from_pretrained` can load as `kind` (causal-lm or classifier): a
    readable config.json of that architecture, complete safetensors weights, and for a classifier
    the reward label. Returns the parsed config. Reads headers only; loads no weights."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    role = "policy" if kind == "causal-lm" else "reward"
    if not (path / "config.json").is_file():
        raise UsageError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
    try:
        conf = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(conf, dict):
            raise ValueError("not a JSON object")
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (bad JSON, unknown model_type, wrong field types)
        raise UsageError(f"model folder {path}: config.json cannot be read ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise UsageError(f"model folder {path} holds no weights (*.safetensors)")
    for w in weights:
        try:
            with safe_open(str(w), "pt") as fh:
                fh.keys()
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"model folder {path}: {w.name} is damaged or truncated ({str(e).splitlines()[0][:100]})") from None
    archs = conf.get("architectures") or []
    if kind == "causal-lm" and archs and not any(a.endswith(CAUSAL_LM_HEADS) for a in archs):
        raise UsageError(f"model {path} is a {archs[0]}, not a causal language model: it cannot be the {role}")
    if kind == "classifier":
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise UsageError(f"model {path} is a {archs[0]}, not a sequence classifier: it cannot be the reward")
        labels = [str(v) for _, v in sorted((conf.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
        if label is not None and len(labels) > 1 and label.lower() not in [x.lower() for x in labels]:
            raise UsageError(f"reward label '{label}' is not one of {path}'s labels: {', '.join(labels)} (task.reward_label)")
    return conf


def built_zoo_path(name: str) -> Path | None:
    """The folder of a zoo model already built (checks must never start a build), else None."""
    from cory import zoo

    for m in zoo.list_models():
        if m["name"] == name and m["built"]:
            return Path(m["path"])
    return None


def check_model_name(name: str, kind: str = "causal-lm", label: str | None = None) -> None:
    """A zoo name must be registered (and of `kind`); a folder must be loadable as `kind`; anything
    else must be a reachable hub id."""
    from cory import zoo

    if zoo.is_zoo_name(name):
        try:
            entry = zoo.registry.entry(name)
        except zoo.registry.UnknownModelError:
            known = [m["name"] for m in zoo.list_models()]
            raise UsageError(f"unknown model '{name}'; the zoo has: {', '.join(known)} (NAME@seedN: NAME from seed N)") from None
        if entry.recipe.kind != kind:
            raise UsageError(f"model '{name}' is a {entry.recipe.kind}, not a {kind}: it cannot be the {'policy' if kind == 'causal-lm' else 'reward'}")
        built = built_zoo_path(name)
        if label is not None and built is not None:  # an unbuilt one is checked when it loads (never built here)
            check_model_folder(built, kind, label)
        return
    if Path(name).expanduser().is_dir():
        check_model_folder(name, kind, label)
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise UsageError(f"model folder not found: {name}")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"model '{name}' is not a cory: zoo name, a local folder, or a hub id that can be loaded ({reason[:120]})") from None


def check_env(env_id: str, kwargs: dict) -> None:
    """env.id must be a cory text environment, and env.kwargs must construct it."""
    import gymnasium

    import cory.envs  # noqa: F401  (registers the cory/* ids)

    ids = sorted(k for k in gymnasium.registry if k.startswith("cory/"))
    if env_id not in ids:
        raise ConfigError(f"bad value for config key 'env.id': {env_id!r}; cory environments: {', '.join(ids)}")
    try:
        env = gymnasium.make(env_id, disable_env_checker=True, **kwargs)
    except Exception as e:  # noqa: BLE001  (unknown keyword, wrong value: the environment's own message)
        raise UsageError(f"bad env.kwargs for {env_id}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    env.close()


def dry_prompts(cfg: Config) -> list[str]:
    """Two training prompts, read the way the run will read them (a prompt file is fully checked)."""
    from cory.tasks.base import load_prompt_file

    if cfg.task.prompt_file:
        return load_prompt_file(cfg.task.prompt_file, cfg.task.prompt_column)[:2]
    if cfg.task.name == "prompts":
        raise UsageError("task 'prompts' needs task.prompt_file")
    from cory.zoo.corpora import reviews

    return reviews.prompts(2, seed=2024)


def check_prompt_lengths(cfg: Config, prompts: list[str]) -> None:
    """Every prompt plus max_new_tokens fits the policy's context and, when a classifier scores
    prompt+response, the classifier's window (else it would cut off the response it must score)."""
    from transformers import AutoTokenizer

    from cory import zoo
    from cory.rewards import BUILTIN_REWARDS, CLASSIFIER_MAX_TOKENS, is_function_spec

    def window(name: str, limit: int | None = None) -> tuple[object, int] | None:
        path = built_zoo_path(name) if zoo.is_zoo_name(name) else name
        if path is None or not Path(path).is_dir():
            return None  # a hub id or an unbuilt zoo model: checked when it loads
        conf = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        n = conf.get("max_position_embeddings") or conf.get("n_positions") or 10**9
        return AutoTokenizer.from_pretrained(path), min(n, limit or n)

    new = cfg.generation.max_new_tokens
    checks = [("the policy's context", window(cfg.model.name))]
    if (cfg.task.reward_on == "prompt+response" and not cfg.env.id and not is_function_spec(cfg.task.reward)
            and cfg.task.reward not in BUILTIN_REWARDS):
        checks.append(("the reward classifier's window", window(cfg.task.reward, CLASSIFIER_MAX_TOKENS)))
    for what, found in checks:
        if found is None:
            continue
        tokenizer, limit = found
        for n, prompt in enumerate(prompts, 1):
            length = len(tokenizer(prompt).input_ids)
            if length + new > limit:
                raise UsageError(f"prompt {n} of {cfg.task.prompt_file or 'the task'} is {length} tokens; with "
                                 f"generation.max_new_tokens={new} it does not fit {what} ({limit} tokens)")


def preflight(cfg: Config) -> None:
    """Everything that can be checked before a run starts, without loading weights: models, the
    environment, prompt files and a dry call of a reward function; raises UsageError/ConfigError
    (or the reward's and prompt file's own one-line errors)."""
    from cory.rewards import BUILTIN_REWARDS, RewardError, dry_run, is_function_spec, validate_spec
    from cory.tasks import BUILTIN_REWARD, TASKS, load_prompt_file

    if cfg.env.id:
        check_env(cfg.env.id, dict(cfg.env.kwargs))
    if cfg.task.name not in TASKS:
        raise ConfigError(f"bad value for config key 'task.name': {cfg.task.name!r}; choose one of: {', '.join(sorted(TASKS))}")
    check_model_name(cfg.model.name)
    if cfg.model.lora.quantize != "none":
        from cory.lora import check_quantize

        check_quantize(cfg.model.lora.quantize)
    if cfg.generation.backend == "vllm":
        from cory.generation import check_backend
        from cory.generation.vllm_engine import EngineError

        try:
            check_backend(cfg)
        except EngineError as e:
            raise UsageError(str(e)) from None
    for name in [cfg.model.reference, cfg.model.trusted, *cfg.model.reference_ensemble]:
        if name:
            check_model_name(name)
    if cfg.env.id:
        return
    prompts = dry_prompts(cfg)
    if cfg.task.name not in BUILTIN_REWARD:
        spec = cfg.task.reward
        try:
            validate_spec(spec)
        except (RewardError, ValueError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        if is_function_spec(spec):
            dry_run(spec, prompts, cfg.task.reward_timeout)
        elif spec not in BUILTIN_REWARDS:  # built-in rewards (vader) need no model
            check_model_name(spec, "classifier", cfg.task.reward_label)
    if cfg.task.prompt_file:
        check_prompt_lengths(cfg, load_prompt_file(cfg.task.prompt_file, cfg.task.prompt_column))


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
            raise UsageError(f"--resume: no checkpoint in {p / CHECKPOINTS}")
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

    @classmethod
    def fresh(cls, seed: int, rank: int) -> "RunState":
        return cls(0, np.random.default_rng([seed, rank]), torch.Generator().manual_seed(seed * 1_000_003 + rank))

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "rng": self.rng.bit_generator.state,
                "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


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


def check_finite(learners: dict) -> None:
    """Raises RunError unless every trained weight is finite: nothing non-finite is ever written."""
    for name, learner in learners.items():
        for pname, p in learner.module.named_parameters():
            if p.requires_grad and not torch.isfinite(p.detach()).all():
                raise RunError(f"weights of '{name}' became non-finite ({pname}); nothing was saved from them "
                               "(learning rate or rewards too large?)")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: RunState, learners: dict, keep: int,
                    run_id: str = "", config: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """accelerate state (weights, optimizers) + per-rank JSON run state (+ whatever `extra(path)`
    writes, e.g. FSDP shards, on every process); DONE marks it complete.

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
        (path / f"run_state_rank{accelerator.process_index}.json").write_text(json.dumps(saved, default=_json_default))
    except OSError as e:
        shutil.rmtree(path, ignore_errors=True)
        raise RunError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous complete checkpoint is kept") from None
    finally:
        quiet.removeFilter(_drop_shared_tensor_warning)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            (path / "DONE").write_text(str(state.iteration))
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            raise RunError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous complete checkpoint is kept") from None
        done = checkpoints(output_dir, run_id)
        for old in done[: max(0, len(done) - max(keep, 1))]:
            (old / "DONE").unlink(missing_ok=True)  # first, so that a kill mid-removal leaves no "complete" husk
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, state: RunState, learners: dict) -> None:
    """Loads a checkpoint: accelerate reads tensors with weights_only=True, the run state is JSON."""
    saved = read_run_state(path, accelerator.process_index)
    accelerator.load_state(str(path))
    state.load_state_dict(saved)
    for name, learner in learners.items():
        learner.load_state_dict(saved["learners"][name])


def warn(message: str) -> None:
    print(f"cory: warning: {message}", file=sys.stderr)


def load_latest(accelerator: Accelerator, output_dir: Path, run_id: str, state: RunState, learners: dict) -> Path:
    """Loads the newest checkpoint of this run that loads; ones that fail are skipped with a warning
    (and set aside as iter_N.unloadable, so rotation never keeps them instead of good ones)."""
    candidates = checkpoints(output_dir, run_id)[::-1]
    failed = []
    for path in candidates:
        try:
            load_checkpoint(accelerator, path, state, learners)
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
                          chat_examples=_chat_examples(cfg), shared_prefix=g.shared_prefix)


def _chat_examples(cfg: Config) -> tuple:
    """The environment's example chat turns, or a built-in task's (the arithmetic one-shot) when its
    prompts are chat."""
    if cfg.env.id:
        return tuple(tuple(e) for e in cfg.env.chat_examples)
    if not cfg.task.chat_template:
        return ()
    from cory.tasks.registry import CHAT_EXAMPLES

    return CHAT_EXAMPLES.get(cfg.task.name, ())


def eval_params(cfg: Config):
    from dataclasses import replace

    return replace(sampling_params(cfg), temperature=cfg.eval.temperature)


def make_backend(cfg: Config, accelerator: Accelerator, policies: dict) -> dict:
    """Rollout backends by name for `policies` (name -> (Policy, LoRA adapter name or None)).
    vLLM: one engine in this process serves them all (full copies take turns holding it; adapters
    of one shared base are LoRA requests). The run closes it."""
    from cory.generation import NativeBackend, make_engine
    from cory.generation.vllm_engine import EngineError, VLLMBackend

    if cfg.generation.backend == "native":
        return {name: NativeBackend(policy) for name, (policy, _) in policies.items()}
    if accelerator.num_processes > 1:
        raise UsageError("generation.backend=vllm runs the engine in one training process; use generation.backend=native with several")
    adapters = any(adapter for _, adapter in policies.values())
    try:
        engine = make_engine(cfg, cfg.model.name, lora_rank=cfg.cory.lora_r if adapters else 0)
    except EngineError as e:
        raise UsageError(str(e)) from None
    return {name: VLLMBackend(engine, policy, adapter) for name, (policy, adapter) in policies.items()}


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

    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.resume, self.overwrite = resume, overwrite
        self.run_id = ""
        # Nothing is written before _start: a run that fails while building leaves no trace.
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

    backend = None
    """The rollout engine when it holds resources (vLLM); released by `close`."""

    def close(self) -> None:
        """Release the rollout engine (its weights and KV cache)."""
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
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / RUN_FILE).write_text(json.dumps({"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        acc.wait_for_everyone()
        self.run_id = read_run_id(self.output_dir) or ""

    def _start(self, resume: bool | None = None) -> None:
        if resume is not None:
            self.resume = resume
        self._claim()
        history = self.output_dir / HISTORY_FILE
        if self.resume:
            ckpt = self.resumed_from = load_latest(self.accelerator, self.output_dir, self.run_id, self.state, self.learners)
            for learner in self.learners.values():  # a forced change of weight decay takes effect (lr is set each step)
                for group in learner.optimizer.param_groups:
                    group["weight_decay"] = self.cfg.algo.weight_decay
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
                               run_id=self.run_id, config=flat_config(self.cfg), extra=self.save_extra)

    def save_extra(self, path: Path) -> None:
        """Files a kind of run adds to each checkpoint folder before it is marked complete."""

    def run(self, resume: bool | None = None) -> dict:
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
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        self.close()  # before end_training, which tears down torch.distributed that vLLM also uses
        acc.end_training()
        return summary


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
                                seed=cfg.eval.seed, reference=self.learner.reference, max_turns=cfg.env.max_turns)
        return evaluate(self.policy, self.task.eval_prompts, self.task.reward, eval_params(cfg),
                        cfg.eval.samples_per_prompt, cfg.eval.seed, reference=self.learner.reference)

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


def train(cfg: Config, output_dir: str | Path, resume: bool = False, overwrite: bool = False, force: bool = False) -> dict:
    """Builds the run the config asks for (single agent, or CORY when cory.enabled) and runs it.

    A fresh run refuses a directory holding another run unless `overwrite`; `resume` refuses a
    changed config (outside RESUMABLE_KEYS) unless `force`.
    """
    check_output_dir(output_dir, resume, overwrite)
    if resume:
        check_resume_config(cfg, output_dir, force)
    options = {"resume": resume, "overwrite": overwrite}
    if getattr(cfg, "cory", None) is not None and cfg.cory.enabled:
        from cory.coevolve import CoryRun

        run = CoryRun(cfg, output_dir, **options)
    else:
        run = TrainingRun(cfg, output_dir, **options)
    try:
        return run.run()
    finally:
        run.close()
