"""`cory report DIR`: PNG plots of a run's curves and a one-screen summary."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes DIR/plots/reward.png and DIR/plots/kl.png (train curves, smoothed, plus evaluations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl rows in {run_dir}")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    its = [r["iteration"] for r in rows]
    window = max(1, len(rows) // 20)
    written = []
    for key, eval_key, title, ylabel in (
        ("reward_mean", "reward_mean", "Task reward", "mean reward"),
        ("kl_mean", "kl_mean", "KL to the reference (sum over response tokens)", "nats"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ys = [r[key] for r in rows]
        ax.plot(its, ys, color="tab:blue", alpha=0.3, lw=1, label="train (per iteration)")
        ax.plot(its, _smooth(ys, window), color="tab:blue", lw=2, label=f"train (mean of {window})")
        pts = [(e["iteration"], e[eval_key]) for e in evals if eval_key in e]
        if pts:
            ax.plot(*zip(*pts), "o-", color="tab:orange", lw=1.5, label="eval (fixed prompts)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{'reward' if key == 'reward_mean' else 'kl'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary_text(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    lines = [f"run: {run_dir}  iterations: {rows[-1]['iteration'] if rows else 0}"]
    if evals:
        lines.append(f"{'eval at':>10} {'reward':>10} {'KL':>10} {'length':>8} {'EOS':>6}")
        for e in (evals[0], evals[-1]) if len(evals) > 1 else evals:
            lines.append(f"{e['iteration']:>10} {e['reward_mean']:>10.3f} {e.get('kl_mean', float('nan')):>10.3f} {e['response_length']:>8.1f} {e['eos_rate']:>6.2f}")
        for s in evals[-1].get("samples", [])[:3]:
            lines.append(f"  sample: {s['prompt']!r} -> {s['response']!r}")
    return "\n".join(lines)
