"""`cory report DIR`: PNG plots of a run's curves and a one-screen summary.

For a run in a text environment (`env.id` in its config.yaml) the report also plays the initial model,
the trained one (`final/`) and the environment's classical baselines (`BASELINES`) on the same
evaluation instances, plots cumulative regret and action coverage per step (95% bands) where regret
is defined, and tabulates regret, coverage, valid-action rate, return and win/draw/loss.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from cory.build import eval_params
from cory.config import load_config
from cory.evaluate import episode_metrics, play_agent, play_policy
from cory.metrics import plot_coverage, plot_regret
from cory.policy import Policy


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


def _number(value) -> float:
    """A logged value as a float (a non-finite one was logged as null)."""
    return float("nan") if value is None else float(value)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes DIR/plots/reward.png and DIR/plots/kl.png (train curves, smoothed, plus evaluations)."""
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
        fig = Figure(figsize=(6.4, 4.0))  # a Figure of its own: no pyplot state, no backend chosen for the process
        ax = fig.subplots()
        if "pioneer/task_reward" in rows[0]:
            # CORY: one curve per role (training) and per agent (standalone evaluation).
            role_key = "task_reward" if key == "reward_mean" else "kl_mean"
            for role, color in (("pioneer", "tab:blue"), ("observer", "tab:green")):
                ys = [_number(r[f"{role}/{role_key}"]) for r in rows]
                ax.plot(its, _smooth(ys, window), color=color, lw=2, label=f"{role} (train, mean of {window})")
            for agent, color in (("a", "tab:orange"), ("b", "tab:red")):
                pts = [(e["iteration"], e[f"{agent}/{eval_key}"]) for e in evals if f"{agent}/{eval_key}" in e]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=color, lw=1.5, label=f"agent {agent} alone (eval)")
        else:
            ys = [_number(r[key]) for r in rows]
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
        written.append(path)
    return written


def summary_text(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    lines = [f"run: {run_dir}  iterations: {rows[-1]['iteration'] if rows else 0}"]
    if evals and "a/reward_mean" in evals[-1]:
        return "\n".join(lines + cory_table(rows, evals))
    if evals:
        lines.append(f"{'eval at':>10} {'reward':>10} {'KL':>10} {'length':>8} {'EOS':>6}")
        for e in (evals[0], evals[-1]) if len(evals) > 1 else evals:
            lines.append(f"{e['iteration']:>10} {e['reward_mean']:>10.3f} {e.get('kl_mean', float('nan')):>10.3f} {e['response_length']:>8.1f} {e['eos_rate']:>6.2f}")
        for s in evals[-1].get("samples", [])[:3]:
            lines.append(f"  sample: {s['prompt']!r} -> {s['response']!r}")
    return "\n".join(lines)


def cory_table(rows: list[dict], evals: list[dict]) -> list[str]:
    """Initial model vs each CORY agent answering alone: reward, KL, a sample each."""
    first, last = evals[0], evals[-1]
    pioneer_is_a = bool(rows[-1].get("pioneer_is_a", 1.0)) if rows else True
    role = {"a": "pioneer" if pioneer_is_a else "observer", "b": "observer" if pioneer_is_a else "pioneer"}
    out = [f"{'model':<42} {'reward':>8} {'KL':>8} {'length':>7} {'EOS':>5}  sample"]

    def sample(e, agent):
        mine = [s for s in e.get("samples", []) if s.get("agent") == agent]
        return f"{mine[0]['prompt']!r} -> {mine[0]['response']!r}" if mine else ""

    out.append(f"{'initial model':<42} {first['a/reward_mean']:>8.3f} {0.0:>8.3f} {first['a/response_length']:>7.1f} "
               f"{first['a/eos_rate']:>5.2f}  {sample(first, 'a')}")
    for agent in ("a", "b"):
        name = f"agent {agent} ({role[agent]} at the end)" + (" *final*" if last.get("best_agent") == agent else "")
        out.append(f"{name:<42} {last[f'{agent}/reward_mean']:>8.3f} {last.get(f'{agent}/kl_mean', float('nan')):>8.3f} "
                   f"{last[f'{agent}/response_length']:>7.1f} {last[f'{agent}/eos_rate']:>5.2f}  {sample(last, agent)}")
    return out


BASELINES = {
    "cory/Bandit-v0": ("ucb1", "random"),
    "cory/ContextualBandit-v0": ("linucb", "random"),
    "cory/TicTacToe-v0": ("minimax", "random"),
}
"""The classical agents a model is compared with in each environment."""


def is_env_run(run_dir: str | Path) -> bool:
    """Whether the run in `run_dir` trained in a text environment (its config.yaml sets env.id)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return False
    return bool(load_config(path).env.id)


def env_report(run_dir: str | Path, episodes: int | None = None) -> tuple[list[Path], list[str]]:
    """Plays the initial and the trained model and the baselines in the run's environment (`episodes`
    each, default env.eval_episodes; the evaluation instances of eval.seed, with the evaluation's
    sampling settings). Writes DIR/plots/regret.png and DIR/plots/coverage.png when the environment
    has a regret, and returns (written paths, table lines)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    final = run_dir / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"no trained model in {final}")
    n = episodes or cfg.env.eval_episodes
    env_id, kwargs, seed = cfg.env.id, dict(cfg.env.kwargs), cfg.eval.seed
    records = {}
    for name, path in ((f"initial ({cfg.model.name})", cfg.model.name), ("trained (final/)", str(final))):
        policy = Policy.from_pretrained(path)
        records[name], _ = play_policy(policy, env_id, kwargs, n, eval_params(cfg), seed, cfg.env.max_turns)
    for agent in BASELINES.get(env_id, ("random",)):
        records[agent] = play_agent(agent, env_id, kwargs, n, seed)
    metrics = {name: episode_metrics(recs) for name, recs in records.items()}
    written = []
    if all("regret_mean" in m for m in metrics.values()):
        title = f"{env_id} {kwargs}"
        written.append(plot_regret(records, run_dir / "plots" / "regret.png", title=f"Cumulative regret: {title}"))
        written.append(plot_coverage(records, run_dir / "plots" / "coverage.png", title=f"Action coverage: {title}"))
    (run_dir / "env_report.json").write_text(json.dumps({"env": env_id, "env_kwargs": kwargs, "seed": seed, "agents": metrics},
                                                        indent=2))
    written.append(run_dir / "env_report.json")
    return written, env_table(metrics, n)


def env_table(metrics: dict[str, dict], episodes: int) -> list[str]:
    """One row per agent: final regret (± 95%), coverage, valid-action rate, return, and outcomes for games."""
    header = f"agent ({episodes} episodes)"
    lines = [f"{header:<34} {'regret':>15} {'coverage':>9} {'valid':>6} {'return':>8} {'win/draw/loss':>15}"]
    for name, m in metrics.items():
        regret = f"{m['regret_mean']:.2f} ± {m['regret_ci95']:.2f}" if "regret_mean" in m else "-"
        cov = f"{m['coverage_final']:.3f}" if "coverage_final" in m else "-"
        games = f"{m['win_rate']:.2f}/{m['draw_rate']:.2f}/{m['loss_rate']:.2f}" if "win_rate" in m else "-"
        lines.append(f"{name:<34} {regret:>15} {cov:>9} {m['valid_rate']:>6.3f} {m['env_return_mean']:>8.2f} {games:>15}")
    return lines
