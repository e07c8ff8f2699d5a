"""Game results: win / draw / loss rates over finished episodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cory.envs.records import EpisodeRecord


def outcome_rates(results: Sequence[EpisodeRecord] | Sequence[float]) -> dict[str, float]:
    """Fractions of wins (+1), draws (0) and losses (-1), the mean return, and the episode count.

    results: episode records (their `outcome`) or the outcomes themselves. Episodes without an
    outcome (unfinished) are an error: a rate over a mix would be silently wrong.
    """
    outcomes = [r.outcome if isinstance(r, EpisodeRecord) else r for r in results]
    if any(o is None for o in outcomes):
        raise ValueError("some episodes have no outcome (not finished); rates need finished games")
    o = np.asarray(outcomes, dtype=float)
    if o.size == 0:
        raise ValueError("no episodes")
    return {
        "win": float(np.mean(o > 0)),
        "draw": float(np.mean(o == 0)),
        "loss": float(np.mean(o < 0)),
        "return": float(o.mean()),
        "episodes": int(o.size),
    }
