"""Asking for help: where the pessimistic ensemble's missing mass h (see `cory.drift.ensemble`) is
above a threshold, a trusted model writes the token (or the rest of the response) instead of the agent."""

from __future__ import annotations

import torch

from cory.drift.control import ControlOutput, stack_columns
from cory.drift.ensemble import EnsembleReference
from cory.drift.lockstep import LockstepEnsemble, LockstepLM


class HelpHook:
    """Asking for help during `Policy.generate`: where the pessimistic ensemble's missing mass h
    exceeds ``threshold``, the token is sampled from the trusted policy instead of the agent (scope
    "turn": the trusted policy then writes the rest of the response). Records, per token, whether
    help was asked and the trusted policy's log-prob of the sampled token, so that training uses the
    log-prob of the distribution the token was actually drawn from."""

    def __init__(self, ensemble: EnsembleReference, trusted: torch.nn.Module, threshold: float,
                 scope: str = "token", temperature: float = 1.0):
        self.ensemble = LockstepEnsemble(ensemble, temperature)
        self.trusted = LockstepLM(trusted, temperature)
        self.threshold = threshold
        self.scope = scope
        self.asked: list[torch.Tensor] = []
        self.fallback: list[torch.Tensor] = []

    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> None:
        self.ensemble.start(query_ids, query_mask)
        self.trusted_logprobs = self.trusted.start(query_ids, query_mask)
        self.deferred = torch.zeros(len(query_ids), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, step: int, logprobs: torch.Tensor) -> torch.Tensor:
        h = self.ensemble.h.to(logprobs.device)
        ask = (h > self.threshold) | self.deferred.to(logprobs.device)
        trusted = self.trusted_logprobs.to(logprobs.device)
        self._pending = (ask, trusted)
        return torch.where(ask[:, None], trusted, logprobs)

    @torch.no_grad()
    def observe(self, step: int, token: torch.Tensor, alive: torch.Tensor) -> None:
        ask, trusted = self._pending
        ask = ask & alive
        if self.scope == "turn":
            self.deferred = self.deferred.to(ask.device) | ask
        self.asked.append(ask)
        self.fallback.append(torch.where(alive, trusted.gather(-1, token[:, None].to(trusted.device))[:, 0], torch.zeros((), dtype=trusted.dtype, device=trusted.device)))
        self.ensemble.advance(token)
        self.trusted_logprobs = self.trusted.advance(token)

    def results(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, steps] each: help asked (bool), the trusted log-prob of the token. (The help mass h is
        logged from the Learner's scoring, `EnsembleReference.pessimistic_full`.)"""
        rows = len(self.deferred)
        return stack_columns(self.asked, steps, rows), stack_columns(self.fallback, steps, rows)


class AskForHelp:
    """The Sampler's side of asking for help: a fresh `HelpHook` per turn, and what training needs."""

    def __init__(self, ensemble: EnsembleReference, trusted: torch.nn.Module, threshold: float,
                 scope: str = "token", temperature: float = 1.0):
        self.ensemble, self.trusted = ensemble, trusted
        self.threshold, self.scope, self.temperature = threshold, scope, temperature

    def reset(self, n: int) -> None:
        pass

    def annotate(self, observations: list[str], live: list[int]) -> list[str]:
        return list(observations)

    def hook(self, live: list[int]) -> HelpHook:
        return HelpHook(self.ensemble, self.trusted, self.threshold, self.scope, self.temperature)

    def record(self, hook: HelpHook, live: list[int], steps: int, mask: torch.Tensor) -> ControlOutput:
        asked, fallback = hook.results(steps)
        keep = mask.bool().cpu()
        asked = asked.cpu() & keep
        return ControlOutput(mix_weight=(~asked & keep).float(), fallback_logprobs=torch.where(keep, fallback.cpu(), torch.zeros(())),
                             help=asked.float())
