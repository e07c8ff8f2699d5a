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
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from cory import kl, losses
from cory.algorithms import ALGORITHMS
from cory.envs import ENV_IDS
from cory.errors import UsageError
from cory.generation import BACKENDS
from cory.generation.sampling import SAMPLING_KEYS, SamplingParams, sampling_problem
from cory.paths import is_file
from cory.rewards import is_function_spec
from cory.tasks import BUILTIN_REWARD, TASKS
from cory.tasks.dataset_prompts import DEFAULT_SPLIT
from cory.tasks.pioneer_observer import template_problem


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank (0 = off: every weight trains). With LoRA the frozen base, adapters disabled, is the reference; CORY's two agents are two adapters on that one base (about one model's memory)."""
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
    """LoRA / QLoRA, for single-agent runs and CORY alike: model.lora.r, alpha, dropout, targets, quantize."""
    trainable_layers: int = 0
    """Train only the top K decoder layers (0, or the model's number of layers: all, as without the key), fully or through LoRA; the embeddings, the layers below, the final norm and the head stay frozen, and that frozen trunk's output is computed once per sequence (kept from sampling) so every other pass runs only the top K layers. Top layers want a larger learning rate than the whole model: docs/concepts/top-layers.md."""


@dataclass
class TaskConfig:
    name: str = "sentiment"
    """The task: `sentiment` (continue a review; reward = classifier's positive logit)."""
    prompt_file: str = ""
    """Optional JSONL or CSV file of prompts (column `prompt_column`) replacing the built-in ones."""
    dataset: str = ""
    """Prompts from a dataset instead (through the `datasets` library, streamed): a local parquet or JSONL file, a folder of them, an Arrow folder (`save_to_disk`), or a hub id. Its first num_eval_prompts rows are the evaluation set, held out; the rest are read in epochs shuffled by train.seed, and the position is part of a checkpoint."""
    split: str = DEFAULT_SPLIT
    """With task.dataset: the split to read (an Arrow folder that holds one Dataset, without splits, takes only the default)."""
    prompt_column: str = "prompt"
    """The column (CSV, task.dataset) or key (JSONL) that holds the prompt text."""
    answer_column: str = ""
    """With task.dataset: a column of reference answers, handed to a `module:function` reward as `answers=` (one per response), for verifiable tasks (empty = none)."""
    reward: str = "cory:tiny-sentiment"
    """The reward: a sequence-classifier folder, a `cory:` classifier, `vader` (VADER compound score), or a Python `module:function`."""
    reward_label: str = "positive"
    """For a classifier with several labels, the label whose logit is the reward."""
    reward_on: str = "prompt+response"
    """What text a classifier or `vader` scores: `prompt+response` or `response`."""
    reward_timeout: float = 300.0
    """Seconds a Python reward function may take for one batch before the run stops with an error."""
    num_train_prompts: int = 2048
    """How many built-in training prompts to draw from (held out from the model's pretraining); not with task.dataset, whose rows after the evaluation set all train."""
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


_SAMPLING = SamplingParams()


@dataclass
class GenerationConfig:
    """How rollouts are sampled. The sampling keys (`SAMPLING_KEYS`) are what
    `cory.generation.sampling.SamplingParams` carries to generation, with its defaults and
    `sampling_problem` as their one check."""

    max_new_tokens: int = _SAMPLING.max_new_tokens
    """Most tokens in one response."""
    temperature: float = _SAMPLING.temperature
    """Sampling temperature; log-probs for training are taken at this temperature."""
    top_k: int = _SAMPLING.top_k
    """Keep only the k likeliest tokens when sampling (0 = off)."""
    top_p: float = _SAMPLING.top_p
    """Nucleus sampling mass (1.0 = off)."""
    stop_strings: list[str] = field(default_factory=lambda: list(_SAMPLING.stop_strings))
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


@dataclass
class AlgoConfig:
    name: str = "reinforce"
    """The RL algorithm, by registered name: reinforce, a2c, ppo, rloo, grpo, dr_grpo, dapo, gspo, cispo, or distill (on-policy distillation from distill.teacher, which it needs)."""
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
    is_correction: str = "token-tis"
    """Tokens sampled by another policy (generation.backend=vllm, train.mixed_precision over float32 weights, or an older version in an asynchronous run: train.max_staleness), with r = pi_train_old / pi_behaviour: token-tis (weight min(r, is_cap)), token-mis (r, or 0 where r > is_cap), seq-tis / seq-mis (the same with the turn's product of ratios, every token of it alike), icepop (r, or 0 where r leaves [is_floor, is_cap]) or none (weight 1)."""
    is_cap: float = 2.0
    """The importance correction's upper bound C (>= 1, so that agreeing policies get weight 1)."""
    is_floor: float = 0.5
    """algo.is_correction=icepop: the lower bound of the ratios that keep their weight (in (0, 1])."""


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
    """Log each episode's exact KL (full-vocabulary sum over its tokens), in training and in every evaluation on the fixed prompts (`kl_exact_mean`). Read from the update's first forward, which computes the policy's whole distributions anyway; a pass of the policy of its own only where that cannot serve (a sampling control, values or recomputed log-probs, several minibatches, adapter dropout, vLLM's samples)."""
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
    """accelerate mixed precision: no, bf16 or fp16. Over float32 weights the trainer recomputes the sampled tokens' log-probs under autocast (algo.is_correction); on a CPU without bf16 kernels bf16 is slower than no (a warning says so)."""
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
    max_staleness: int = 0
    """Asynchronous rollouts: a worker process samples the next batches (with generation.backend: the native loop, or a vLLM engine of its own) while the trainer updates, and no sample trains on weights more than this many versions (optimizer iterations) older than the trainer's; the worker's log-probs are corrected by algo.is_correction (0 = the synchronous loop: sample, then update, in one process). Cannot change on --resume (only with --force)."""
    worker_timeout: float = 300.0
    """train.max_staleness > 0: seconds the trainer waits for each batch from the rollout worker (its start included) before it stops the run with one line (exit 1); the worker itself waits for new weights as long as the trainer lives."""
    shared_prefix: bool = False
    """Score, update and evaluate the KL with the prompt prefix a batch's rows share (a chat template's system and example turns; at least 16 tokens) run once and its keys and values repeated for every row, gradients included: the same log-probs and gradients up to float rounding, (B - 1) x prefix tokens less forward and backward. One process; not with train.gradient_checkpointing."""


@dataclass
class DistillConfig:
    """On-policy distillation: the policy samples, a teacher grades every token it wrote."""

    teacher: str = ""
    """The teacher: any causal LM with the policy's tokenizer (a `cory:` name, a folder or a hub id); every response token is rewarded with minus the reverse KL from the policy to it, scored at the sampling temperature (empty = off)."""
    coef: float = 1.0
    """Weight of the teacher's per-token reward: r_t = -coef x KL_t(policy || teacher)."""
    estimator: str = "k1"
    """The per-token reverse KL: k1 (log pi(x) - log teacher(x) of the sampled token) or full (exact over the vocabulary, one more [B, L, V] pass)."""
    task_coef: float = 1.0
    """Weight of the task's (or environment's) score beside the teacher's reward (0 = distillation alone; algo.name=distill: 0)."""


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
    distill: DistillConfig = field(default_factory=DistillConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "task.name": tuple(sorted(TASKS)),
    "task.reward_on": ("prompt+response", "response"),
    "algo.name": tuple(sorted(ALGORITHMS)),
    "algo.baseline": ("none", "mean", "loo"),
    "algo.loss_aggregation": losses.AGGREGATIONS,
    "algo.is_correction": losses.IS_CORRECTIONS,
    "kl.estimator": (*kl.ESTIMATORS, "full"),
    "kl.controller": tuple(kl.CONTROLLERS),
    "kl.penalty": ("auto", "reward", "loss"),
    "kl.help_scope": ("token", "turn"),
    "distill.estimator": ("k1", "full"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "model.lora.quantize": ("none", "4bit"),
    "generation.backend": tuple(BACKENDS),
    "generation.vllm_dtype": ("auto", "float32", "bfloat16", "float16"),
}
"""Keys with a fixed set of values; those of registries (tasks, algorithms, aggregations, KL
estimators and controllers, backends) are read from them."""

RENAMED = {
    "cory.shared_base": "model.lora.r (CORY's two agents are then adapters on one shared base)",
    "cory.lora_r": "model.lora.r",
    "cory.lora_alpha": "model.lora.alpha",
    "cory.lora_targets": "model.lora.targets",
    "algo.tis_cap": "algo.is_cap (with algo.is_correction=token-tis, the default; algo.tis_cap=0 is algo.is_correction=none)",
}
"""Keys that have moved: an old config gets one line naming the new key."""


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
        if key in RENAMED:
            return f"config key '{key}' is gone: use {RENAMED[key]}"
        if not section or not key.split(".")[-1]:
            return f"config key '{key}' is not of the form section.key; sections: {', '.join(sections)}"
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
    key = item.partition("=")[0]
    if "=" not in item or not key or any(not part for part in key.split(".")):
        raise UsageError(f"override '{item}' is not of the form section.key=value")
    return item


def _prepare(layer):
    """A YAML file's or the overrides' layer, checked before it is merged: every key names a
    section and a key (no empty part), a mapping or list field gets a mapping or list, mapping keys
    are strings; and YAML's no/yes/on/off booleans are read as the word for a text key whose choices
    hold that word (train.mixed_precision=no), refused in one line for other text keys."""
    data = OmegaConf.to_container(layer)
    if not isinstance(data, dict):
        return layer
    fields = {f"{f.name}.{g.name}": g for f in dataclasses.fields(Config) for g in dataclasses.fields(f.default_factory())}
    for section, values in data.items():
        if not isinstance(section, str) or not section:
            raise UsageError(f"config key {section!r} is not a section; sections: {', '.join(f.name for f in dataclasses.fields(Config))}")
        for name, value in (values.items() if isinstance(values, dict) else []):
            key = f"{section}.{name}"
            if not isinstance(name, str) or not name:
                raise UsageError(f"config key {key!r} names no key of section '{section}'")
            field_type = str(fields[key].type) if key in fields else ""
            if field_type.startswith("dict") and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
                raise UsageError(f"bad value for config key '{key}': {value!r}; must be a mapping of names to values, "
                                 f"e.g. '{key}={{n_arms: 5, horizon: 10}}'")
            if field_type.startswith("list") and not isinstance(value, list):
                raise UsageError(f"bad value for config key '{key}': {value!r}; must be a list, e.g. '{key}=[a, b]'")
            if field_type in ("str", str) and isinstance(value, bool):
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
            if not is_file(p):
                raise UsageError(f"config file not found: {p}")
            try:
                loaded = OmegaConf.load(p)
            except Exception as e:  # YAML syntax errors come in many classes
                raise UsageError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(loaded, type(schema)):
                raise UsageError(f"config file {p} must hold a mapping of sections")
            layers.append(_prepare(loaded))
        layers.append(_prepare(OmegaConf.from_dotlist([_parse_override(o) for o in overrides])))
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
    out: dict[str, dict[str, Any]] = {}
    for key, value in (ALGORITHMS[name].defaults if name in ALGORITHMS else {}).items():
        section, k = key.split(".")
        out.setdefault(section, {})[k] = value
    return out


def algorithm_keys() -> dict[str, set[str]]:
    """Algorithm name -> the algorithm-specific `algo.*` keys (without the section) it reads: its
    estimator's and losses' keys. `_check_algorithm_keys` refuses the others and `cory algos` prints
    these, so the two cannot disagree. Keys no algorithm claims act for every one."""
    return {name: algorithm.keys() for name, algorithm in sorted(ALGORITHMS.items())}


# -- the checks: every check that the config alone decides, in one place ------------------------------
def check(cfg: Config) -> None:
    """Value checks that types alone do not express; each failure is a one-line UsageError."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise UsageError(f"bad value for config key '{key}': {value!r}; choose one of: {', '.join(allowed)}")
    if cfg.env.id and cfg.env.id not in ENV_IDS:
        raise UsageError(f"bad value for config key 'env.id': {cfg.env.id!r}; cory environments: {', '.join(ENV_IDS)}")
    if not isinstance(cfg.env.kwargs, dict):
        raise UsageError(f"bad value for config key 'env.kwargs': {cfg.env.kwargs!r}; must be a mapping, e.g. "
                         "'env.kwargs={n_arms: 5, horizon: 10}'")
    _check_algorithm_keys(cfg)
    problem = sampling_problem(*(getattr(cfg.generation, k) for k in SAMPLING_KEYS))
    if problem:
        key, value, rule = problem
        raise UsageError(f"bad value for config key 'generation.{key}': {value!r}; {rule}")
    check_ranges(cfg)
    _check_batches(cfg)
    _check_drift(cfg)
    _check_lora_and_sharding(cfg)
    _check_generation_backend(cfg)
    _check_prompts(cfg)
    _check_distill(cfg)
    _check_async(cfg)
    problem = template_problem(cfg.cory.observer_template)
    if problem:
        raise UsageError(f"bad value for config key 'cory.observer_template': {cfg.cory.observer_template!r}; {problem}")
    if cfg.env.id and cfg.cory.enabled:
        raise UsageError("env.id and cory.enabled cannot be combined: CORY trains on single-turn tasks, not environments")


def _get(cfg: Config, key: str):
    value = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _check_algorithm_keys(cfg: Config) -> None:
    """A key with no effect for the chosen algorithm is refused with one line."""
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
    if a.loss_constant < 0 or a.overlong_buffer < 0 or a.clip_range_high < 0:
        raise UsageError("algo.loss_constant, overlong_buffer and clip_range_high must be >= 0")
    _check_importance_correction(cfg)
    if a.dual_clip and a.dual_clip <= 1:
        raise UsageError("bad value for config key 'algo.dual_clip': must be > 1 (0 = off)")
    if a.overlong_buffer > cfg.generation.max_new_tokens:
        raise UsageError("algo.overlong_buffer must be at most generation.max_new_tokens")
    if cfg.kl.estimator == "full" and not algo.kl_in_rewards(cfg.kl.penalty):
        raise UsageError(f"kl.estimator=full works only with KL in the reward (kl.penalty=reward) for {cfg.algo.name}")


def _check_importance_correction(cfg: Config) -> None:
    a, default = cfg.algo, AlgoConfig()
    if a.is_cap < 1:
        raise UsageError(f"bad value for config key 'algo.is_cap': {a.is_cap!r}; must be >= 1, so that agreeing policies get weight 1")
    if not 0 < a.is_floor <= 1:
        raise UsageError(f"bad value for config key 'algo.is_floor': {a.is_floor!r}; must be in (0, 1]")
    if a.is_floor != default.is_floor and a.is_correction != "icepop":
        raise UsageError("algo.is_floor has no effect unless algo.is_correction=icepop")
    if a.is_cap != default.is_cap and a.is_correction == "none":
        raise UsageError("algo.is_cap has no effect with algo.is_correction=none")
    changed = [f"algo.{k}" for k in ("is_correction", "is_cap", "is_floor") if getattr(a, k) != getattr(default, k)]
    other_policy = cfg.generation.backend != "native" or cfg.train.mixed_precision != "no" or cfg.train.max_staleness > 0
    if changed and not other_policy:
        raise UsageError(f"{', '.join(changed)} only act on tokens sampled by another engine, precision or weights version "
                         "(generation.backend=vllm, train.mixed_precision or train.max_staleness); here the trainer samples them itself")


def episodes_per_iteration(cfg: Config) -> int:
    """Episodes one learner trains on per iteration (per process): prompts x samples per prompt
    (each CORY agent answers every one of them)."""
    algo = ALGORITHMS[cfg.algo.name]
    grouped = algo.grouped or (algo.estimator == "returns" and cfg.algo.baseline == "loo")
    return cfg.train.batch_size * (cfg.algo.group_size if grouped else 1)


def _check_batches(cfg: Config) -> None:
    """Minibatches are whole episodes, of equal size: a size that does not divide the iteration's
    episodes (or exceeds them) would silently train on a smaller last minibatch (or on one)."""
    a, n = cfg.algo, episodes_per_iteration(cfg)
    if a.minibatch_size > n:
        raise UsageError(f"algo.minibatch_size={a.minibatch_size} is more than the {n} episodes of an iteration "
                         f"(train.batch_size x samples per prompt); use at most {n} (0 = all)")
    if a.minibatch_size and n % a.minibatch_size:
        raise UsageError(f"algo.minibatch_size={a.minibatch_size} does not divide the {n} episodes of an iteration into "
                         "equal minibatches; use a divisor of it (0 = all)")
    if a.minibatch_size and a.micro_batch_size and a.minibatch_size % a.micro_batch_size:
        raise UsageError("algo.minibatch_size must be a multiple of algo.micro_batch_size")


def _check_drift(cfg: Config) -> None:
    k, m = cfg.kl, cfg.model
    if not 0 <= k.help_threshold < 1:
        raise UsageError("bad value for config key 'kl.help_threshold': must be in [0, 1) (0 = off)")
    if m.reference_ensemble and len(m.reference_ensemble) < 2:
        raise UsageError("model.reference_ensemble needs at least 2 models")
    if m.reference_ensemble and m.reference:
        raise UsageError("set model.reference or model.reference_ensemble, not both")
    if k.help_threshold and not m.reference_ensemble:
        raise UsageError("kl.help_threshold needs a pessimistic reference: set model.reference_ensemble")
    if k.help_threshold and k.hard_budget:
        raise UsageError("kl.hard_budget and kl.help_threshold cannot be combined yet; pick one")


def _check_lora_and_sharding(cfg: Config) -> None:
    lora = cfg.model.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1 or (lora.r and not lora.targets):
        raise UsageError("bad model.lora: r must be >= 0 (0 = off), alpha > 0, dropout in [0, 1), targets not empty")
    if lora.quantize != "none" and not lora.r:
        raise UsageError(f"model.lora.quantize={lora.quantize} quantizes the frozen base of a LoRA run: set model.lora.r too")
    if lora.r and (cfg.model.reference or cfg.model.reference_ensemble):
        raise UsageError("with model.lora.r the reference is the frozen base (adapters disabled); leave model.reference and model.reference_ensemble empty")
    if cfg.train.fsdp and (cfg.cory.enabled or lora.r or cfg.train.mixed_precision == "fp16"):
        raise UsageError("train.fsdp runs single-agent full fine-tuning in fp32/bf16 for now; not with cory.enabled, model.lora.r or train.mixed_precision=fp16")
    if cfg.model.trainable_layers and (cfg.model.reference or cfg.model.reference_ensemble):
        raise UsageError("model.trainable_layers shares the frozen trunk with the reference, which is the initial model: "
                         "leave model.reference and model.reference_ensemble empty")
    if cfg.model.trainable_layers and cfg.train.fsdp:
        raise UsageError("model.trainable_layers runs the top layers on their own, which FSDP's sharded layers cannot: "
                         "use one of model.trainable_layers and train.fsdp")
    if cfg.train.shared_prefix and cfg.train.gradient_checkpointing:
        raise UsageError("train.shared_prefix continues each row from the prefix's KV cache, which gradient checkpointing drops: "
                         "use one of train.shared_prefix and train.gradient_checkpointing")


def _check_async(cfg: Config) -> None:
    """What an asynchronous rollout worker (train.max_staleness > 0) cannot do yet, refused in one line."""
    t = cfg.train
    if not t.max_staleness:
        if t.worker_timeout != TrainConfig().worker_timeout:
            raise UsageError("train.worker_timeout has no effect unless train.max_staleness > 0")
        return
    if t.fsdp:
        raise UsageError("train.max_staleness needs whole weights to send to the worker: not with train.fsdp")
    if cfg.task.dataset:
        raise UsageError("train.max_staleness with task.dataset is not implemented yet: the worker would consume the "
                         "dataset stream whose position the trainer checkpoints; use train.max_staleness=0")


def _check_prompts(cfg: Config) -> None:
    for section in ("task", "env"):
        if getattr(cfg, section).system_prompt and not getattr(cfg, section).chat_template:
            raise UsageError(f"{section}.system_prompt needs {section}.chat_template=true")
    if cfg.env.chat_examples and not cfg.env.chat_template:
        raise UsageError("env.chat_examples needs env.chat_template=true")
    if any(not isinstance(e, (list, tuple)) or len(e) != 2 or not all(isinstance(x, str) for x in e) for e in cfg.env.chat_examples):
        raise UsageError("env.chat_examples must be a list of [user, assistant] pairs of strings")
    t, defaults = cfg.task, TaskConfig()
    if t.name == "prompts" and not (t.prompt_file or t.dataset):
        raise UsageError("task.name=prompts needs task.prompt_file or task.dataset")
    if t.prompt_file and t.dataset:
        raise UsageError("set task.prompt_file or task.dataset, not both")
    if t.prompt_file and not is_file(t.prompt_file):
        raise UsageError(f"prompt file not found: {t.prompt_file[:200]}")
    unused = [f"task.{k}" for k in ("split", "answer_column") if getattr(t, k) != getattr(defaults, k)]
    if unused and not t.dataset:
        raise UsageError(f"{', '.join(unused)} only act with task.dataset")
    if t.dataset and t.num_train_prompts != defaults.num_train_prompts:
        raise UsageError("task.num_train_prompts has no effect with task.dataset: every row after the evaluation set "
                         "(task.num_eval_prompts) trains; leave it unset")
    if t.dataset and (cfg.env.id or t.name in BUILTIN_REWARD):
        raise UsageError(f"task.dataset has no effect {'with env.id' if cfg.env.id else f'for task.name={t.name}, whose prompts and reward are its own'}")
    if t.answer_column and not is_function_spec(t.reward):
        raise UsageError(f"task.answer_column hands answers to a module:function reward; task.reward={t.reward} takes none")


SCORE_SHAPING_KEYS = ("missing_eos_penalty", "overlong_buffer", "overlong_penalty", "normalize_rewards")
"""algo.* keys that act only on the task's score (`cory.shaping.adjust_scores`, running-std scaling)."""


def _check_distill(cfg: Config) -> None:
    """A teacher's keys act only with a teacher; algo.name=distill needs one; with distill.task_coef=0
    the keys that shape the task's score act on nothing."""
    d, defaults = cfg.distill, DistillConfig(**algorithm_defaults(cfg.algo.name).get("distill", {}))
    if not d.teacher:
        changed = [f"distill.{k}" for k in ("coef", "estimator", "task_coef") if getattr(d, k) != getattr(defaults, k)]
        if changed or cfg.algo.name == "distill":
            raise UsageError(f"{', '.join(changed) or 'algo.name=distill'} needs a teacher: set distill.teacher")
        return
    if not d.task_coef:
        algo = AlgoConfig(**algorithm_defaults(cfg.algo.name).get("algo", {}))
        changed = [f"algo.{k}" for k in SCORE_SHAPING_KEYS if getattr(cfg.algo, k) != getattr(algo, k)]
        if cfg.cory.enabled and cfg.cory.partner_coef != CoryConfig().partner_coef:
            changed.append("cory.partner_coef")
        if changed:
            raise UsageError(f"{', '.join(changed)} only shape the task's score, which distill.task_coef=0 leaves out of the "
                             "rewards: leave them unset, or set distill.task_coef > 0")
    if d.estimator == "full" and (cfg.kl.hard_budget or cfg.kl.help_threshold):
        raise UsageError("distill.estimator=full trains on the policy's whole distributions, not the mixtures that "
                         "kl.hard_budget and kl.help_threshold sample: use distill.estimator=k1 with them")

# -- value ranges: every number a user sets is checked, one line naming the key --------------------------
_AT_LEAST_0 = ("model.trainable_layers", "algo.weight_decay", "algo.max_grad_norm", "algo.value_clip", "algo.vf_coef", "algo.warmup_iterations",
               "algo.minibatch_size", "algo.micro_batch_size", "kl.beta", "eval.temperature", "eval.seed", "train.seed",
               "train.checkpoint_every", "train.eval_every", "train.num_threads", "env.pool_size", "train.max_staleness",
               "kl.hard_budget", "kl.budget", "distill.coef", "distill.task_coef")
_AT_LEAST_1 = ("algo.group_size", "algo.epochs", "kl.horizon", "train.iterations", "train.batch_size", "train.keep_checkpoints",
               "eval.samples_per_prompt", "task.num_train_prompts", "task.num_eval_prompts", "env.eval_episodes",
               "env.max_turns", "cory.swap_every")
_ABOVE_0 = ("algo.lr", "algo.clip_range", "generation.temperature", "kl.target", "kl.budget_lr",
            "task.reward_timeout", "train.worker_timeout")
_UNIT = ("algo.gamma", "algo.turn_gamma", "algo.lam")


def check_ranges(cfg: Config) -> None:
    for f in dataclasses.fields(Config):
        for g in dataclasses.fields(getattr(cfg, f.name)):
            value = getattr(getattr(cfg, f.name), g.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"bad value for config key '{f.name}.{g.name}': {value}; must be a finite number")
    for keys, ok, rule in ((_AT_LEAST_0, lambda v: v >= 0, "must be >= 0"), (_AT_LEAST_1, lambda v: v >= 1, "must be at least 1"),
                           (_ABOVE_0, lambda v: v > 0, "must be > 0"), (_UNIT, lambda v: 0 <= v <= 1, "must be in [0, 1]")):
        for key in keys:
            if not ok(_get(cfg, key)):
                raise UsageError(f"bad value for config key '{key}': {_get(cfg, key)!r}; {rule}")


def _check_generation_backend(cfg: Config) -> None:
    """vLLM keys act only with generation.backend=vllm; per-token sampling controls need a backend
    that applies logits hooks."""
    g, defaults = cfg.generation, GenerationConfig()
    if (cfg.kl.hard_budget or cfg.kl.help_threshold) and not BACKENDS[g.backend].token_hooks:
        raise UsageError(f"kl.hard_budget and kl.help_threshold steer sampling token by token, which generation.backend={g.backend} "
                         "cannot: use generation.backend=native")
    if g.backend != "vllm":
        changed = [f"generation.{k}" for k in ("vllm_dtype", "vllm_kv_cache_gib", "vllm_gpu_memory_utilization", "vllm_sleep")
                   if getattr(g, k) != getattr(defaults, k)]
        if changed:
            raise UsageError(f"{', '.join(changed)} only act with generation.backend=vllm")
        return
    if g.shared_prefix:
        raise UsageError("generation.shared_prefix is for the native loop; vLLM caches shared prefixes itself")
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
