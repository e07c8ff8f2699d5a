"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

A run's configuration is one `Config` made of sections. Every field is declared here with a one-line
docstring under it; `cory train --help-config` prints them. Values come from, in order: the defaults
below, a YAML file (`--config FILE`), and `section.key=value` overrides on the command line.
OmegaConf checks keys and types; `ConfigError` turns its complaints into one readable line.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


@dataclass
class ModelConfig:
    name: str = "cory:tiny-reviews"
    """The policy's initial model: a `cory:` zoo name, a local HF folder, or a hub id."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    reference: str = ""
    """The frozen reference model for the KL term; empty means the initial model itself."""
    reference_ensemble: list[str] = field(default_factory=list)
    """K >= 2 models (same tokenizer) whose pointwise-minimum distribution is a pessimistic reference; replaces model.reference."""
    trusted: str = ""
    """The policy that writes a token when the agent asks for help (kl.help_threshold); empty = the first ensemble member."""


@dataclass
class TaskConfig:
    name: str = "sentiment"
    """The task: `sentiment` (continue a review; reward = classifier's positive logit)."""
    prompt_file: str = ""
    """Optional JSONL or CSV file of prompts (column `prompt_column`) replacing the built-in ones."""
    prompt_column: str = "prompt"
    """The column (CSV) or key (JSONL) that holds the prompt text."""
    reward: str = "cory:tiny-sentiment"
    """The reward: a sequence-classifier folder, a `cory:` classifier, `vader` (VADER compound score), or a Python `module:function`."""
    reward_label: str = "positive"
    """For a classifier with several labels, the label whose logit is the reward."""
    reward_on: str = "prompt+response"
    """What text a classifier or `vader` scores: `prompt+response` or `response`."""
    num_train_prompts: int = 2048
    """How many built-in training prompts to draw from (held out from the model's pretraining)."""
    num_eval_prompts: int = 64
    """Size of the fixed evaluation set of prompts."""
    chat_template: bool = False
    """Show each prompt to the model as a user turn of its tokenizer's chat template; responses end at the end-of-turn token."""
    system_prompt: str = ""
    """With chat_template: a system turn before each prompt (empty = none)."""


@dataclass
class EnvConfig:
    id: str = ""
    """A gymnasium text environment (e.g. cory/Bandit-v0): when set, multi-turn episodes in it replace the task."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for gymnasium.make (e.g. {n_arms: 10, sigma: 1.0, cot: false, history: 10})."""
    pool_size: int = 0
    """Training episodes come from a fixed pool of this many environment instances (0 = a fresh one each time)."""
    eval_episodes: int = 16
    """Episodes in each evaluation (instances from a pool disjoint from training's)."""
    max_turns: int = 100
    """Safety cap on an episode's turns."""
    chat_template: bool = False
    """Show each observation to the model as a user turn of its tokenizer's chat template; responses end at the end-of-turn token."""
    system_prompt: str = ""
    """With chat_template: a system turn before each observation (empty = none)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16
    """Most tokens in one response."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for training are taken at this temperature."""
    top_k: int = 0
    """Keep only the k likeliest tokens when sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    stop_strings: list[str] = field(default_factory=list)
    """A response also ends where it first contains one of these strings."""


@dataclass
class AlgoConfig:
    name: str = "reinforce"
    """The RL algorithm, by registered name (`cory train --list-algos`)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_iterations: int = 0
    """Linear learning-rate warm-up, in iterations."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    baseline: str = "mean"
    """REINFORCE baseline: none, mean (batch mean return) or loo (leave-one-out)."""
    gamma: float = 1.0
    """Discount per token (within and across turns); keep 1 for multi-turn agents and use turn_gamma."""
    turn_gamma: float = 1.0
    """Discount per environment step: a turn's return adds turn_gamma x the next turn's."""
    epochs: int = 1
    """Passes over each rollout."""
    minibatch_size: int = 0
    """Samples per optimizer step (0 = the whole rollout in one step)."""
    micro_batch_size: int = 0
    """Samples per forward/backward pass; gradients accumulate up to `minibatch_size` (0 = no accumulation)."""
    group_size: int = 4
    """GRPO/RLOO: responses sampled per prompt (the batch holds train.batch_size prompts x group_size)."""
    lam: float = 0.95
    """GAE lambda (a2c, ppo): 0 = TD(0), 1 = Monte-Carlo."""
    clip_range: float = 0.2
    """PPO/GRPO: the ratio is clipped to [1 - clip_range, 1 + clip_range]."""
    value_clip: float = 0.2
    """PPO: value predictions move at most this far from the rollout's values (0 = off)."""
    vf_coef: float = 0.1
    """Weight of the value loss (a2c, ppo)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    whiten_advantages: bool = True
    """PPO/A2C: normalise advantages over the rollout."""
    normalize_rewards: bool = False
    """PPO: divide task scores by the running std of scores (running moments)."""
    missing_eos_penalty: float = 0.0
    """PPO/GRPO/RLOO: added to the score of responses cut at max_new_tokens without EOS (0 = off; e.g. -1)."""
    scale_rewards: bool = True
    """GRPO: divide group-centred rewards by the group's std."""
    loss_aggregation: str = "token-mean"
    """GRPO: token-mean (every token weighs the same) or seq-mean (mean per sequence, then over sequences)."""


@dataclass
class KLConfig:
    beta: float = 0.05
    """Initial KL coefficient."""
    estimator: str = "k1"
    """Per-token KL estimator: k1, k2, k3, or full (exact over the vocabulary)."""
    controller: str = "fixed"
    """How beta changes: fixed, adaptive (Ziegler et al.) or budget (dual ascent on the episode KL)."""
    penalty: str = "auto"
    """Where KL enters: reward (per-token penalty), loss (beta * mean k3 term), or auto (the algorithm's default)."""
    target: float = 6.0
    """Adaptive controller: the sequence KL to aim for (nats)."""
    horizon: int = 10000
    """Adaptive controller: the horizon in samples."""
    budget: float = 6.0
    """Budget controller: the mean episode KL (nats) to stay at or under."""
    budget_lr: float = 0.01
    """Budget controller: the dual-ascent step size for the multiplier."""
    hard_budget: float = 0.0
    """Hard episode budget B (nats): no episode's exact KL may exceed it; where the agent would overspend, a mixture with the reference is sampled (0 = off)."""
    budget_note: bool = True
    """Hard budget in multi-turn runs: append the budget left to each observation."""
    exact_accounting: bool = True
    """Log each episode's exact KL (full-vocabulary sum over its tokens); costs one extra forward of the policy."""
    help_threshold: float = 0.0
    """Ensemble reference: defer to model.trusted where the missing mass h exceeds this (0 = never ask for help)."""
    help_scope: str = "token"
    """Asking for help defers one token (token) or the rest of the response (turn)."""


@dataclass
class TrainConfig:
    iterations: int = 100
    """Rollout-and-update iterations."""
    batch_size: int = 32
    """Prompts per iteration (per process)."""
    seed: int = 0
    """Seed for model-independent randomness: prompt order, sampling, initialisation of heads."""
    mixed_precision: str = "no"
    """accelerate mixed precision: no, bf16 or fp16."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many iterations (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""
    eval_every: int = 0
    """Evaluate on the fixed prompt set every this many iterations (0 = only before and after)."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers: tensorboard, wandb, ... (empty = metrics.jsonl only)."""
    progress: bool = True
    """Show a progress bar."""
    num_threads: int = 0
    """CPU threads for torch per process (0 = OMP_NUM_THREADS if set, else the cores divided among processes)."""


@dataclass
class EvalConfig:
    temperature: float = 1.0
    """Sampling temperature for evaluation (0 = greedy)."""
    samples_per_prompt: int = 2
    """Responses per evaluation prompt."""
    seed: int = 1234
    """Fixed sampling seed, so that evaluations are comparable across a run."""


@dataclass
class CoryConfig:
    enabled: bool = False
    """Train two agents by CORY (pioneer/observer with role exchange) instead of one."""
    swap_every: int = 5
    """Exchange the pioneer and observer roles every this many iterations (T_REx)."""
    exchange: bool = True
    """Exchange roles at all (False: the ablation without role exchange)."""
    observe: bool = True
    """The observer sees the pioneer's response (False: the ablation where it answers the bare prompt)."""
    partner_coef: float = 1.0
    """c in r(own) + c * r(partner): 1 cooperative, 0 independent, negative competitive."""
    observer_template: str = "auto"
    """The observer's prompt: auto (chat with task.chat_template, else by task), continuation, qa, chat, or a format string with {prompt} and {reference}."""
    shared_base: bool = False
    """Both agents are LoRA adapters on one frozen base, which is also the reference (about one model's memory)."""
    lora_r: int = 16
    """LoRA rank in shared-base mode."""
    lora_alpha: int = 32
    """LoRA alpha in shared-base mode."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names that get LoRA adapters in shared-base mode."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cory: CoryConfig = field(default_factory=CoryConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "task.reward_on": ("prompt+response", "response"),
    "algo.baseline": ("none", "mean", "loo"),
    "kl.estimator": ("k1", "k2", "k3", "full"),
    "kl.controller": ("fixed", "adaptive", "budget"),
    "kl.penalty": ("auto", "reward", "loss"),
    "kl.help_scope": ("token", "turn"),
    "algo.loss_aggregation": ("token-mean", "seq-mean"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
}


def valid_keys(section: str | None = None) -> list[str]:
    """Dotted names of every config key, or of one section's keys."""
    keys = []
    for f in dataclasses.fields(Config):
        if section in (None, f.name):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory())]
    return keys


def field_docs() -> dict[str, str]:
    """`section.key` -> the docstring written under the field, read from this file's source."""
    import inspect

    docs: dict[str, str] = {}
    for f in dataclasses.fields(Config):
        cls = type(f.default_factory())
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[f"{f.name}.{stmt.target.id}"] = str(nxt.value.value)
    return docs


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        sections = [f.name for f in dataclasses.fields(Config)]
        section = key.split(".")[0]
        if section not in sections:
            return f"unknown config section '{section}'; sections: {', '.join(sections)}"
        return f"unknown config key '{key}'; valid keys in '{section}': " + ", ".join(
            k.split(".", 1)[1] for k in valid_keys(section)
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return f"bad value for config key '{key}': {msg}"
    return str(err).splitlines()[0]


def _parse_override(item: str) -> str:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    return item


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides; checked.

    Raises ConfigError with one line naming the problem.
    """
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                loaded = OmegaConf.load(p)
            except Exception as e:  # YAML syntax errors come in many classes
                raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(loaded, type(schema)):
                raise ConfigError(f"config file {p} must hold a mapping of sections")
            layers.append(loaded)
        layers.append(OmegaConf.from_dotlist([_parse_override(o) for o in overrides]))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Value checks that types alone do not express."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"bad value for config key '{key}': {value!r}; choose one of: {', '.join(allowed)}")
    from cory.algorithms import ALGORITHMS

    if cfg.algo.name not in ALGORITHMS:
        raise ConfigError(f"bad value for config key 'algo.name': {cfg.algo.name!r}; choose one of: {', '.join(sorted(ALGORITHMS))}")
    positive = ["train.iterations", "train.batch_size", "generation.max_new_tokens", "algo.epochs", "task.num_eval_prompts"]
    for key in positive:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"bad value for config key '{key}': must be at least 1")
    if cfg.cory.swap_every < 1:
        raise ConfigError("bad value for config key 'cory.swap_every': must be at least 1")
    if cfg.generation.temperature < 0:
        raise ConfigError("bad value for config key 'generation.temperature': must be >= 0")
    if not 0 < cfg.generation.top_p <= 1:
        raise ConfigError("bad value for config key 'generation.top_p': must be in (0, 1]")
    if cfg.algo.minibatch_size and cfg.algo.micro_batch_size and cfg.algo.minibatch_size % cfg.algo.micro_batch_size:
        raise ConfigError("algo.minibatch_size must be a multiple of algo.micro_batch_size")
    if cfg.kl.hard_budget < 0:
        raise ConfigError("bad value for config key 'kl.hard_budget': must be >= 0 (0 = off)")
    if not 0 <= cfg.kl.help_threshold < 1:
        raise ConfigError("bad value for config key 'kl.help_threshold': must be in [0, 1) (0 = off)")
    if cfg.model.reference_ensemble and len(cfg.model.reference_ensemble) < 2:
        raise ConfigError("model.reference_ensemble needs at least 2 models")
    if cfg.model.reference_ensemble and cfg.model.reference:
        raise ConfigError("set model.reference or model.reference_ensemble, not both")
    if cfg.kl.help_threshold and not cfg.model.reference_ensemble:
        raise ConfigError("kl.help_threshold needs a pessimistic reference: set model.reference_ensemble")
    if cfg.kl.help_threshold and cfg.kl.hard_budget:
        raise ConfigError("kl.hard_budget and kl.help_threshold cannot be combined yet; pick one")
    for section in ("task", "env"):
        if getattr(cfg, section).system_prompt and not getattr(cfg, section).chat_template:
            raise ConfigError(f"{section}.system_prompt needs {section}.chat_template=true")
    if cfg.task.prompt_file and not Path(cfg.task.prompt_file).is_file():
        raise ConfigError(f"prompt file not found: {cfg.task.prompt_file}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """`section.key` -> value, for trackers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    for section, values in dataclasses.asdict(cfg).items():
        for k, v in values.items():
            if isinstance(v, list):
                v = ",".join(map(str, v))
            elif isinstance(v, dict):
                v = json.dumps(v, sort_keys=True)
            out[f"{section}.{k}"] = v
    return out
