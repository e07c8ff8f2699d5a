"""A pessimistic ensemble reference: "don't do anything I *mightn't* do" (Cohen et al., 2024).

K reference models (same recipe, different seeds or data shards) give next-token distributions p_k.
The pessimistic reference takes the pointwise minimum, p~(x) = min_k p_k(x): a semi-distribution
whose missing mass h = 1 - sum_x p~(x) is the probability of asking for help. Because p~ <= p_k for
every member, KL(q || p~) = sum_x q(x) log(q(x) / p~(x)) >= KL(q || p_k) for every k: a budget
against p~ implies the same budget against any plausible model. The renormalised p~ / (1 - h) is a
proper distribution; both KLs are logged.

`EnsembleReference` is a drop-in reference for the Learner: its forward returns log p~ as "logits",
so `sequence_logprobs(..., temperature=T)` of it yields the *renormalised* pessimistic log-probs,
while `pessimistic_logprobs` gives the unnormalised ones and h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pessimistic(member_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """member_logprobs [K, ..., V] -> (log p~ [..., V] unnormalised, h [...] missing mass in [0, 1])."""
    log_min = member_logprobs.min(dim=0).values
    h = (1.0 - log_min.exp().sum(-1)).clamp(0.0, 1.0)
    return log_min, h


def kl_to_semi(logq: torch.Tensor, log_semi: torch.Tensor) -> torch.Tensor:
    """[...] KL(q || p~) = sum_x q(x) (log q(x) - log p~(x)) against a semi-distribution."""
    q = logq.exp()
    return torch.where(q > 0, q * (logq - log_semi), torch.zeros_like(q)).sum(-1)


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


@dataclass
class _Out:
    logits: torch.Tensor


@torch.no_grad()
def pessimistic_logprobs(ensemble: EnsembleReference, query_ids, query_mask, response_ids, response_mask) -> dict[str, torch.Tensor]:
    """Per response token: unnormalised log p~ of the token [B, Lr], the renormalised one [B, Lr], the
    help mass h [B, Lr], and each member's log-prob of the token [K, B, Lr]. Masked positions are 0."""
    from cory.policy import position_ids_from_mask

    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    lq, lr = query_ids.shape[1], response_ids.shape[1]
    members = ensemble.member_logprobs(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    members = members[:, :, lq - 1 : lq - 1 + lr]  # the positions that predict response tokens
    log_min, h = pessimistic(members)
    token = response_ids[None, ..., None].expand(members.shape[0], -1, -1, 1)
    member_tok = members.gather(-1, token)[..., 0]
    semi_tok = log_min.gather(-1, response_ids[..., None])[..., 0]
    renorm_tok = semi_tok - torch.log1p(-h.clamp(max=1 - 1e-12))
    keep = response_mask.bool()
    zero = torch.zeros_like(semi_tok)
    return {
        "semi": torch.where(keep, semi_tok, zero),
        "renormalised": torch.where(keep, renorm_tok, zero),
        "help": torch.where(keep, h, zero),
        "members": torch.where(keep[None], member_tok, torch.zeros_like(member_tok)),
    }
