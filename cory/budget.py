"""A hard per-episode KL budget: no episode's exact KL from the reference may exceed B.

The agent spends its budget where it likes. At each token, with q the agent's (tempered) next-token
distribution and p the reference's, the exact KL(q || p) is what sampling from q would cost. If that
is within what is left, the token is sampled from q. Otherwise it is sampled from the mixture
m_w = w q + (1 - w) p whose exact KL(m_w || p) equals what is left; KL(m_w || p) is convex in w and
0 at w = 0, so it increases with w and a bisection finds w. Once the budget is spent, w = 0 and the
reference writes. The budget left decreases by the exact KL of the distribution actually sampled, so
an episode's total exact KL is at most B by construction, whatever the agent tries.

`HardBudgetHook` plugs into `Policy.generate(..., logits_hook=...)`: it runs the reference in lockstep
with its own KV cache, records the mixture weight of every token (the training step recomputes the
mixture's log-probs from it) and the exact KL spent.
"""

from __future__ import annotations

import torch


def kl_rows(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """[B] exact KL(q || p) from log-distributions [B, V] (terms with q = 0 contribute 0)."""
    q = logq.exp()
    return torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(-1)


def mixture_logprobs(logq: torch.Tensor, logp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[..., V] log(w q + (1 - w) p), stably; w broadcasts over the last axis ([...] or [..., 1])."""
    w = w.to(logq.dtype)
    if w.dim() == logq.dim() - 1:
        w = w.unsqueeze(-1)
    lw = torch.log(w.clamp_min(0))
    l1w = torch.log((1 - w).clamp_min(0))
    return torch.logaddexp(lw + logq, l1w + logp)


def mixture_weight(logq: torch.Tensor, logp: torch.Tensor, target: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """[B] the largest w in [0, 1] with KL(w q + (1 - w) p || p) <= target (equal to it when q overspends).

    Bisection on a function that increases with w; 60 halvings pin w to ~1e-18, far inside the 1e-6
    tolerance on the KL.
    """
    target = target.to(logq.dtype).clamp_min(0)
    full = kl_rows(logq, logp)
    lo = torch.zeros_like(target)
    hi = torch.ones_like(target)
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = kl_rows(mixture_logprobs(logq, logp, mid), logp) > target
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    return torch.where(full <= target, torch.ones_like(target), lo)


class HardBudgetHook:
    """Enforces a per-row exact-KL budget during `Policy.generate`.

    reference: a frozen causal LM (same tokenizer as the policy). budget_left: [B] nats left for each
    row (an episode's remainder in multi-turn use). After generation: `weights` [B, n] mixture weight
    of each sampled token, `spent` [B, n] exact KL of each sampled distribution, `budget_left` [B].
    """

    def __init__(self, reference: torch.nn.Module, budget_left: torch.Tensor, temperature: float = 1.0):
        self.reference = reference
        self.budget_left = budget_left.clone().float()
        self.temperature = temperature if temperature > 0 else 1.0
        self.weights: list[torch.Tensor] = []
        self.spent: list[torch.Tensor] = []

    @torch.no_grad()
    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> None:
        from cory.policy import position_ids_from_mask

        dev = next(self.reference.parameters()).device
        self.attention = query_mask.to(dev)
        positions = position_ids_from_mask(self.attention)
        out = self.reference(input_ids=query_ids.to(dev), attention_mask=self.attention, position_ids=positions, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = positions[:, -1:] + 1
        self.ref_logprobs = torch.log_softmax(out.logits[:, -1].float() / self.temperature, dim=-1)

    @torch.no_grad()
    def __call__(self, step: int, logprobs: torch.Tensor) -> torch.Tensor:
        logp = self.ref_logprobs.to(logprobs.device)
        left = self.budget_left.to(logprobs.device)
        w = mixture_weight(logprobs, logp, left)
        mixed = mixture_logprobs(logprobs, logp, w)
        cost = kl_rows(mixed, logp)
        self._pending = (w, cost.clamp_min(0))
        return mixed

    @torch.no_grad()
    def observe(self, step: int, token: torch.Tensor, alive: torch.Tensor) -> None:
        w, cost = self._pending
        cost = torch.where(alive, cost, torch.zeros_like(cost))
        self.budget_left = (self.budget_left.to(cost.device) - cost).clamp_min(0)
        self.weights.append(torch.where(alive, w, torch.zeros_like(w)))
        self.spent.append(cost)
        dev = next(self.reference.parameters()).device
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
        out = self.reference(input_ids=token[:, None].to(dev), attention_mask=self.attention,
                             position_ids=self.next_position, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = self.next_position + 1
        self.ref_logprobs = torch.log_softmax(out.logits[:, -1].float() / self.temperature, dim=-1)

    def results(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, steps] mixture weights, [B, steps] exact KL spent) for the generated tokens."""
        w = torch.stack(self.weights[:steps], dim=1) if self.weights else torch.zeros(len(self.budget_left), 0)
        s = torch.stack(self.spent[:steps], dim=1) if self.spent else torch.zeros(len(self.budget_left), 0)
        return w, s
