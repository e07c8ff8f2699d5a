"""KL divergence between the policy q and the reference p: estimators and coefficient controllers.

Estimators take per-token log-probs of the sampled tokens (x ~ q) and return a per-token estimate of
KL[q || p] at that position; with log r = log p(x) - log q(x) (Schulman, 2020):
    k1 = -log r              unbiased, high variance, can be negative
    k2 = (log r)^2 / 2       biased, low variance
    k3 = (r - 1) - log r     unbiased, never negative
Summed over a response's tokens they give the sequence (episode) KL. The exact KL over whole
distributions (`kl.estimator=full`) is `cory.drift.exact.kl_exact`, computed while scoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """[B, L] per-token k1 = log q(x) - log p(x)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """[B, L] per-token k2 = (log q(x) - log p(x))^2 / 2."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """[B, L] per-token k3 = exp(log p - log q) - 1 - (log p - log q)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def per_token_kl(estimator: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """[B, L] per-token KL of the sampled tokens by the named estimator (k1, k2, k3)."""
    return ESTIMATORS[estimator](logp, ref_logp)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is 1; over everything when dim is None."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


@dataclass
class FixedKL:
    """A constant coefficient."""

    beta: float

    def update(self, sequence_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


@dataclass
class AdaptiveKL:
    """Ziegler et al. (2019): move beta so that the mean sequence KL tracks `target`.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_samples / horizon).
    """

    beta: float
    target: float = 6.0
    horizon: int = 10000

    def update(self, sequence_kl: float, n_samples: int) -> None:
        if not math.isfinite(sequence_kl):
            return
        error = min(max(sequence_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


@dataclass
class BudgetKL:
    """Holds the mean episode KL at or under a budget by Lagrangian dual ascent.

    The problem max E[R] s.t. E[episode KL] <= budget has the Lagrangian E[R] - lam (E[KL] - budget);
    the multiplier follows lam <- max(0, lam + lr * (KL_hat - budget)) and is used as the penalty
    coefficient. It rises while episodes overspend and decays to 0 once they stay under budget.
    """

    beta: float
    budget: float = 6.0
    lr: float = 0.01

    def update(self, sequence_kl: float, n_samples: int) -> None:
        if math.isfinite(sequence_kl):
            self.beta = max(0.0, self.beta + self.lr * (sequence_kl - self.budget))

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


CONTROLLERS = {
    "fixed": lambda cfg: FixedKL(cfg.beta),
    "adaptive": lambda cfg: AdaptiveKL(cfg.beta, cfg.target, cfg.horizon),
    "budget": lambda cfg: BudgetKL(cfg.beta, cfg.budget, cfg.budget_lr),
}
"""`kl.controller` names -> the controller built from a `KLConfig`."""


def make_controller(cfg) -> FixedKL | AdaptiveKL | BudgetKL:
    """The controller named by a `KLConfig`."""
    if cfg.controller not in CONTROLLERS:
        raise ValueError(f"unknown KL controller {cfg.controller!r}")
    return CONTROLLERS[cfg.controller](cfg)
