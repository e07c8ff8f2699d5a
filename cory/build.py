"""Building a run's pieces from a Config: one build path for every kind of run.

`build_agents` makes the policies a run trains (one for a single-agent run, two for CORY), their
trainable parameters, the frozen reference and a distillation teacher: full copies and a loaded reference, or LoRA adapters
on one frozen base that is also the reference. Around them: the sampling control (hard budget,
asking for help), sampling settings (`sampling_params`, `eval_params`: one rendering of prompts for
training, evaluation and every backend), scorers, the rollout backends, the accelerator and the
CPU thread count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cory import zoo
from cory.config import Config
from cory.drift.budget import EpisodeBudget
from cory.drift.ensemble import EnsembleReference
from cory.drift.help import AskForHelp
from cory.errors import UsageError, warn
from cory.generation import NativeBackend
from cory.generation.sampling import SAMPLING_KEYS, SamplingParams
from cory.generation.vllm_engine import EngineError, EngineOptions, VLLMBackend, VLLMEngine, check_servable, engine_dtype
from cory.lora import lora_policies, save_lora_policy
from cory.policy import Policy, tokenizer_mismatch
from cory.scoring import Scorer
from cory.tasks.registry import CHAT_EXAMPLES
from cory.trunk import FrozenTop, freeze_below, num_layers, trunk_problem


@dataclass
class Agents:
    """What a run trains: its policies by name, each one's trainable parameters (None: all of
    them) and LoRA adapter (None: a full copy), and the frozen reference they share."""

    policies: dict[str, Policy]
    parameters: dict[str, list[torch.nn.Parameter] | None]
    adapters: dict[str, str | None]
    reference: torch.nn.Module
    teacher: torch.nn.Module | None = None
    """The frozen teacher of on-policy distillation (distill.teacher), shared by every policy."""


def build_agents(cfg: Config, names: list[str], value_head: bool) -> Agents:
    """The policies `names` (e.g. ["policy"], or CORY's ["a", "b"]). With model.lora.r each is an
    adapter on one frozen base (the single agent's is PEFT's `default`), which with adapters off is
    the reference; otherwise each is a full copy and the reference is loaded (`make_reference`).
    With model.trainable_layers=K only the top K decoder layers train and the layers below are a
    frozen trunk that every pass shares (`cory.trunk`): the LoRA reference is still the base; a full
    fine-tuning's reference is the policy's trunk with a frozen copy of the top K layers (`FrozenTop`)."""
    dtype = getattr(torch, cfg.model.dtype)
    trainable = cfg.model.trainable_layers
    if trainable:
        config = AutoConfig.from_pretrained(zoo.resolve(cfg.model.name))
        problem = trunk_problem(config, trainable)
        if problem:
            raise UsageError(problem)
        if trainable == config.num_hidden_layers:  # every layer trains: no trunk, as without the key
            trainable = 0
    if cfg.model.lora.r:
        adapters = {n: ("default" if len(names) == 1 else f"agent_{n}") for n in names}
        by_adapter, reference, params = lora_policies(cfg.model.name, cfg.model.lora, dtype, list(adapters.values()), value_head,
                                                      trainable)
        policies = {n: by_adapter[a] for n, a in adapters.items()}
        return Agents(policies, {n: params[a] for n, a in adapters.items()}, adapters, reference,
                      load_teacher(cfg, policies[names[0]], dtype))
    policies = {n: Policy.from_pretrained(cfg.model.name, value_head=value_head, dtype=dtype) for n in names}
    teacher = load_teacher(cfg, policies[names[0]], dtype)
    if not trainable:
        return Agents(policies, {n: None for n in names}, {n: None for n in names}, make_reference(cfg, dtype), teacher)
    depth = num_layers(policies[names[0]].model) - trainable
    for policy in policies.values():
        freeze_below(policy.model, depth)
        policy.module.trunk_depth = depth
    return Agents(policies, {n: None for n in names}, {n: None for n in names}, FrozenTop(policies[names[0]].model, depth), teacher)


def save_policy(cfg: Config, policy: Policy, adapter: str | None, folder: Path) -> None:
    """An ordinary HF folder for one trained policy: its weights, or with LoRA the adapter merged
    into the base (and the adapter alone in `folder/adapter/`)."""
    if adapter is None:
        policy.save_pretrained(folder)
    else:
        save_lora_policy(policy, folder, cfg.model.name, getattr(torch, cfg.model.dtype), adapter)


def load_reference(name: str, dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(zoo.resolve(name), dtype=dtype, use_safetensors=True).eval().requires_grad_(False)


def load_teacher(cfg: Config, policy: Policy, dtype) -> torch.nn.Module | None:
    """The frozen teacher of on-policy distillation (distill.teacher; None when unset). A teacher
    whose tokenizer is not the policy's is refused in one line: its log-probs would be of other tokens."""
    if not cfg.distill.teacher:
        return None
    path = zoo.resolve(cfg.distill.teacher)
    problem = tokenizer_mismatch(policy.tokenizer, AutoTokenizer.from_pretrained(path), policy.model.config.vocab_size,
                                 AutoConfig.from_pretrained(path).vocab_size)
    if problem:
        raise UsageError(f"distill.teacher {cfg.distill.teacher} cannot grade {cfg.model.name}'s tokens: {problem}")
    teacher = load_reference(cfg.distill.teacher, dtype)
    vocab_size = policy.model.config.vocab_size
    if teacher.config.vocab_size > vocab_size:  # padding rows beyond every token: cut off, as if sliced before the softmax
        teacher.resize_token_embeddings(vocab_size)
        teacher.requires_grad_(False)
    return teacher


def make_reference(cfg: Config, dtype) -> torch.nn.Module:
    """The frozen reference: model.reference (default the initial model) or, with
    model.reference_ensemble, the pessimistic ensemble of those models."""
    if cfg.model.reference_ensemble:
        members = [load_reference(name, dtype) for name in cfg.model.reference_ensemble]
        return EnsembleReference(members, temperature=cfg.generation.temperature)
    return load_reference(cfg.model.reference or cfg.model.name, dtype)


def make_control(cfg: Config, reference: torch.nn.Module, multi_turn: bool):
    """(sampling control, fallback model) for a hard episode budget (kl.hard_budget) or asking for
    help (kl.help_threshold); (None, None) when neither is on."""
    temperature = cfg.generation.temperature or 1.0
    if cfg.kl.hard_budget > 0:
        return EpisodeBudget(reference, cfg.kl.hard_budget, temperature, note=cfg.kl.budget_note and multi_turn), None
    if cfg.kl.help_threshold > 0:
        trusted = load_reference(cfg.model.trusted or cfg.model.reference_ensemble[0], getattr(torch, cfg.model.dtype))
        return AskForHelp(reference, trusted, cfg.kl.help_threshold, cfg.kl.help_scope, temperature), trusted
    return None, None


def sampling_params(cfg: Config) -> SamplingParams:
    """How training samples: the generation section's sampling keys, and the prompts' rendering
    (chat template, system and example turns) from the task or environment section."""
    source = cfg.env if cfg.env.id else cfg.task
    return SamplingParams(**{k: getattr(cfg.generation, k) for k in SAMPLING_KEYS}, chat=source.chat_template,
                          system_prompt=source.system_prompt, chat_examples=_chat_examples(cfg),
                          shared_prefix=cfg.generation.shared_prefix)


def _chat_examples(cfg: Config) -> tuple:
    """The environment's example chat turns, or a built-in task's (the arithmetic one-shot) when its
    prompts are chat."""
    if cfg.env.id:
        return tuple(tuple(e) for e in cfg.env.chat_examples)
    if not cfg.task.chat_template:
        return ()
    return CHAT_EXAMPLES.get(cfg.task.name, ())


def eval_params(cfg: Config) -> SamplingParams:
    """How evaluation samples: training's settings at the evaluation temperature."""
    return replace(sampling_params(cfg), temperature=cfg.eval.temperature)


def eval_scorer(cfg: Config, reference: torch.nn.Module) -> Scorer:
    """The reference scored at the evaluation temperature, with the run's prefix sharing."""
    return Scorer(reference, cfg.eval.temperature or 1.0, cfg.train.shared_prefix)


def make_backends(cfg: Config, policies: dict[str, Policy], adapters: dict[str, str | None], model: str,
                  processes: int = 1) -> dict:
    """Rollout backends by name for `policies` (loaded from `model`, a zoo name or a folder). vLLM:
    one engine in this process serves them all (full copies take turns holding it; adapters of one
    shared base are LoRA requests); its owner closes it (`backend.close()`)."""
    if cfg.generation.backend == "native":
        return {name: NativeBackend(policy) for name, policy in policies.items()}
    if processes > 1:
        raise UsageError("generation.backend=vllm runs the engine in one training process; use generation.backend=native with several")
    try:
        engine = make_engine(cfg, model, lora_rank=cfg.model.lora.r if any(adapters.values()) else 0)
    except EngineError as e:
        raise UsageError(str(e)) from None
    return {name: VLLMBackend(engine, policy, adapters[name]) for name, policy in policies.items()}


def make_engine(cfg: Config, model: str, lora_rank: int = 0) -> VLLMEngine:
    """A vLLM engine for `model` (a zoo name or a folder), sized by the config."""
    path = zoo.resolve(model)
    g = cfg.generation
    requested = cfg.model.dtype if g.vllm_dtype == "auto" else g.vllm_dtype
    hf_config = AutoConfig.from_pretrained(path)
    check_servable(hf_config, on_gpu=torch.cuda.is_available())
    dtype = engine_dtype(hf_config, requested, on_gpu=torch.cuda.is_available())
    options = EngineOptions(dtype=dtype, kv_cache_gib=g.vllm_kv_cache_gib, gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                            sleep=g.vllm_sleep, seed=cfg.train.seed, max_lora_rank=lora_rank)
    return VLLMEngine(path, options)


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


def cpu_has_bf16_kernels() -> bool:
    """Whether torch has fast bf16 matmul kernels on this CPU (AVX-512-BF16 or AMX, through oneDNN)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_accelerator(cfg: Config, output_dir: Path) -> Accelerator:
    trackers = list(cfg.train.log_with) or None
    if AcceleratorState._shared_state.get("_mixed_precision", cfg.train.mixed_precision) != cfg.train.mixed_precision:
        # An earlier run in this process (the Python API, a notebook) chose another precision; the
        # process group and device (accelerate's PartialState) stay.
        AcceleratorState._reset_state()
    if cfg.train.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16_kernels():
        # Measured on an AVX2-only CPU (benchmarks/results/throughput_smollm2-135m-instruct_small.md):
        # bf16 x @ W.T runs at a quarter of fp32's speed, the backward's x @ W 200x slower than fp32.
        warn("train.mixed_precision=bf16 on a CPU without bf16 matmul kernels (no AVX-512-BF16 or AMX): "
             "training will be many times slower than with train.mixed_precision=no")
    # cpu=True where there is no GPU: accelerate then sets up multi-process CPU training (gloo) when
    # started by torchrun or `accelerate launch`, instead of silently running each rank alone.
    return Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers, project_dir=str(output_dir),
                       cpu=not torch.cuda.is_available())
