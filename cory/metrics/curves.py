"""Per-step curves over episodes: cumulative regret, action coverage, and their 95% intervals.

Curves are arrays [N, T]: N episodes (environments), T steps. Episodes of different lengths are
padded with NaN, and the interval helpers ignore NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from cory.envs.records import EpisodeRecord


def regret_from_means(actions: Sequence[int], means: Sequence[float]) -> np.ndarray:
    """[T] per-step expected regret max(means) - means[a_t] of the executed actions."""
    means = np.asarray(means, dtype=float)
    return means.max() - means[np.asarray(actions, dtype=int)]


def cumulative_regret(regrets: np.ndarray | Sequence[float]) -> np.ndarray:
    """[..., T] running sum of per-step regrets over the last axis: R_t = sum_{s<=t} regret_s."""
    return np.cumsum(np.asarray(regrets, dtype=float), axis=-1)


def coverage(actions: Sequence[int], n_actions: int) -> np.ndarray:
    """[T] C_t = |{a : N_t(a) > 0}| / |A| after each step t (fraction of actions tried so far)."""
    seen: set[int] = set()
    out = np.empty(len(actions))
    for t, a in enumerate(actions):
        seen.add(int(a))
        out[t] = len(seen) / n_actions
    return out


def pad_stack(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """[N, T_max] rows stacked, shorter rows padded with NaN."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def regret_curves(records: Sequence[EpisodeRecord]) -> np.ndarray:
    """[N, T] cumulative regret per episode (from the executed actions' expected regret)."""
    return pad_stack([cumulative_regret(r.regrets) for r in records])


def coverage_curves(records: Sequence[EpisodeRecord]) -> np.ndarray:
    """[N, T] coverage C_t per episode (over the executed actions)."""
    return pad_stack([coverage(r.executed, r.n_actions) for r in records])


T_95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
"""Two-sided 95% Student-t quantiles by sample size (more samples: `t_quantile`'s expansion)."""

T_975 = {2: 25.45, 3: 6.205, 4: 4.177, 5: 3.495, 6: 3.163, 7: 2.969, 8: 2.841, 9: 2.752, 10: 2.685}
"""Two-sided 97.5% Student-t quantiles by sample size: a 95% interval with Bonferroni's correction
over two comparisons."""

T_TABLES = {0.95: T_95, 0.975: T_975}


def t_quantile(level: float, n: int) -> float:
    """The two-sided `level` quantile of Student's t with n - 1 degrees of freedom: the table up to
    n = 10, beyond it the Cornish-Fisher expansion around the normal's quantile in powers of 1/df
    (four terms: within 1e-3 of the exact quantile from 10 degrees of freedom on)."""
    if level not in T_TABLES:
        raise ValueError(f"t_interval knows the levels {sorted(T_TABLES)}, not {level}")
    if n in T_TABLES[level]:
        return T_TABLES[level][n]
    z, v = NormalDist().inv_cdf((1 + level) / 2), n - 1
    terms = [(z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96, (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160]
    return z + sum(t / v ** (i + 1) for i, t in enumerate(terms))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of a two-sided t-interval at `level` (0.95, or 0.975: Bonferroni over two
    comparisons) over a few runs (seeds); NaN half-width for one value."""
    values = [float(v) for v in values]
    n = len(values)
    quantile = t_quantile(level, max(n, 2))
    mean = float(np.mean(values))
    if n < 2:
        return mean, float("nan")
    return mean, quantile * float(np.std(values, ddof=1)) / math.sqrt(n)


def mean_ci(values: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Mean over episodes and the half-width z * SE of a normal interval (z = 1.96: 95%).

    values: [N, T] (or [N]); NaN entries are ignored per column. Returns two arrays of shape [T] (or
    scalars). SE uses the sample standard deviation (ddof=1); with one episode the half-width is 0.
    """
    values = np.asarray(values, dtype=float)
    n = np.sum(~np.isnan(values), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        half = z * np.where(n > 1, std / np.sqrt(n), 0.0)
    return mean, half


def bandit_summary(records: Sequence[EpisodeRecord]) -> dict[str, float]:
    """The numbers a bandit evaluation reports: final cumulative regret (mean, 95% half-width),
    final coverage, valid-action rate and mean return, over the N episodes."""
    final_regret = np.array([r.total_regret for r in records])
    final_cov = np.array([coverage(r.executed, r.n_actions)[-1] for r in records])
    regret_mean, regret_ci = mean_ci(final_regret)
    return {
        "episodes": len(records),
        "regret": float(regret_mean),
        "regret_ci95": float(regret_ci),
        "coverage": float(final_cov.mean()),
        "valid_rate": float(np.mean([r.valid_rate for r in records])),
        "return": float(np.mean([r.total_reward for r in records])),
    }
