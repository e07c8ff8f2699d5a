"""Paired comparisons of two arms evaluated on the same prompts under several training seeds: a
two-level bootstrap of the mean difference, Holm's correction over a family of tests, and the
three-word verdicts ("supported", "contradicted", "inconclusive") of a directional or
non-inferiority claim.

The differences come as an array [seeds, prompts]: one row per training seed (both arms trained
with it), one column per evaluation prompt (both arms answered it). The bootstrap resamples seeds
with replacement and, inside every drawn seed, prompts with replacement, so that the interval
carries the variation between training runs as well as between prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass(frozen=True)
class Paired:
    """A bootstrapped mean difference: its estimate, the percentile interval at `level`, the
    two-sided bootstrap p-value of "no difference", and the number of seeds and prompts."""

    mean: float
    low: float
    high: float
    p: float
    level: float
    seeds: int
    prompts: int

    def show(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_bootstrap(diffs, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Paired:
    """The mean of `diffs` [seeds, prompts] with its two-level bootstrap interval and p-value.

    p = min(1, 2 * min(P*(mean <= 0), P*(mean >= 0))) over the bootstrap means P*. With one seed
    only prompts are resampled."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"paired_bootstrap takes differences [seeds, prompts]; got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("paired_bootstrap: the differences hold a non-finite value")
    s, n = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, size=(n_boot, s))
    prompts = rng.integers(0, n, size=(n_boot, s, n))
    boot = d[seeds[:, :, None], prompts].mean(axis=(1, 2))
    tail = (1.0 - level) / 2
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    p = min(1.0, 2.0 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return Paired(float(d.mean()), float(low), float(high), p, level, s, n)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the k-th smallest of m p-values is
    multiplied by m - k + 1 (k from 1), made non-decreasing along the sorted order, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def directional_verdict(est: Paired, claim: int, p_adjusted: float, alpha: float = 0.05) -> str:
    """A claim that the difference is positive (`claim` = +1) or negative (-1): supported where the
    (adjusted) p-value is below `alpha` and the estimate points the claim's way, contradicted where
    it is below `alpha` and points the other way, inconclusive otherwise."""
    if claim not in (1, -1):
        raise ValueError("claim is +1 (the difference is positive) or -1 (negative)")
    if p_adjusted >= alpha:
        return INCONCLUSIVE
    return SUPPORTED if np.sign(est.mean) == claim else CONTRADICTED


def noninferiority_verdict(est: Paired, margin: float) -> str:
    """"The first arm is not worse than the second by more than `margin`" (higher is better):
    supported where the interval's lower end is above -margin, contradicted where its upper end is
    below -margin (worse by more than the margin), inconclusive otherwise."""
    if margin <= 0:
        raise ValueError("a non-inferiority margin is positive")
    if est.low > -margin:
        return SUPPORTED
    if est.high < -margin:
        return CONTRADICTED
    return INCONCLUSIVE
