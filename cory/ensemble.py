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


def _member_response_logprobs(ensemble: EnsembleReference, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """[K, B, Lr, V] each member's log-distribution at the positions that predict response tokens."""
    from cory.policy import position_ids_from_mask

    dev = next(ensemble.parameters()).device
    ids = torch.cat([query_ids, response_ids], dim=1).to(dev)
    mask = torch.cat([query_mask, response_mask], dim=1).long().to(dev)
    lq, lr = query_ids.shape[1], response_ids.shape[1]
    members = ensemble.member_logprobs(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return members[:, :, lq - 1 : lq - 1 + lr]


@torch.no_grad()
def pessimistic_full(ensemble: EnsembleReference, query_ids, query_mask, response_ids, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised log p~ [B, Lr, V] and the help mass h [B, Lr] at every response position."""
    return pessimistic(_member_response_logprobs(ensemble, query_ids, query_mask, response_ids, response_mask))


@torch.no_grad()
def pessimistic_logprobs(ensemble: EnsembleReference, query_ids, query_mask, response_ids, response_mask) -> dict[str, torch.Tensor]:
    """Per response token: unnormalised log p~ of the token [B, Lr], the renormalised one [B, Lr], the
    help mass h [B, Lr], and each member's log-prob of the token [K, B, Lr]. Masked positions are 0."""
    members = _member_response_logprobs(ensemble, query_ids, query_mask, response_ids, response_mask)
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


class LockstepEnsemble:
    """Follows a generation with every member's KV cache (see ``cory.budget.LockstepLM``); returns
    the renormalised pessimistic log-distribution [B, V] and keeps the help mass ``h`` [B]."""

    def __init__(self, ensemble: EnsembleReference, temperature: float = 1.0):
        from cory.budget import LockstepLM

        self.members = [LockstepLM(m, temperature) for m in ensemble.members]

    def _combine(self, member_logprobs: list[torch.Tensor]) -> torch.Tensor:
        log_min, self.h = pessimistic(torch.stack(member_logprobs))
        return log_min - torch.log1p(-self.h.clamp(max=1 - 1e-12))[:, None]

    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        return self._combine([m.start(query_ids, query_mask) for m in self.members])

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        return self._combine([m.advance(token) for m in self.members])


class HelpHook:
    """Asking for help during `Policy.generate`: where the pessimistic ensemble's missing mass h
    exceeds ``threshold``, the token is sampled from the trusted policy instead of the agent (scope
    "turn": the trusted policy then writes the rest of the response). Records, per token, whether
    help was asked and the trusted policy's log-prob of the sampled token, so that training uses the
    log-prob of the distribution the token was actually drawn from."""

    def __init__(self, ensemble: EnsembleReference, trusted: torch.nn.Module, threshold: float,
                 scope: str = "token", temperature: float = 1.0):
        from cory.budget import LockstepLM

        self.ensemble = LockstepEnsemble(ensemble, temperature)
        self.trusted = LockstepLM(trusted, temperature)
        self.threshold = threshold
        self.scope = scope
        self.asked: list[torch.Tensor] = []
        self.fallback: list[torch.Tensor] = []
        self.h: list[torch.Tensor] = []

    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> None:
        self.ensemble.start(query_ids, query_mask)
        self.trusted_logprobs = self.trusted.start(query_ids, query_mask)
        self.deferred = torch.zeros(len(query_ids), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, step: int, logprobs: torch.Tensor) -> torch.Tensor:
        h = self.ensemble.h.to(logprobs.device)
        ask = (h > self.threshold) | self.deferred.to(logprobs.device)
        trusted = self.trusted_logprobs.to(logprobs.device)
        self._pending = (ask, trusted, h)
        return torch.where(ask[:, None], trusted, logprobs)

    @torch.no_grad()
    def observe(self, step: int, token: torch.Tensor, alive: torch.Tensor) -> None:
        ask, trusted, h = self._pending
        ask = ask & alive
        if self.scope == "turn":
            self.deferred = self.deferred.to(ask.device) | ask
        self.asked.append(ask)
        self.h.append(torch.where(alive, h, torch.zeros_like(h)))
        self.fallback.append(torch.where(alive, trusted.gather(-1, token[:, None].to(trusted.device))[:, 0], torch.zeros_like(h)))
        self.ensemble.advance(token)
        self.trusted_logprobs = self.trusted.advance(token)

    def results(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, steps] each: help asked (bool), the trusted log-prob of the token, the help mass h."""
        from cory.budget import _stack

        rows = len(self.deferred)
        return _stack(self.asked, steps, rows), _stack(self.fallback, steps, rows), _stack(self.h, steps, rows)


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

    def record(self, hook: HelpHook, live: list[int], steps: int, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        asked, fallback, _h = hook.results(steps)
        keep = mask.bool().cpu()
        asked = asked.cpu() & keep
        return {"mix_weight": (~asked & keep).float(), "fallback_logprobs": torch.where(keep, fallback.cpu(), torch.zeros(())),
                "help": asked.float()}
