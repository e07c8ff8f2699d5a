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

from cory.drift.control import ControlOutput, stack_columns
from cory.drift.exact import kl_exact, mixture_logprobs
from cory.drift.lockstep import lockstep


def mixture_weight(logq: torch.Tensor, logp: torch.Tensor, target: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """[B] the largest w in [0, 1] with KL(w q + (1 - w) p || p) <= target (equal to it when q overspends).

    Bisection on a function that increases with w; 60 halvings pin w to ~1e-18, far inside the 1e-6
    tolerance on the KL.
    """
    target = target.to(logq.dtype).clamp_min(0)
    full = kl_exact(logq, logp)
    lo = torch.zeros_like(target)
    hi = torch.ones_like(target)
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = kl_exact(mixture_logprobs(logq, logp, mid), logp) > target
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    return torch.where(full <= target, torch.ones_like(target), lo)


class HardBudgetHook:
    """Enforces a per-row exact-KL budget during `Policy.generate`.

    reference: a frozen causal LM (same tokenizer as the policy) or an ensemble reference.
    budget_left: [B] nats left for each row (an episode's remainder in multi-turn use). After
    generation, `results(n)` gives the mixture weight of each sampled token and the exact KL spent,
    `fallback_logprobs(n)` the reference's log-prob of each sampled token; `budget_left` [B] is what
    remains.
    """

    def __init__(self, reference: torch.nn.Module, budget_left: torch.Tensor, temperature: float = 1.0):
        self.follower = lockstep(reference, temperature)
        self.budget_left = budget_left.clone().float()
        self.weights: list[torch.Tensor] = []
        self.spent: list[torch.Tensor] = []
        self.fallback: list[torch.Tensor] = []

    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> None:
        self.ref_logprobs = self.follower.start(query_ids, query_mask)

    @torch.no_grad()
    def __call__(self, step: int, logprobs: torch.Tensor) -> torch.Tensor:
        logp = self.ref_logprobs.to(logprobs.device)
        left = self.budget_left.to(logprobs.device)
        w = mixture_weight(logprobs, logp, left)
        mixed = mixture_logprobs(logprobs, logp, w)
        cost = kl_exact(mixed, logp)
        self._pending = (w, cost.clamp_min(0), logp)
        return mixed

    @torch.no_grad()
    def observe(self, step: int, token: torch.Tensor, alive: torch.Tensor) -> None:
        w, cost, logp = self._pending
        cost = torch.where(alive, cost, torch.zeros_like(cost))
        self.budget_left = (self.budget_left.to(cost.device) - cost).clamp_min(0)
        self.weights.append(torch.where(alive, w, torch.zeros_like(w)))
        self.spent.append(cost)
        self.fallback.append(torch.where(alive, logp.gather(-1, token[:, None].to(logp.device))[:, 0], torch.zeros_like(w)))
        self.ref_logprobs = self.follower.advance(token)

    def results(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, steps] mixture weights, [B, steps] exact KL spent) for the generated tokens."""
        rows = len(self.budget_left)
        return stack_columns(self.weights, steps, rows), stack_columns(self.spent, steps, rows)

    def fallback_logprobs(self, steps: int) -> torch.Tensor:
        """[B, steps] the reference's log-prob of each sampled token (0 after a row ended)."""
        return stack_columns(self.fallback, steps, len(self.budget_left))


class EpisodeBudget:
    """The hard budget across an episode's turns, for the Sampler: each episode starts with
    ``budget`` nats; every turn spends from what its episode has left.

    With ``note`` the agent is told the budget left (a first line of its observation); the time left is
    the environment's to tell (the teacher-student environment shows the tokens left)."""

    def __init__(self, reference: torch.nn.Module, budget: float, temperature: float = 1.0, note: bool = False):
        self.reference = reference
        self.budget = float(budget)
        self.temperature = temperature
        self.note = note
        self.left = torch.zeros(0)

    def reset(self, n: int) -> None:
        self.left = torch.full((n,), self.budget)

    def annotate(self, observations: list[str], live: list[int]) -> list[str]:
        if not self.note:
            return list(observations)
        # At the start: an observation may end with an open tag the agent's reply must follow.
        return [f"[KL budget left: {float(self.left[e]):.2f} of {self.budget:g} nats]\n{o}" for o, e in zip(observations, live)]

    def hook(self, live: list[int]) -> HardBudgetHook:
        return HardBudgetHook(self.reference, self.left[live], self.temperature)

    def record(self, hook: HardBudgetHook, live: list[int], steps: int, mask: torch.Tensor) -> ControlOutput:
        """What the training step needs from one turn's hook; updates the episodes' budgets."""
        self.left[live] = hook.budget_left.cpu()
        w, _spent = hook.results(steps)
        keep = mask.bool().cpu()
        return ControlOutput(mix_weight=torch.where(keep, w.cpu(), torch.zeros(())),
                             fallback_logprobs=torch.where(keep, hook.fallback_logprobs(steps).cpu(), torch.zeros(())))
