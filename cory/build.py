"""Building a run's pieces from a Config: the reference model, the sampling control, sampling
settings, the rollout backend, the accelerator and the CPU thread count."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from cory.config import Config
from cory.errors import UsageError, warn


def load_reference(name: str, dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from cory import zoo

    return AutoModelForCausalLM.from_pretrained(zoo.resolve(name), dtype=dtype).eval().requires_grad_(False)


def make_reference(cfg: Config, dtype) -> torch.nn.Module:
    """The frozen reference: model.reference (default the initial model) or, with
    model.reference_ensemble, the pessimistic ensemble of those models."""
    if cfg.model.reference_ensemble:
        from cory.drift.ensemble import EnsembleReference

        members = [load_reference(name, dtype) for name in cfg.model.reference_ensemble]
        return EnsembleReference(members, temperature=cfg.generation.temperature)
    return load_reference(cfg.model.reference or cfg.model.name, dtype)


def make_control(cfg: Config, reference: torch.nn.Module, dtype, multi_turn: bool):
    """(sampling control, fallback model) for a hard episode budget (kl.hard_budget) or asking for
    help (kl.help_threshold); (None, None) when neither is on."""
    temperature = cfg.generation.temperature or 1.0
    if cfg.kl.hard_budget > 0:
        from cory.drift.budget import EpisodeBudget

        return EpisodeBudget(reference, cfg.kl.hard_budget, temperature, note=cfg.kl.budget_note and multi_turn), None
    if cfg.kl.help_threshold > 0:
        from cory.drift.help import AskForHelp

        trusted = load_reference(cfg.model.trusted or cfg.model.reference_ensemble[0], dtype)
        return AskForHelp(reference, trusted, cfg.kl.help_threshold, cfg.kl.help_scope, temperature), trusted
    return None, None


def sampling_params(cfg: Config):
    from cory.policy import SamplingParams

    source = cfg.env if cfg.env.id else cfg.task  # the prompts' chat rendering
    return SamplingParams.from_config(cfg.generation, chat=source.chat_template, system_prompt=source.system_prompt,
                                      chat_examples=_chat_examples(cfg), shared_prefix=cfg.generation.shared_prefix)


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
