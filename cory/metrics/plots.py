"""PNG plots of per-step curves for several agents, each with a 95% band (mean +- 1.96 SE over
environments)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cory.envs.records import EpisodeRecord
from cory.metrics.curves import coverage_curves, mean_ci, regret_curves


def plot_curves(
    curves: Mapping[str, np.ndarray],
    path: str | Path,
    title: str,
    ylabel: str,
    xlabel: str = "step",
) -> Path:
    """One line per name with its 95% band; curves[name] is [N, T] (N environments, T steps,
    NaN-padded). Steps are numbered from 1. Writes `path` (PNG) and returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()  # a Figure of its own: no pyplot state, no backend chosen for the process
    for name, values in curves.items():
        mean, half = mean_ci(np.atleast_2d(values))
        steps = np.arange(1, mean.shape[0] + 1)
        (line,) = ax.plot(steps, mean, lw=2, label=f"{name} (n={np.atleast_2d(values).shape[0]})")
        ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_regret(results: Mapping[str, Sequence[EpisodeRecord]], path: str | Path, title: str = "Cumulative regret") -> Path:
    """Cumulative regret curves of several agents (name -> their episode records)."""
    return plot_curves({k: regret_curves(v) for k, v in results.items()}, path, title, "cumulative regret")


def plot_coverage(results: Mapping[str, Sequence[EpisodeRecord]], path: str | Path, title: str = "Action coverage") -> Path:
    """Coverage C_t (fraction of actions tried by step t) of several agents."""
    return plot_curves({k: coverage_curves(v) for k, v in results.items()}, path, title, "coverage C_t")
