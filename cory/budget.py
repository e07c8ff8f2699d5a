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


class LockstepLM:
    """A frozen causal LM that follows a generation token by token with its own KV cache and gives
    its tempered next-token log-distribution [B, V] after the prompt and after each token."""

    def __init__(self, lm: torch.nn.Module, temperature: float = 1.0):
        self.lm = lm
        self.temperature = temperature if temperature > 0 else 1.0

    @torch.no_grad()
    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        from cory.policy import position_ids_from_mask

        dev = next(self.lm.parameters()).device
        self.attention = query_mask.to(dev)
        positions = position_ids_from_mask(self.attention)
        out = self.lm(input_ids=query_ids.to(dev), attention_mask=self.attention, position_ids=positions, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = positions[:, -1:] + 1
        return torch.log_softmax(out.logits[:, -1].float() / self.temperature, dim=-1)

    @torch.no_grad()
    def advance(self, token: torch.Tensor) -> torch.Tensor:
        dev = next(self.lm.parameters()).device
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
        out = self.lm(input_ids=token[:, None].to(dev), attention_mask=self.attention,
                      position_ids=self.next_position, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = self.next_position + 1
        return torch.log_softmax(out.logits[:, -1].float() / self.temperature, dim=-1)


def lockstep(reference: torch.nn.Module, temperature: float = 1.0):
    """A lockstep follower of ``reference``: a plain LM, or an ensemble (see ``cory.ensemble``) whose
    follower returns the renormalised pessimistic distribution."""
    from cory.ensemble import EnsembleReference, LockstepEnsemble

    if isinstance(reference, EnsembleReference):
        return LockstepEnsemble(reference, temperature)
    return LockstepLM(reference, temperature)


class HardBudgetHook:
    """Enforces a per-row exact-KL budget during `Policy.generate`.

    reference: a frozen causal LM (same tokenizer as the policy) or an ensemble reference.
    budget_left: [B] nats left for each row (an episode's remainder in multi-turn use). After
    generation, `results(n)` gives the mixture weight of each sampled token, the exact KL spent and
    the reference's log-prob of each sampled token; `budget_left` [B] is what remains.
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
        cost = kl_rows(mixed, logp)
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
        return _stack(self.weights, steps, len(self.budget_left)), _stack(self.spent, steps, len(self.budget_left))

    def fallback_logprobs(self, steps: int) -> torch.Tensor:
        """[B, steps] the reference's log-prob of each sampled token (0 after a row ended)."""
        return _stack(self.fallback, steps, len(self.budget_left))


def _stack(columns: list[torch.Tensor], steps: int, rows: int) -> torch.Tensor:
    return torch.stack(columns[:steps], dim=1) if columns else torch.zeros(rows, 0)


def mixed_token_logprobs(policy_logprobs: torch.Tensor, fallback_logprobs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log(w q(x) + (1 - w) f(x)) of each sampled token x, from the policy's log q(x) (with gradient),
    the fallback's log f(x) and the mixture weight w recorded at sampling: the log-prob of the
    distribution a token was actually drawn from. w = 1 gives the policy's own; w = 0 no gradient."""
    w = weight.to(policy_logprobs.dtype)
    log_w = torch.log(w.clamp_min(0))
    log_1w = torch.log((1 - w).clamp_min(0))
    return torch.logaddexp(log_w + policy_logprobs, log_1w + fallback_logprobs.to(policy_logprobs.dtype))


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

    def record(self, hook: HardBudgetHook, live: list[int], steps: int, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the training step needs from one turn's hook; updates the episodes' budgets."""
        self.left[live] = hook.budget_left.cpu()
        w, spent = hook.results(steps)
        keep = mask.bool().cpu()
        return {"mix_weight": torch.where(keep, w.cpu(), torch.zeros(())),
                "fallback_logprobs": torch.where(keep, hook.fallback_logprobs(steps).cpu(), torch.zeros(())),
                "budget_spent": torch.where(keep, spent.cpu(), torch.zeros(()))}
