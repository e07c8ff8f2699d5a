"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

A run's configuration is one `Config` made of sections. Every field is declared here with a one-line
docstring under it; `cory config [SECTION]` prints them with their defaults, and `cory algos` lists
each algorithm's own `algo.*` keys. Values come from, in order: the defaults below, the chosen
algorithm's defaults, a YAML file (`--config FILE`), and `section.key=value` overrides on the
command line. OmegaConf checks keys and types; its complaints, and every value check here, become a
one-line `UsageError`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from cory.errors import UsageError


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank for the single-agent policy (0 = off: every weight trains). With LoRA the frozen base, adapters disabled, is the reference."""
    alpha: int = 32
    """LoRA alpha (the adapter's output is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (0 keeps the recomputed log-probs equal to the sampled ones)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names that get adapters."""
    quantize: str = "none"
    """QLoRA: `4bit` loads the frozen base in 4-bit NF4 through bitsandbytes (CUDA only); `none` keeps model.dtype."""


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
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Single-agent LoRA / QLoRA: model.lora.r, alpha, dropout, targets, quantize."""


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
    reward_timeout: float = 300.0
    """Seconds a Python reward function may take for one batch before the run stops with an error."""
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
    chat_examples: list[list[str]] = field(default_factory=list)
    """With chat_template: example [user, assistant] turns before each observation (e.g. a one-shot answer in the ACTION=X format)."""


@dataclass
class GenerationConfig:
    """How rollouts are sampled. The sampling keys (`SAMPLING_KEYS`) are what `cory.policy.SamplingParams`
    carries to generation, with these defaults and `sampling_problem` as their one check."""

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
    shared_prefix: bool = False
    """native: run the prompt prefix shared by a batch (instructions, system and example turns) once and reuse its KV cache (float rounding aside, the same samples)."""
    backend: str = "native"
    """Who samples rollouts: native (cory's own KV-cache loop, the reference) or vllm (vLLM's engine in this process, weights synced in memory)."""
    vllm_dtype: str = "auto"
    """vllm: engine dtype: auto (model.dtype; float32 on CPU for head sizes under 64, see docs) or float32, bfloat16, float16."""
    vllm_kv_cache_gib: float = 0.25
    """vllm: KV-cache memory budget in GiB (0 = vLLM's default sizing, gpu_memory_utilization on GPU)."""
    vllm_gpu_memory_utilization: float = 0.3
    """vllm on GPU with vllm_kv_cache_gib=0: the share of GPU memory the engine may take."""
    vllm_sleep: bool = True
    """vllm on GPU: the engine sleeps (weights offloaded, KV cache freed) while the trainer trains."""


SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "stop_strings")
"""The generation keys that shape the sampled distribution (the rest choose and size the engine)."""


def sampling_problem(max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop_strings) -> tuple[str, Any, str] | None:
    """(key, value, rule) of the first sampling setting out of range, or None: the one check of the
    sampling keys, for `generation.*` in a config and for every `SamplingParams`. (A config's
    generation.temperature must also be > 0: training takes log-probs at it; evaluation may be greedy.)"""
    for key, value, ok, rule in (
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "must be at least 1"),
        ("temperature", temperature, temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("top_k", top_k, top_k >= 0, "must be >= 0 (0 = off)"),
        ("top_p", top_p, 0 < top_p <= 1, "must be in (0, 1] (1 = off)"),
        ("stop_strings", list(stop_strings), "" not in stop_strings, "must not contain the empty string"),
    ):
        if not ok:
            return key, value, rule
    return None


@dataclass
class AlgoConfig:
    name: str = "reinforce"
    """The RL algorithm, by registered name: reinforce, a2c, ppo, rloo, grpo, dr_grpo, dapo, gspo, cispo."""
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
    """GRPO family, RLOO, REINFORCE with baseline=loo: responses sampled per prompt (the batch holds train.batch_size prompts x group_size)."""
    lam: float = 0.95
    """GAE lambda (a2c, ppo): 0 = TD(0), 1 = Monte-Carlo."""
    clip_range: float = 0.2
    """PPO/RLOO/GRPO family: the ratio is clipped to [1 - clip_range, 1 + clip_range_high]."""
    value_clip: float = 0.2
    """PPO: value predictions move at most this far from the rollout's values (0 = off)."""
    vf_coef: float = 0.1
    """Weight of the value loss (a2c, ppo)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    whiten_advantages: bool = True
    """PPO/A2C: normalise advantages over the rollout."""
    normalize_rewards: bool = False
    """Divide task scores by the running std of scores (running moments), for every algorithm."""
    missing_eos_penalty: float = 0.0
    """Added to the score of responses cut at max_new_tokens without EOS, for every algorithm (0 = off; e.g. -1)."""
    scale_rewards: bool = True
    """GRPO family: divide group-centred rewards by the group's std (dr_grpo: off)."""
    loss_aggregation: str = "token-mean"
    """How the whole per-token objective becomes a scalar: token-mean (every token of the minibatch weighs the same), seq-mean (mean per sequence, then over sequences) or constant (sum / (loss_constant x sequences), Dr.GRPO)."""
    # -- issue 10: loss variants, shaping and engine mismatch ------------------------------------
    clip_range_high: float = 0.0
    """Upper clip: the ratio stays under 1 + clip_range_high (0 = clip_range; DAPO decouples it, 0.28)."""
    dual_clip: float = 0.0
    """PPO-style losses: cap a negative-advantage token's loss at -A x dual_clip (> 1; 0 = off)."""
    loss_constant: int = 0
    """loss_aggregation=constant: the normaliser per sequence (0 = generation.max_new_tokens)."""
    dynamic_sampling: bool = False
    """Group algorithms: drop groups whose scores are all equal (zero advantage) from the loss and its normaliser (DAPO)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: responses longer than max_new_tokens - overlong_buffer lose up to overlong_penalty, linearly (0 = off)."""
    overlong_penalty: float = 1.0
    """The overlong penalty at max_new_tokens (with overlong_buffer > 0)."""
    overlong_filter: bool = False
    """Leave responses cut at max_new_tokens without EOS out of the loss (DAPO's overlong filtering)."""
    tis_cap: float = 2.0
    """Rollouts from another engine (generation.backend=vllm) or precision (train.mixed_precision over float32 weights): weight tokens by min(pi_train_old / pi_engine, tis_cap) (0 = no weighting)."""


@dataclass
class KLConfig:
    beta: float = 0.05
    """Initial KL coefficient."""
    estimator: str = "k1"
    """Per-token KL estimator, for the reward penalty and the loss term alike: k1, k2, k3, or full (exact over the vocabulary; reward only)."""
    controller: str = "fixed"
    """How beta changes: fixed, adaptive (Ziegler et al.) or budget (dual ascent on the episode KL)."""
    penalty: str = "auto"
    """Where KL enters: reward (per-token penalty), loss (beta x the kl.estimator term, aggregated like the policy loss), or auto (the algorithm's default)."""
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
    """accelerate mixed precision: no, bf16 or fp16. Over float32 weights the trainer recomputes the sampled tokens' log-probs under autocast (algo.tis_cap); on a CPU without bf16 kernels bf16 is slower than no (a warning says so)."""
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
    fsdp: bool = False
    """Shard the policy's weights, gradients and optimizer state over the processes with torch FSDP2 (CPU/gloo or GPUs; see cory.sharding)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of storing them (less memory, ~1/3 more compute)."""
    shared_prefix: bool = False
    """Score, update and evaluate the KL with the prompt prefix a batch's rows share (a chat template's system and example turns; at least 16 tokens) run once and its keys and values repeated for every row, gradients included: the same log-probs and gradients up to float rounding, (B - 1) x prefix tokens less forward and backward. One process; not with train.gradient_checkpointing."""


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
    "algo.loss_aggregation": ("token-mean", "seq-mean", "constant"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "model.lora.quantize": ("none", "4bit"),
    "generation.backend": ("native", "vllm"),
    "generation.vllm_dtype": ("auto", "float32", "bfloat16", "float16"),
}


def valid_keys(section: str | None = None) -> list[str]:
    """Dotted names of every config key, or of one section's keys."""
    keys = []
    for f in dataclasses.fields(Config):
        if section in (None, f.name):
            keys += _dotted(f.name, f.default_factory())
    return keys


def _dotted(prefix: str, obj) -> list[str]:
    """Dotted names of a dataclass's fields, descending into nested dataclasses (model.lora.r)."""
    out = []
    for g in dataclasses.fields(obj):
        value = getattr(obj, g.name)
        out += _dotted(f"{prefix}.{g.name}", value) if dataclasses.is_dataclass(value) else [f"{prefix}.{g.name}"]
    return out


def field_docs() -> dict[str, str]:
    """`section.key` -> the docstring written under the field, read from this file's source."""
    import inspect

    docs: dict[str, str] = {}
    todo = [(f.name, f.default_factory()) for f in dataclasses.fields(Config)]
    while todo:
        prefix, obj = todo.pop()
        tree = ast.parse(inspect.getsource(type(obj)))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[f"{prefix}.{stmt.target.id}"] = str(nxt.value.value)
                if dataclasses.is_dataclass(getattr(obj, stmt.target.id)):
                    todo.append((f"{prefix}.{stmt.target.id}", getattr(obj, stmt.target.id)))
    return docs


def describe(section: str | None = None) -> list[tuple[str, Any, str]]:
    """(dotted key, default, docstring) of every config key, or of those under `section` (`algo`,
    `model.lora`); UsageError for a section that does not exist. Defaults are the schema's, before an
    algorithm's own (`cory algos` shows those)."""
    keys = valid_keys()
    if section is not None:
        keys = [k for k in keys if k.startswith(section + ".")]
        if not keys:
            sections = sorted({k.rsplit(".", 1)[0] for k in valid_keys()})
            raise UsageError(f"unknown config section '{section}'; sections: {', '.join(sections)}")
    docs, defaults = field_docs(), Config()
    rows = []
    for key in keys:
        value = defaults
        for name in key.split("."):
            value = getattr(value, name)
        rows.append((key, value, docs.get(key, "")))
    return rows


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
        raise UsageError(f"override '{item}' is not of the form section.key=value")
    return item


def _unbool(layer):
    """YAML reads no/yes/on/off as booleans: for a text key whose choices hold that word (e.g.
    train.mixed_precision=no) the word is meant; for other text keys it is refused in one line."""
    data = OmegaConf.to_container(layer)
    if not isinstance(data, dict):
        return layer
    text_keys = {f"{f.name}.{g.name}" for f in dataclasses.fields(Config) for g in dataclasses.fields(f.default_factory())
                 if g.type in ("str", str)}
    for section, values in data.items():
        for name, value in (values.items() if isinstance(values, dict) else []):
            key = f"{section}.{name}"
            if key in text_keys and isinstance(value, bool):
                words = ("yes", "on", "true") if value else ("no", "off", "false")
                meant = [w for w in CHOICES.get(key, ()) if w in words]
                if not meant:
                    choices = f"; choose one of: {', '.join(CHOICES[key])}" if key in CHOICES else "; quote it to mean the text"
                    raise UsageError(f"bad value for config key '{key}': YAML reads it as the boolean {value}{choices}")
                values[name] = meant[0]
    return OmegaConf.create(data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides; checked.

    Raises UsageError with one line naming the problem.
    """
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path:
            p = Path(path)
            if not p.is_file():
                raise UsageError(f"config file not found: {p}")
            try:
                loaded = OmegaConf.load(p)
            except Exception as e:  # YAML syntax errors come in many classes
                raise UsageError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(loaded, type(schema)):
                raise UsageError(f"config file {p} must hold a mapping of sections")
            layers.append(_unbool(loaded))
        layers.append(_unbool(OmegaConf.from_dotlist([_parse_override(o) for o in overrides])))
        merged = OmegaConf.merge(*layers)
        defaults = algorithm_defaults(str(merged.algo.name))
        if defaults:  # the algorithm's defaults sit between the schema's and the user's settings
            merged = OmegaConf.merge(layers[0], OmegaConf.create(defaults), *layers[1:])
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UsageError(_describe(e)) from None
    check(cfg)
    return cfg


def algorithm_defaults(name: str) -> dict[str, dict[str, Any]]:
    """{section: {key: value}}: the config defaults the named algorithm declares (empty if unknown)."""
    from cory.algorithms import ALGORITHMS

    out: dict[str, dict[str, Any]] = {}
    for key, value in (ALGORITHMS[name].defaults if name in ALGORITHMS else {}).items():
        section, k = key.split(".")
        out.setdefault(section, {})[k] = value
    return out


def algorithm_keys() -> dict[str, set[str]]:
    """Algorithm name -> the algorithm-specific `algo.*` keys (without the section) it reads: its
    estimator's and losses' keys. `_check_algorithm_keys` refuses the others and `cory algos` prints
    these, so the two cannot disagree. Keys no algorithm claims act for every one."""
    from cory.algorithms import ALGORITHMS

    return {name: algorithm.keys() for name, algorithm in sorted(ALGORITHMS.items())}


def _check_algorithm_keys(cfg: Config) -> None:
    """A key with no effect for the chosen algorithm is refused with one line (issue 10)."""
    from cory.algorithms import ALGORITHMS

    algo = ALGORITHMS[cfg.algo.name]
    default = AlgoConfig(**algorithm_defaults(cfg.algo.name).get("algo", {}))
    used = algorithm_keys()
    users: dict[str, list[str]] = {}
    for name, keys in used.items():
        for key in keys:
            users.setdefault(key, []).append(name)
    for key in sorted(set(users) - used[cfg.algo.name]):
        if getattr(cfg.algo, key) != getattr(default, key):
            raise UsageError(f"algo.{key} has no effect for algo.name={cfg.algo.name}; it is used by: {', '.join(users[key])}")
    a = cfg.algo
    if algo.estimator == "returns" and a.group_size != default.group_size and a.baseline != "loo":
        raise UsageError(f"algo.group_size has no effect for {cfg.algo.name} unless algo.baseline=loo")
    if (algo.grouped or a.baseline == "loo" and algo.estimator == "returns") and a.group_size < 2:
        raise UsageError(f"algo.group_size must be at least 2 for {cfg.algo.name}" + (" with algo.baseline=loo" if not algo.grouped else ""))
    if a.loss_constant and a.loss_aggregation != "constant":
        raise UsageError("algo.loss_constant has no effect unless algo.loss_aggregation=constant")
    if a.loss_constant < 0 or a.overlong_buffer < 0 or a.tis_cap < 0 or a.clip_range_high < 0:
        raise UsageError("algo.loss_constant, overlong_buffer, tis_cap and clip_range_high must be >= 0")
    if 0 < a.tis_cap < 1:
        raise UsageError("bad value for config key 'algo.tis_cap': must be >= 1 (0 = off), so that agreeing engines get weight 1")
    if a.dual_clip and a.dual_clip <= 1:
        raise UsageError("bad value for config key 'algo.dual_clip': must be > 1 (0 = off)")
    if a.overlong_buffer > cfg.generation.max_new_tokens:
        raise UsageError("algo.overlong_buffer must be at most generation.max_new_tokens")
    kl_in_reward = algo.kl_in_reward if cfg.kl.penalty == "auto" else cfg.kl.penalty == "reward"
    if cfg.kl.estimator == "full" and not kl_in_reward:
        raise UsageError(f"kl.estimator=full works only with KL in the reward (kl.penalty=reward) for {cfg.algo.name}")


def check(cfg: Config) -> None:
    """Value checks that types alone do not express."""
    for key, allowed in CHOICES.items():
        value = cfg
        for name in key.split("."):
            value = getattr(value, name)
        if value not in allowed:
            raise UsageError(f"bad value for config key '{key}': {value!r}; choose one of: {', '.join(allowed)}")
    from cory.algorithms import ALGORITHMS

    if cfg.algo.name not in ALGORITHMS:
        raise UsageError(f"bad value for config key 'algo.name': {cfg.algo.name!r}; choose one of: {', '.join(sorted(ALGORITHMS))}")
    _check_algorithm_keys(cfg)
    problem = sampling_problem(*(getattr(cfg.generation, k) for k in SAMPLING_KEYS))
    if problem:
        key, value, rule = problem
        raise UsageError(f"bad value for config key 'generation.{key}': {value!r}; {rule}")
    positive = ["train.iterations", "train.batch_size", "algo.epochs", "task.num_eval_prompts"]
    for key in positive:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise UsageError(f"bad value for config key '{key}': must be at least 1")
    if cfg.cory.swap_every < 1:
        raise UsageError("bad value for config key 'cory.swap_every': must be at least 1")
    if cfg.algo.minibatch_size and cfg.algo.micro_batch_size and cfg.algo.minibatch_size % cfg.algo.micro_batch_size:
        raise UsageError("algo.minibatch_size must be a multiple of algo.micro_batch_size")
    if cfg.kl.hard_budget < 0:
        raise UsageError("bad value for config key 'kl.hard_budget': must be >= 0 (0 = off)")
    if not 0 <= cfg.kl.help_threshold < 1:
        raise UsageError("bad value for config key 'kl.help_threshold': must be in [0, 1) (0 = off)")
    if cfg.model.reference_ensemble and len(cfg.model.reference_ensemble) < 2:
        raise UsageError("model.reference_ensemble needs at least 2 models")
    if cfg.model.reference_ensemble and cfg.model.reference:
        raise UsageError("set model.reference or model.reference_ensemble, not both")
    if cfg.kl.help_threshold and not cfg.model.reference_ensemble:
        raise UsageError("kl.help_threshold needs a pessimistic reference: set model.reference_ensemble")
    if cfg.kl.help_threshold and cfg.kl.hard_budget:
        raise UsageError("kl.hard_budget and kl.help_threshold cannot be combined yet; pick one")
    lora = cfg.model.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1 or (lora.r and not lora.targets):
        raise UsageError("bad model.lora: r must be >= 0 (0 = off), alpha > 0, dropout in [0, 1), targets not empty")
    if lora.quantize != "none" and not lora.r:
        raise UsageError(f"model.lora.quantize={lora.quantize} quantizes the frozen base of a LoRA run: set model.lora.r too")
    if lora.r and cfg.cory.enabled:
        raise UsageError("model.lora.* is for single-agent runs; CORY's LoRA mode is cory.shared_base=true with cory.lora_r/lora_alpha/lora_targets")
    if lora.r and (cfg.model.reference or cfg.model.reference_ensemble):
        raise UsageError("with model.lora.r the reference is the frozen base (adapters disabled); leave model.reference and model.reference_ensemble empty")
    if cfg.train.fsdp and (cfg.cory.enabled or lora.r or cfg.train.mixed_precision == "fp16"):
        raise UsageError("train.fsdp runs single-agent full fine-tuning in fp32/bf16 for now; not with cory.enabled, model.lora.r or train.mixed_precision=fp16")
    if cfg.train.shared_prefix and cfg.train.gradient_checkpointing:
        raise UsageError("train.shared_prefix continues each row from the prefix's KV cache, which gradient checkpointing drops: "
                         "use one of train.shared_prefix and train.gradient_checkpointing")
    _check_generation_backend(cfg)
    for section in ("task", "env"):
        if getattr(cfg, section).system_prompt and not getattr(cfg, section).chat_template:
            raise UsageError(f"{section}.system_prompt needs {section}.chat_template=true")
    if cfg.env.chat_examples and not cfg.env.chat_template:
        raise UsageError("env.chat_examples needs env.chat_template=true")
    if any(not isinstance(e, (list, tuple)) or len(e) != 2 or not all(isinstance(x, str) for x in e) for e in cfg.env.chat_examples):
        raise UsageError("env.chat_examples must be a list of [user, assistant] pairs of strings")
    if cfg.task.prompt_file and not Path(cfg.task.prompt_file).is_file():
        raise UsageError(f"prompt file not found: {cfg.task.prompt_file}")
    check_ranges(cfg)


# -- value ranges (issue 13): every number a user sets is checked, one line naming the key ---------
_AT_LEAST_0 = ("algo.weight_decay", "algo.max_grad_norm", "algo.value_clip", "algo.vf_coef", "algo.warmup_iterations",
               "algo.minibatch_size", "algo.micro_batch_size", "kl.beta", "eval.temperature", "eval.seed", "train.seed",
               "train.checkpoint_every", "train.eval_every", "train.num_threads", "env.pool_size",
               "kl.hard_budget", "kl.budget")
_AT_LEAST_1 = ("algo.group_size", "kl.horizon", "train.keep_checkpoints", "eval.samples_per_prompt", "task.num_train_prompts",
               "env.eval_episodes", "env.max_turns", "cory.lora_r", "cory.lora_alpha")
_ABOVE_0 = ("algo.lr", "algo.clip_range", "generation.temperature", "kl.target", "kl.budget_lr",
            "task.reward_timeout")
_UNIT = ("algo.gamma", "algo.turn_gamma", "algo.lam")


def check_ranges(cfg: Config) -> None:
    def get(key: str):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for f in dataclasses.fields(Config):
        for g in dataclasses.fields(getattr(cfg, f.name)):
            value = getattr(getattr(cfg, f.name), g.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"bad value for config key '{f.name}.{g.name}': {value}; must be a finite number")
    for keys, ok, rule in ((_AT_LEAST_0, lambda v: v >= 0, "must be >= 0"), (_AT_LEAST_1, lambda v: v >= 1, "must be at least 1"),
                           (_ABOVE_0, lambda v: v > 0, "must be > 0"), (_UNIT, lambda v: 0 <= v <= 1, "must be in [0, 1]")):
        for key in keys:
            if not ok(get(key)):
                raise UsageError(f"bad value for config key '{key}': {get(key)!r}; {rule}")
    if cfg.env.id and getattr(cfg, "cory", None) is not None and cfg.cory.enabled:
        raise UsageError("env.id and cory.enabled cannot be combined: CORY trains on single-turn tasks, not environments")


def _check_generation_backend(cfg: Config) -> None:
    """vLLM keys act only with generation.backend=vllm; per-token sampling controls need the native loop."""
    g, defaults = cfg.generation, GenerationConfig()
    if g.backend != "vllm":
        changed = [f"generation.{k}" for k in ("vllm_dtype", "vllm_kv_cache_gib", "vllm_gpu_memory_utilization", "vllm_sleep")
                   if getattr(g, k) != getattr(defaults, k)]
        if changed:
            raise UsageError(f"{', '.join(changed)} only act with generation.backend=vllm")
        return
    if g.shared_prefix:
        raise UsageError("generation.shared_prefix is for the native loop; vLLM caches shared prefixes itself")
    if cfg.kl.hard_budget or cfg.kl.help_threshold:
        raise UsageError("kl.hard_budget and kl.help_threshold steer sampling token by token; they need generation.backend=native")
    if g.vllm_kv_cache_gib < 0:
        raise UsageError("bad value for config key 'generation.vllm_kv_cache_gib': must be >= 0 (0 = vLLM's default)")
    if not 0 < g.vllm_gpu_memory_utilization <= 1:
        raise UsageError("bad value for config key 'generation.vllm_gpu_memory_utilization': must be in (0, 1]")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """`section.key` -> value, for trackers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    for section, values in dataclasses.asdict(cfg).items():
        flat = dict(values)
        for k, v in values.items():  # nested sections (model.lora) as their own dotted keys
            if isinstance(v, dict) and dataclasses.is_dataclass(getattr(getattr(cfg, section), k)):
                flat.pop(k)
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        for k, v in flat.items():
            if isinstance(v, list):
                v = ",".join(map(str, v))
            elif isinstance(v, dict):
                v = json.dumps(v, sort_keys=True)
            out[f"{section}.{k}"] = v
    return out
