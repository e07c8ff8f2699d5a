"""Rollout backends: who samples the responses of a rollout.

A backend has one method the Sampler, CORY and evaluation call, with `Policy.generate`'s signature:

    generate(prompts, params, generator=None, logits_hook=None) -> Generation

Every backend renders prompts with `Policy.encode_prompts(prompts, params)` and stops responses at
`Policy.stop_ids(params)`, so chat templates, system and example turns reach every engine alike.

- `native` (the default and the reference): `Policy.generate`, cory's own KV-cache loop on the
  trainer's model (`cory.generation.native`). Its log-probs are the trainer's own.
- `vllm`: vLLM's offline engine in the training process (colocated, `cory.generation.vllm_engine`).
  After each optimizer step the trainer's weights (or, with LoRA, its adapters) are pushed into the
  engine in memory before the next generation. The engine's sampled log-probs become the behaviour
  log-probs and are also kept as `Generation.engine_logprobs`, so that the learner can measure and
  correct the engine/trainer mismatch (`is/log_ratio_abs_mean`, `algo.is_correction`).
"""

from __future__ import annotations

from cory.generation.vllm_engine import VLLMBackend


class NativeBackend:
    """The trainer's own sampling loop (`Policy.generate`); nothing to synchronise."""

    token_hooks = True
    """Applies a per-token logits hook (a hard KL budget, asking for help)."""

    def __init__(self, policy):
        self.policy = policy

    def generate(self, prompts, params=None, generator=None, logits_hook=None):
        return self.policy.generate(prompts, params, generator=generator, logits_hook=logits_hook)

    def mark_stale(self) -> None:
        """The trainer's weights changed; the native loop reads them directly."""

    def pause(self) -> None:
        """Generation is over for this iteration; nothing to free."""

    def close(self) -> None:
        """Nothing to release."""


BACKENDS = {"native": NativeBackend, "vllm": VLLMBackend}
"""`generation.backend` names -> backend classes (the config's allowed values)."""
