"""Drift control on the teacher-student environment: penalty vs Lagrangian vs hard budget vs ensemble.

The agent (`cory:tiny-dialogue`) writes the teacher's turns of a conversation; the frozen base model
writes the student's replies; the reward of each reply is its positive-sentiment probability. Every
run trains REINFORCE for `--iterations` iterations of `--episodes` episodes under one way of holding
drift, at a budget B (nats of exact KL per episode):

- penalty: a fixed per-token KL penalty in the reward, beta = PENALTY_SCALE / B;
- lagrangian: the budget controller (dual ascent) holding the mean episode KL at B;
- hard: no episode's exact KL may exceed B (`kl.hard_budget`);
- ensemble: the hard budget against the pessimistic ensemble of the base model and the same recipe
  trained from another seed (`model.reference_ensemble`).

Then the trained agent plays `--eval-episodes` fresh episodes (under its run's control) and the
benchmark records: task reward per episode, exact episode KL (against the run's reference), the
share of near-empty student replies (at most one word), the share of teacher turns with formatting
changes, the mean help mass h of the pessimistic reference (the ensemble's probability of asking for
help), and the first transcript. The same runs are repeated with episodes twice as long (512 tokens
instead of 256) at the first budget, for the penalty and the hard budget (``--long-conditions``).

    python benchmarks/kl_budget.py [--budgets 4 16] [--seeds 0 1 2] [--iterations 10] [--quick]
Writes benchmarks/results/kl_budget.{json,md} and kl_budget.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from cory.advantages import episode_sums
from cory.config import load_config
from cory.metrics import t_interval
from cory.metrics.training import episode_kl_metrics
from cory.train import TrainingRun

matplotlib.use("Agg")

RESULTS = Path(__file__).parent / "results"
ENV = "cory/TeacherStudent-v0"
POLICY = "cory:tiny-dialogue"
CONDITIONS = ["penalty", "lagrangian", "hard", "ensemble"]
PENALTY_SCALE = 0.5
"""penalty's beta is PENALTY_SCALE / B: a tighter budget, a larger coefficient."""
BASE = [f"model.name={POLICY}", f"env.id={ENV}", "algo.name=reinforce", "algo.baseline=mean", "algo.gamma=1.0",
        "algo.lr=3e-4", "generation.max_new_tokens=24", "generation.stop_strings=[\\n]", "kl.estimator=k1",
        "train.log_with=[]", "train.progress=false", "env.eval_episodes=4", "train.eval_every=0"]




def overrides(condition: str, budget: float, seed: int, iterations: int, episodes: int, max_tokens: int) -> list[str]:
    by_condition = {
        "penalty": [f"kl.beta={PENALTY_SCALE / budget:g}"],
        "lagrangian": ["kl.controller=budget", f"kl.budget={budget:g}", "kl.beta=0.0", "kl.budget_lr=0.05"],
        "hard": [f"kl.hard_budget={budget:g}", "kl.beta=0.0"],
        "ensemble": [f"kl.hard_budget={budget:g}", "kl.beta=0.0", f"model.reference_ensemble=[{POLICY},{POLICY}@seed1]"],
    }[condition]
    return BASE + by_condition + [f"train.seed={seed}", f"train.iterations={iterations}", f"train.batch_size={episodes}",
                                  f"env.kwargs={{max_tokens: {max_tokens}}}"]


def replies(rollout) -> list[dict]:
    return [info for info in rollout.infos if info.get("replied", True)]


def run_one(condition: str, budget: float, seed: int, iterations: int, episodes: int, eval_episodes: int,
            max_tokens: int, train: bool = True) -> dict:
    """Train one run (unless ``train`` is False: the initial model) and evaluate it on fresh episodes."""
    cfg = load_config(None, overrides(condition, budget, seed, max(iterations, 1), episodes, max_tokens))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run = TrainingRun(cfg, out)
        rows = []
        if train:
            run.run()
            rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        wall = time.perf_counter() - t0
        # Fresh episodes under the run's own control (its budget, its reference).
        rollout = run.sampler.collect(eval_episodes, np.random.default_rng(10_000 + seed),
                                      torch.Generator().manual_seed(10_000 + seed))
        scored, _ = run.learner.score(rollout)
        kl = episode_kl_metrics(scored)
        turns = replies(scored)
        transcripts = [info["transcript"] for info in scored.infos if "transcript" in info]
        help_mass = scored.scored.help_mass
        mask = scored.response_mask.float()
    returns = episode_sums(scored.scores.float(), scored.episode_ids)
    return {
        "condition": condition, "budget": budget, "seed": seed, "max_tokens": max_tokens, "wall_s": wall,
        "reward": float(returns.mean()),
        "episode_kl": kl["episode_kl/exact_mean"], "episode_kl_max": kl["episode_kl/exact_max"],
        "near_empty": statistics.fmean(float(t.get("reply_near_empty", False)) for t in turns) if turns else float("nan"),
        "formatting": statistics.fmean(float(t.get("teacher_formatting", False)) for t in turns) if turns else float("nan"),
        "help": float((help_mass * mask).sum() / mask.sum()) if help_mass is not None else float("nan"),
        "turns": len(scored) / len(returns),
        "transcript": transcripts[0] if transcripts else "",
        "curve": [{"iteration": r["iteration"], "reward": r["reward_mean"],
                   "kl": r.get("episode_kl/exact_mean", r["kl_mean"])} for r in rows],
    }


METRICS = [("reward", "reward / episode"), ("episode_kl", "exact episode KL"), ("near_empty", "near-empty replies"),
           ("formatting", "formatting changes"), ("help", "help mass h"), ("turns", "turns / episode")]


def table(runs: list[dict]) -> list[str]:
    lines = ["| episode tokens | budget | condition | " + " | ".join(label for _, label in METRICS) + " | train time (s) |",
             "|---" * (len(METRICS) + 4) + "|"]
    keys = sorted({(r["max_tokens"], r["budget"], r["condition"]) for r in runs},
                  key=lambda k: (k[0], k[1], (["initial"] + CONDITIONS).index(k[2])))
    for tokens, budget, condition in keys:
        mine = [r for r in runs if (r["max_tokens"], r["budget"], r["condition"]) == (tokens, budget, condition)]
        cells = []
        for key, _ in METRICS + [("wall_s", "")]:
            values = [r[key] for r in mine if not math.isnan(r[key])]
            if not values:
                cells.append("-")
                continue
            mean, half = t_interval(values)
            cells.append(f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}"))
        lines.append(f"| {tokens} | {budget:g} | {condition} | " + " | ".join(cells) + " |")
    return lines


def contrast(runs: list[dict], key: str, a: dict, b: dict) -> tuple[float, float, int]:
    """Mean and 95% half-width of (a - b) in ``key``, paired by seed."""
    def pick(sel):
        return {r["seed"]: r[key] for r in runs if all(r[k] == v for k, v in sel.items())}

    xa, xb = pick(a), pick(b)
    diffs = [xa[s] - xb[s] for s in sorted(set(xa) & set(xb)) if not (math.isnan(xa[s]) or math.isnan(xb[s]))]
    if not diffs:
        return float("nan"), float("nan"), 0
    mean, half = t_interval(diffs)
    return mean, half, len(diffs)


def fmt(mean: float, half: float) -> str:
    return f"{mean:+.3f} ± {half:.3f}" if not math.isnan(half) else f"{mean:+.3f}"


def findings(runs: list[dict], budgets: list[float]) -> list[str]:
    short = min(r["max_tokens"] for r in runs)
    initial = {r["seed"]: r for r in runs if r["condition"] == "initial"}
    lines = ["## Findings", ""]
    # (a) degenerate tricks under a budget: near-empty replies and formatting above the initial model's.
    lines.append("**(a) Under a budget the agent learns degenerate tricks (silencing the student, formatting changes).**")
    for budget in budgets:
        for condition in ("hard", "lagrangian", "penalty"):
            sel = {"condition": condition, "budget": budget, "max_tokens": short}
            if not any(all(r[k] == v for k, v in sel.items()) for r in runs):
                continue
            d_empty = contrast(runs, "near_empty", sel, {"condition": "initial", "max_tokens": short})
            d_fmt = contrast(runs, "formatting", sel, {"condition": "initial", "max_tokens": short})
            d_rew = contrast(runs, "reward", sel, {"condition": "initial", "max_tokens": short})
            lines.append(f"- B={budget:g}, {condition}: near-empty replies {fmt(*d_empty[:2])}, formatting changes "
                         f"{fmt(*d_fmt[:2])}, reward {fmt(*d_rew[:2])} against the initial model (paired by seed).")
    held = [contrast(runs, "near_empty", {"condition": "hard", "budget": b, "max_tokens": short},
                     {"condition": "initial", "max_tokens": short}) for b in budgets]
    yes = any(m - h > 0 for m, h, n in held if n and not math.isnan(h))
    lines.append(f"- Verdict: {'holds' if yes else 'does not hold'} here — "
                 + ("the share of near-empty student replies rises significantly under the hard budget."
                    if yes else "no significant rise of near-empty replies under the hard budget at these settings.")
                 if initial else "- Verdict: no initial-model baseline was measured.")
    lines.append("")
    # (b) longer episodes at the same budget drift further.
    long = max(r["max_tokens"] for r in runs)
    lines.append(f"**(b) Longer episodes ({long} vs {short} tokens) at the same budget drift further from the reference.**")
    b0 = budgets[0]
    any_long = False
    for condition in CONDITIONS:
        d = contrast(runs, "episode_kl", {"condition": condition, "budget": b0, "max_tokens": long},
                     {"condition": condition, "budget": b0, "max_tokens": short})
        if d[2]:
            any_long = True
            d_empty = contrast(runs, "near_empty", {"condition": condition, "budget": b0, "max_tokens": long},
                               {"condition": condition, "budget": b0, "max_tokens": short})
            lines.append(f"- B={b0:g}, {condition}: exact episode KL {fmt(*d[:2])} nats, near-empty replies {fmt(*d_empty[:2])}.")
    if any_long:
        rows = [contrast(runs, "episode_kl", {"condition": c, "budget": b0, "max_tokens": long},
                         {"condition": c, "budget": b0, "max_tokens": short}) for c in ("penalty", "lagrangian")]
        yes = any(m - h > 0 for m, h, n in rows if n and not math.isnan(h))
        lines.append(f"- Verdict: {'holds' if yes else 'does not hold'} here for the soft controls (penalty, Lagrangian) — "
                     "the hard budget caps every episode at B by construction, so there only the behaviour can differ.")
    lines.append("")
    # (c) the pessimistic ensemble vs the plain hard budget.
    lines.append("**(c) The pessimistic ensemble reduces the tricks at equal reward.**")
    verdicts = []
    for budget in budgets:
        sel_e = {"condition": "ensemble", "budget": budget, "max_tokens": short}
        sel_h = {"condition": "hard", "budget": budget, "max_tokens": short}
        d_empty, d_fmt, d_rew = (contrast(runs, k, sel_e, sel_h) for k in ("near_empty", "formatting", "reward"))
        if not d_empty[2]:
            continue
        lines.append(f"- B={budget:g}: ensemble - hard budget: near-empty replies {fmt(*d_empty[:2])}, formatting "
                     f"{fmt(*d_fmt[:2])}, reward {fmt(*d_rew[:2])}.")
        fewer = d_empty[0] + d_empty[1] < 0 or d_fmt[0] + d_fmt[1] < 0
        equal_reward = abs(d_rew[0]) <= d_rew[1] or d_rew[0] > 0
        verdicts.append(fewer and equal_reward)
    lines.append(f"- Verdict: {'holds' if verdicts and any(verdicts) else 'does not hold'} here"
                 + (" (significantly fewer tricks at a reward not significantly lower)." if verdicts and any(verdicts)
                    else " (no significant reduction of the tricks at equal reward)."))
    return lines


def initial_runs(seeds: list[int], eval_episodes: int, max_tokens_list: list[int]) -> list[dict]:
    """The base model itself on the same evaluation episodes (zero iterations, no control)."""
    out = []
    for tokens in max_tokens_list:
        for seed in seeds:
            run = run_one("penalty", 1e9, seed, 1, 2, eval_episodes, tokens, train=False)
            run.update(condition="initial", budget=0.0)
            out.append(run)
    return out


def plot(runs: list[dict], path: Path) -> None:
    short = min(r["max_tokens"] for r in runs)
    budgets = sorted({r["budget"] for r in runs if r["condition"] != "initial"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for condition in CONDITIONS:
        for b in budgets:
            mine = [r for r in runs if r["condition"] == condition and r["budget"] == b and r["max_tokens"] == short]
            if not mine:
                continue
            its = [p["iteration"] for p in mine[0]["curve"]]
            for ax, key in zip(axes[:2], ("reward", "kl")):
                ys = [statistics.fmean(r["curve"][i][key] for r in mine) for i in range(len(its))]
                ax.plot(its, ys, label=f"{condition} B={b:g}")
    for ax, title in zip(axes[:2], ("training reward / episode", "exact episode KL")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    labels, empties, errs = [], [], []
    for condition in ["initial"] + CONDITIONS:
        for b in ([0.0] if condition == "initial" else budgets):
            mine = [r["near_empty"] for r in runs if r["condition"] == condition and r["budget"] == b and r["max_tokens"] == short]
            if mine:
                mean, half = t_interval(mine)
                labels.append(condition if condition == "initial" else f"{condition}\nB={b:g}")
                empties.append(mean)
                errs.append(0 if math.isnan(half) else half)
    axes[2].bar(range(len(labels)), empties, yerr=errs)
    axes[2].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[2].set_title("near-empty student replies (evaluation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.0, 16.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--episodes", type=int, default=6, help="training episodes per iteration")
    ap.add_argument("--eval-episodes", type=int, default=8)
    ap.add_argument("--conditions", nargs="+", default=CONDITIONS, choices=CONDITIONS)
    ap.add_argument("--long-conditions", nargs="+", default=["penalty", "hard"], choices=CONDITIONS,
                    help="conditions also run with episodes twice as long (at the first budget)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other conditions' runs from the existing results and replace only these conditions'")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 iterations, 1 seed, one budget")
    args = ap.parse_args()
    if args.quick:
        args.budgets, args.seeds, args.iterations, args.episodes, args.eval_episodes = [4.0], [0], 2, 2, 2
    out_dir = Path(tempfile.mkdtemp()) if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs = initial_runs(args.seeds, args.eval_episodes, [256, 512])
    plan = [(c, b, s, 256) for b in args.budgets for c in args.conditions for s in args.seeds]
    plan += [(c, args.budgets[0], s, 512) for c in args.long_conditions if c in args.conditions for s in args.seeds]
    for i, (condition, budget, seed, tokens) in enumerate(plan, 1):
        run = run_one(condition, budget, seed, args.iterations, args.episodes, args.eval_episodes, tokens)
        runs.append(run)
        print(f"[{i}/{len(plan)}] {condition:10s} B={budget:<4g} tokens={tokens} seed={seed}: reward {run['reward']:.3f} "
              f"KL {run['episode_kl']:.2f} near-empty {run['near_empty']:.2f} formatting {run['formatting']:.2f} "
              f"({run['wall_s']:.0f} s)", flush=True)
    total = time.perf_counter() - t_start
    if args.merge and (out_dir / "kl_budget.json").exists():
        old = json.loads((out_dir / "kl_budget.json").read_text())
        kept = [r for r in old["runs"] if r["condition"] not in args.conditions and r["condition"] != "initial"]
        runs = kept + runs
        total += old.get("wall_s", 0.0)
    (out_dir / "kl_budget.json").write_text(json.dumps({"settings": vars(args), "runs": runs, "wall_s": total}, indent=1))
    plot(runs, out_dir / "kl_budget.png")
    lines = [f"# Drift control on the teacher-student environment ({args.iterations} iterations x {args.episodes} episodes, "
             f"seeds {args.seeds})", "",
             f"Policy and student `{POLICY}`; reward = the reply's positive-sentiment probability; REINFORCE (mean "
             f"baseline, gamma 1, lr 3e-4); penalty beta = {PENALTY_SCALE} / B; evaluation on {args.eval_episodes} fresh "
             "episodes per run under the run's own control; mean ± 95% interval over seeds. Wall time of the whole "
             f"benchmark: {total / 60:.1f} min (one thread).", "", *table(runs), "", *findings(runs, args.budgets), "",
             "## Sample transcripts (seed 0, evaluation)", ""]
    for r in runs:
        if r["seed"] == args.seeds[0] and r["transcript"]:
            lines += [f"**{r['condition']}, B={r['budget']:g}, {r['max_tokens']} tokens** (reward {r['reward']:.2f}, "
                      f"KL {r['episode_kl']:.2f})", "", "```", r["transcript"].strip()[:1200], "```", ""]
    (out_dir / "kl_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(table(runs)))
    print("\n".join(findings(runs, args.budgets)))
    print(f"wrote {out_dir / 'kl_budget.md'}")


if __name__ == "__main__":
    main()
