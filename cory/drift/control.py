"""The sampling-control protocol: how the Sampler lets a control steer generation, and what a control
hands to training.

A control lives across an episode's turns. The Sampler calls `reset(n)` once per batch of n
episodes; then, for every turn, `annotate(observations, live)` (what the agent is shown),
`hook(live)` (a logits hook for `Policy.generate`, see `cory.policy`), and after generation
`record(hook, live, steps, mask)`, which returns a `ControlOutput`: per response token, the
distribution the token was actually drawn from. The Learner trains on that distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch


@dataclass
class ControlOutput:
    """Per response token [B, Lr] of a turn (0 at masked positions): each token x was drawn from the
    mixture w q + (1 - w) f of the agent's q and a fallback f, so its log-prob is
    log(w q(x) + (1 - w) f(x)) (`cory.drift.exact.mixture_logprobs`)."""

    mix_weight: torch.Tensor
    """w: 1 where the agent sampled freely, in (0, 1) where a hard budget mixed, 0 where the fallback wrote."""
    fallback_logprobs: torch.Tensor
    """log f(x): the fallback's log-prob of the token (the reference under a hard budget, the trusted
    model when asking for help)."""
    help: torch.Tensor | None = None
    """1 where the agent asked for help (the trusted model wrote the token); None for a hard budget."""

    @property
    def fallback_is_reference(self) -> bool:
        """True for a hard budget (the fallback is the reference), False when asking for help."""
        return self.help is None

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def select(self, idx: torch.Tensor) -> "ControlOutput":
        return replace(self, **{k: v[idx.to(v.device)] for k, v in self._tensors().items()})

    def select_columns(self, cols: slice) -> "ControlOutput":
        return replace(self, **{k: v[:, cols] for k, v in self._tensors().items()})

    def to(self, device) -> "ControlOutput":
        return replace(self, **{k: v.to(device) for k, v in self._tensors().items()})

    @staticmethod
    def concat(parts: list["ControlOutput"], masks: list[torch.Tensor]) -> "ControlOutput":
        """Rows of several turns' outputs (each [B_i, L_i] with response mask [B_i, L_i]) as one
        right-padded [sum B_i, max kept length] output, in the order of the parts and rows."""
        names = list(parts[0]._tensors())
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        for part, mask in zip(parts, masks):
            keep = mask.bool().cpu()
            for k in names:
                value = getattr(part, k).cpu()
                rows[k].extend(value[i][keep[i]] for i in range(len(keep)))
        width = max((len(r) for r in rows[names[0]]), default=0)
        padded = {}
        for k, values in rows.items():
            out = torch.zeros(len(values), width, dtype=values[0].dtype if values else torch.float32)
            for i, r in enumerate(values):
                out[i, : len(r)] = r
            padded[k] = out
        return ControlOutput(**padded)


class SamplingControl(Protocol):
    """What the Sampler needs from a control (`EpisodeBudget`, `AskForHelp`)."""

    def reset(self, n: int) -> None: ...

    def annotate(self, observations: list[str], live: list[int]) -> list[str]: ...

    def hook(self, live: list[int]): ...

    def record(self, hook, live: list[int], steps: int, mask: torch.Tensor) -> ControlOutput: ...


class EachTurnAnEpisode:
    """Wraps a control so that every turn starts afresh, as its own episode (CORY: the pioneer's and
    the observer's responses are separate episodes, each with the whole budget)."""

    def __init__(self, control: SamplingControl):
        self.control = control

    def reset(self, n: int) -> None:
        self.n = n

    def annotate(self, observations: list[str], live: list[int]) -> list[str]:
        return self.control.annotate(observations, live)

    def hook(self, live: list[int]):
        self.control.reset(self.n)
        return self.control.hook(live)

    def record(self, hook, live: list[int], steps: int, mask: torch.Tensor) -> ControlOutput:
        return self.control.record(hook, live, steps, mask)


def stack_columns(columns: list[torch.Tensor], steps: int, rows: int) -> torch.Tensor:
    """[rows, steps] from per-step columns [rows] recorded by a hook ([rows, 0] when none)."""
    return torch.stack(columns[:steps], dim=1) if columns else torch.zeros(rows, 0)
