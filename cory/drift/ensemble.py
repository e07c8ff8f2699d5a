"""A pessimistic ensemble reference: "don't do anything I *mightn't* do" (Cohen et al., 2024).

K reference models (same recipe, different seeds or data shards) give next-token distributions p_k.
The pessimistic reference takes the pointwise minimum, p~(x) = min_k p_k(x): a semi-distribution
whose missing mass h = 1 - sum_x p~(x) is the probability of asking for help. Because p~ <= p_k for
every member, KL(q || p~) = sum_x q(x) log(q(x) / p~(x)) >= KL(q || p_k) for every k: a budget
against p~ implies the same budget against any plausible model. The renormalised p~ / (1 - h) is a
proper distribution; both KLs are logged.

`EnsembleReference` is a drop-in reference for the Learner: its forward returns log p~ as "logits",
so `sequence_logprobs(..., temperature=T)` of it yields the *renormalised* pessimistic log-probs,
while its `pessimistic_full` gives the unnormalised distribution and h (the Learner logs the KL
against it when the reference offers that method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cory.scoring import sequence_layout


def pessimistic(member_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """member_logprobs [K, ..., V] -> (log p~ [..., V] unnormalised, h [...] missing mass in [0, 1])."""
    log_min = member_logprobs.min(dim=0).values
    h = (1.0 - log_min.exp().sum(-1)).clamp(0.0, 1.0)
    return log_min, h


def renormalised(log_min: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[..., V] log(p~ / (1 - h)): the pessimistic semi-distribution made proper."""
    return log_min - torch.log1p(-h.clamp(max=1 - 1e-12))[..., None]


class EnsembleReference(torch.nn.Module):
    """K frozen causal LMs sharing a tokenizer, seen as one pessimistic reference."""

    def __init__(self, members: list[torch.nn.Module], temperature: float = 1.0):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble reference needs at least 2 members")
        self.members = torch.nn.ModuleList(members)
        self.temperature = temperature if temperature > 0 else 1.0

    @torch.no_grad()
    def member_logprobs(self, **inputs) -> torch.Tensor:
        """[K, B, L, V] each member's tempered log-distribution at every position."""
        return torch.stack([torch.log_softmax(m(**inputs).logits.float() / self.temperature, -1) for m in self.members])

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **_):
        """Log p~ at every position as `logits` (scaled by the temperature, so that downstream
        `log_softmax(logits / T)` gives the renormalised pessimistic distribution)."""
        log_min, _h = pessimistic(self.member_logprobs(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids))
        return _Out(logits=log_min * self.temperature)

    @torch.no_grad()
    def pessimistic_full(self, query_ids, query_mask, response_ids, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised log p~ [B, Lr, V] and the help mass h [B, Lr] at every response position."""
        dev = next(self.parameters()).device
        ids, mask, positions = sequence_layout(*(t.to(dev) for t in (query_ids, query_mask, response_ids, response_mask)))
        lq, lr = query_ids.shape[1], response_ids.shape[1]
        members = self.member_logprobs(input_ids=ids, attention_mask=mask, position_ids=positions)
        return pessimistic(members[:, :, lq - 1 : lq - 1 + lr])


@dataclass
class _Out:
    logits: torch.Tensor
