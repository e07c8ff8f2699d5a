"""A frozen reference that follows a generation token by token, with its own KV cache, so that a
sampling control can compare the agent's next-token distribution with the reference's at every step."""

from __future__ import annotations

import torch

from cory.drift.ensemble import EnsembleReference, pessimistic, renormalised
from cory.generation.native import KVStepper


class LockstepLM:
    """A frozen causal LM that follows a generation token by token with its own KV cache
    (`KVStepper`) and gives its tempered next-token log-distribution [B, V] after the prompt and
    after each token."""

    def __init__(self, lm: torch.nn.Module, temperature: float = 1.0):
        self.stepper = KVStepper(lm)
        self.temperature = temperature if temperature > 0 else 1.0

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float() / self.temperature, dim=-1)

    @torch.no_grad()
    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        dev = next(self.stepper.lm.parameters()).device
        return self._tempered(self.stepper.prefill(query_ids.to(dev), query_mask.to(dev)))

    @torch.no_grad()
    def advance(self, token: torch.Tensor) -> torch.Tensor:
        return self._tempered(self.stepper.advance(token))


class LockstepEnsemble:
    """Follows a generation with every member's KV cache; returns the renormalised pessimistic
    log-distribution [B, V] and keeps the help mass ``h`` [B]."""

    def __init__(self, ensemble: EnsembleReference, temperature: float = 1.0):
        self.members = [LockstepLM(m, temperature) for m in ensemble.members]

    def _combine(self, member_logprobs: list[torch.Tensor]) -> torch.Tensor:
        log_min, self.h = pessimistic(torch.stack(member_logprobs))
        return renormalised(log_min, self.h)

    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        return self._combine([m.start(query_ids, query_mask) for m in self.members])

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        return self._combine([m.advance(token) for m in self.members])


def lockstep(reference: torch.nn.Module, temperature: float = 1.0) -> LockstepLM | LockstepEnsemble:
    """A lockstep follower of ``reference``: a plain LM, or an ensemble whose follower returns the
    renormalised pessimistic distribution."""
    if isinstance(reference, EnsembleReference):
        return LockstepEnsemble(reference, temperature)
    return LockstepLM(reference, temperature)
