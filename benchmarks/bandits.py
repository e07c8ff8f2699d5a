"""`cory:tiny-agent` in text bandits and tic-tac-toe, before and after RL fine-tuning, next to UCB1 and
random.

Bandits: 64 Gaussian bandits (10 arms, sigma 1, button variant, horizon 50), rendered as the agent
corpus renders them (no chain of thought, the last 10 steps of history). Per seed s: random and UCB1
play the evaluation instances of seed s; the pretrained model plays them (and answers 100
frequency-bias probes); the model fine-tuned with training seed s (`cory.train.TrainingRun`,
`cory/Bandit-v0`, REINFORCE with the Monte-Carlo baseline on rewards-to-go) plays them too.
Reported per agent: cumulative regret after 50 steps and action coverage at step 50 (means over the
64 bandits), F_f of the probe; the table shows the median over seeds with a 95% t-interval of the
mean, and ratios against the pretrained model measured in the same run (paired by seed).

Tic-tac-toe: the agent moves first against a random opponent; return (+1 / 0 / -1) of the
pretrained model and of the model fine-tuned on `cory/TicTacToe-v0` per seed, over `--games` games.

    python benchmarks/bandits.py [--seeds 0 1 2] [--iterations 22] [--ttt-iterations 40] [--quick]
Writes benchmarks/results/bandits.{json,md} and bandits_{regret,coverage,frequency}.png (--quick:
bandits_quick.*; a smoke run of a minute or two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from cory.metrics import t_interval as interval

RESULTS = Path(__file__).parent / "results"
MODEL = "cory:tiny-agent"
BANDIT = "cory/Bandit-v0"
TICTACTOE = "cory/TicTacToe-v0"
TTT_KWARGS = {"cot": False}
GOALS = {"regret_cut": 0.30, "coverage_gain": 0.12, "ttt_return": 0.75}

# Fine-tuning. Bandits: REINFORCE with the Monte-Carlo baseline (the mean return of the batch's turns
# at the same step) on discounted rewards-to-go, a small exploration bonus, and the paper's pool of
# 512 training bandits; gamma < 1 keeps each step's advantage about its own reward and the next few,
# which the noise of 50 rewards at sigma 1 would otherwise drown.
BANDIT_TRAIN = {
    "env.pool_size": 512, "train.batch_size": 8, "algo.name": "reinforce", "algo.baseline": "mean",
    "algo.gamma": 0.5, "algo.lr": 5e-4, "algo.minibatch_size": 100, "kl.beta": 0.01,
}
BANDIT_TRAIN_ENV = {"exploration_bonus": 0.5, "reward_norm": "standard"}
# Tic-tac-toe: the same estimator on undiscounted rewards-to-go (a turn's return holds the game's
# outcome and the penalties of its later invalid moves). The discount also applies between the
# tokens of a turn while the baseline is taken at its first token, so with gamma < 1 the <eos> token
# carries the raw -5 of invalid moves and is pushed down until answers stop ending.
TTT_TRAIN = {
    "train.batch_size": 32, "algo.name": "reinforce", "algo.baseline": "mean", "algo.gamma": 1.0,
    "algo.lr": 1e-4, "algo.minibatch_size": 64, "kl.beta": 0.05,
}
COMMON_TRAIN = {"generation.max_new_tokens": 6, "env.eval_episodes": 1, "train.log_with": "[]", "train.progress": False,
                "eval.temperature": 1.0}




def cell(values: list[float], fmt: str = ".2f") -> str:
    """`median (mean ± 95% half-width)` of per-seed values."""
    mean, half = interval(values)
    return f"{statistics.median(values):{fmt}} ({mean:{fmt}} ± {half:{fmt}})"


def bandit_kwargs() -> dict:
    from cory.envs import transcripts

    return {**transcripts.env_kwargs(10), "sigma": 1.0}


def sampling():
    from cory.policy import SamplingParams

    return SamplingParams(max_new_tokens=COMMON_TRAIN["generation.max_new_tokens"], temperature=1.0)


def evaluate_model(path: str, seed: int, episodes: int, probes: int, games: int, bandit: bool = True, ttt: bool = True) -> dict:
    """A model's bandit metrics (records kept for the curves), frequency-bias probe and tic-tac-toe
    return on the evaluation instances of `seed`."""
    from cory.evaluate import episode_metrics, play_policy
    from cory.metrics.model_probes import frequency_bias_probe
    from cory.policy import Policy

    policy = Policy.from_pretrained(path)
    out: dict = {}
    if bandit:
        records, _ = play_policy(policy, BANDIT, bandit_kwargs(), episodes, sampling(), seed)
        out.update(bandit_row(records))
        probe, _ = frequency_bias_probe(policy, probes, seed, bandit_kwargs())
        out["probe"] = probe
        out["F_f"] = probe["F_f"]
    if ttt:
        records, _ = play_policy(policy, TICTACTOE, TTT_KWARGS, games, sampling(), seed)
        m = episode_metrics(records)
        out["ttt"] = {k: m[k] for k in ("env_return_mean", "win_rate", "draw_rate", "loss_rate", "valid_rate")}
    return out


def bandit_row(records) -> dict:
    from cory.evaluate import episode_metrics
    from cory.metrics import coverage_curves, regret_curves

    m = episode_metrics(records)
    return {"regret": m["regret_mean"], "coverage": m["coverage_final"], "valid_rate": m["valid_rate"],
            "regret_curve": regret_curves(records).mean(0).tolist(), "coverage_curve": coverage_curves(records).mean(0).tolist(),
            "_records": records}


def fine_tune(env_id: str, env_kwargs: dict, settings: dict, seed: int, iterations: int, out: str) -> dict:
    """One RL fine-tuning run of the zoo model; returns its wall and CPU seconds and last metrics."""
    from cory.config import load_config
    from cory.train import TrainingRun

    overrides = {**COMMON_TRAIN, **settings, "model.name": MODEL, "env.id": env_id,
                 "env.kwargs": json.dumps(env_kwargs), "train.seed": seed, "train.iterations": iterations}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    t0, c0 = time.perf_counter(), time.process_time()
    TrainingRun(cfg, out).run()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "train_reward": [r["reward_mean"] for r in rows], "train_kl": [r["kl_mean"] for r in rows]}


LABELS = {"random": "random", "UCB1": "UCB1", "before": "tiny-agent pretrained", "after": "tiny-agent fine-tuned"}


def plots(pooled: dict, probes: dict, stem: str, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cory.metrics import plot_coverage, plot_regret

    paths = [plot_regret(pooled, RESULTS / f"{stem}_regret.png", title=f"Cumulative regret, {title}"),
             plot_coverage(pooled, RESULTS / f"{stem}_coverage.png", title=f"Action coverage, {title}")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in probes.items():
        xs = [f"{r['repeats_from']}-{r['repeats_to']}" for r in rows]
        axes[0].plot(xs, [r["F_f"] for r in rows], "o-", label=name)
        axes[1].plot(xs, [r["entropy"] for r in rows], "o-", label=name)
    axes[0].set_ylabel("F_f (top action is the most frequent)")
    axes[1].set_ylabel("action entropy (nats)")
    for ax in axes:
        ax.set_xlabel("times the last action was repeated")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Frequency-bias probe (pooled over seeds)")
    fig.tight_layout()
    path = RESULTS / f"{stem}_frequency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*paths, path]


def pooled_by_repeats(summaries: list[dict]) -> list[dict]:
    """Per repeat bin, the probe-weighted means of F_f and entropy over several probe summaries."""
    bins: dict[tuple, list] = {}
    for s in summaries:
        for r in s["by_repeats"]:
            bins.setdefault((r["repeats_from"], r["repeats_to"]), []).append(r)
    out = []
    for (lo, hi), rows in sorted(bins.items()):
        n = sum(r["probes"] for r in rows)
        out.append({"repeats_from": lo, "repeats_to": hi, "probes": n,
                    "F_f": sum(r["F_f"] * r["probes"] for r in rows) / n,
                    "entropy": sum(r["entropy"] * r["probes"] for r in rows) / n})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=22, help="bandit fine-tuning iterations (8 episodes each)")
    ap.add_argument("--ttt-iterations", type=int, default=40, help="tic-tac-toe fine-tuning iterations (32 games each)")
    ap.add_argument("--episodes", type=int, default=64, help="bandits per evaluation")
    ap.add_argument("--probes", type=int, default=100, help="frequency-bias probes per evaluation")
    ap.add_argument("--games", type=int, default=200, help="tic-tac-toe games per evaluation")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one seed, 2 iterations, small evaluations")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.iterations, args.ttt_iterations = args.seeds[:1], 2, 2
        args.episodes, args.probes, args.games = 8, 10, 16
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from cory import zoo
    from cory.evaluate import play_agent

    start, cpu_start = time.perf_counter(), time.process_time()
    base = str(zoo.resolve(MODEL, progress=False))
    runs: dict[str, list[dict]] = {"random": [], "UCB1": [], "before": [], "after": []}
    training = []
    for seed in args.seeds:
        for name, agent_name in (("random", "random"), ("UCB1", "ucb1")):
            runs[name].append({"seed": seed, **bandit_row(play_agent(agent_name, BANDIT, bandit_kwargs(), args.episodes, seed))})
        runs["before"].append({"seed": seed, **evaluate_model(base, seed, args.episodes, args.probes, args.games)})
        with tempfile.TemporaryDirectory() as bandit_dir, tempfile.TemporaryDirectory() as ttt_dir:
            bandit_run = fine_tune(BANDIT, {**bandit_kwargs(), **BANDIT_TRAIN_ENV}, BANDIT_TRAIN, seed, args.iterations, bandit_dir)
            ttt_run = fine_tune(TICTACTOE, TTT_KWARGS, TTT_TRAIN, seed, args.ttt_iterations, ttt_dir)
            after = evaluate_model(str(Path(bandit_dir) / "final"), seed, args.episodes, args.probes, args.games, ttt=False)
            after["ttt"] = evaluate_model(str(Path(ttt_dir) / "final"), seed, args.episodes, args.probes, args.games,
                                          bandit=False)["ttt"]
        runs["after"].append({"seed": seed, **after})
        training.append({"seed": seed, "bandit": bandit_run, "tictactoe": ttt_run})
        b, a = runs["before"][-1], runs["after"][-1]
        print(f"seed {seed}: regret {b['regret']:.2f} -> {a['regret']:.2f} (UCB1 {runs['UCB1'][-1]['regret']:.2f}, random "
              f"{runs['random'][-1]['regret']:.2f}); coverage {b['coverage']:.3f} -> {a['coverage']:.3f}; F_f {b['F_f']:.2f} -> "
              f"{a['F_f']:.2f}; tic-tac-toe return {b['ttt']['env_return_mean']:.3f} -> {a['ttt']['env_return_mean']:.3f}; "
              f"fine-tuning {bandit_run['wall_s']:.0f} s + {ttt_run['wall_s']:.0f} s", flush=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    RESULTS.mkdir(exist_ok=True)
    stem = "bandits_quick" if args.quick else "bandits"
    pooled = {LABELS[name]: [rec for r in rows for rec in r["_records"]] for name, rows in runs.items()}
    probe_rows = {LABELS[name]: pooled_by_repeats([r["probe"] for r in runs[name]]) for name in ("before", "after")}
    written = plots(pooled, probe_rows, stem, f"{args.episodes} bandits x {len(args.seeds)} seeds")

    def values(name, key):
        return [r[key] for r in runs[name]]

    regret_ratio = [a["regret"] / b["regret"] for a, b in zip(runs["after"], runs["before"])]
    coverage_gain = [a["coverage"] - b["coverage"] for a, b in zip(runs["after"], runs["before"])]
    vs_ucb = [a["regret"] / u["regret"] for a, u in zip(runs["after"], runs["UCB1"])]
    vs_random = [a["regret"] / r["regret"] for a, r in zip(runs["after"], runs["random"])]
    before_vs_ucb = [b["regret"] / u["regret"] for b, u in zip(runs["before"], runs["UCB1"])]
    ttt_before = [r["ttt"]["env_return_mean"] for r in runs["before"]]
    ttt_after = [r["ttt"]["env_return_mean"] for r in runs["after"]]
    goals = {
        "regret_cut": {"goal": f">= {GOALS['regret_cut']:.0%}", "measured": 1 - statistics.median(regret_ratio),
                       "met": 1 - statistics.median(regret_ratio) >= GOALS["regret_cut"]},
        "coverage_gain": {"goal": f">= {GOALS['coverage_gain'] * 100:.0f} points", "measured": statistics.median(coverage_gain),
                          "met": statistics.median(coverage_gain) >= GOALS["coverage_gain"]},
        "ttt_return": {"goal": f">= {GOALS['ttt_return']}", "measured": statistics.median(ttt_after),
                       "met": statistics.median(ttt_after) >= GOALS["ttt_return"]},
    }
    setup = (
        f"{args.episodes} Gaussian bandits per seed (10 arms, sigma 1, button variant, horizon 50, no chain of thought, "
        f"last 10 steps shown), {args.probes} frequency-bias probes and {args.games} tic-tac-toe games (agent first, random "
        "opponent) per model and seed; models sample at temperature 1. Fine-tuning: bandits "
        f"{args.iterations} iterations x 8 episodes ({', '.join(f'{k}={v}' for k, v in BANDIT_TRAIN.items())}, "
        f"{BANDIT_TRAIN_ENV}); tic-tac-toe {args.ttt_iterations} iterations x 32 games "
        f"({', '.join(f'{k}={v}' for k, v in TTT_TRAIN.items())}). Cells: median over seeds (mean ± 95% interval)."
    )
    lines = [
        f"# cory:tiny-agent before and after RL fine-tuning (seeds {args.seeds})", "", setup, "",
        "| agent | cumulative regret | coverage at step 50 | F_f | valid actions | tic-tac-toe return |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("random", "UCB1", "before", "after"):
        label = {"before": "tiny-agent, pretrained", "after": "tiny-agent, fine-tuned"}.get(name, name)
        f_f = cell(values(name, "F_f")) if name in ("before", "after") else "-"
        ttt = cell([r["ttt"]["env_return_mean"] for r in runs[name]], ".3f") if name in ("before", "after") else "-"
        lines.append(f"| {label} | {cell(values(name, 'regret'))} | {cell(values(name, 'coverage'), '.3f')} | {f_f} | "
                     f"{cell(values(name, 'valid_rate'), '.3f')} | {ttt} |")
    lines += [
        "", "Ratios against the pretrained model (paired by seed), and against UCB1 and random:", "",
        (f"- regret after / before: {cell(regret_ratio, '.3f')}; after / UCB1: {cell(vs_ucb, '.3f')}; after / random: "
         f"{cell(vs_random, '.3f')}; before / UCB1: {cell(before_vs_ucb, '.3f')}"),
        f"- coverage after - before: {cell(coverage_gain, '.3f')}",
        f"- tic-tac-toe return before {cell(ttt_before, '.3f')}, after {cell(ttt_after, '.3f')}", "",
        "| goal | target | measured (median) | met |", "|---|---|---|---|",
    ]
    for key, g in goals.items():
        lines.append(f"| {key} | {g['goal']} | {g['measured']:.3f} | {'yes' if g['met'] else 'no'} |")
    lines += ["", f"Wall time {wall:.0f} s, CPU time {cpu:.0f} s (one thread; load average {os.getloadavg()[0]:.1f} at the end)."]
    result = {
        "args": vars(args), "wall_s": wall, "cpu_s": cpu, "goals": goals, "training": training,
        "settings": {"bandit_train": BANDIT_TRAIN, "bandit_train_env": BANDIT_TRAIN_ENV, "ttt_train": TTT_TRAIN,
                     "common": COMMON_TRAIN, "bandit_env": bandit_kwargs(), "ttt_env": TTT_KWARGS},
        "runs": {name: [{k: v for k, v in r.items() if k != "_records"} for r in rows] for name, rows in runs.items()},
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("wrote " + ", ".join(str(p) for p in [RESULTS / f"{stem}.json", RESULTS / f"{stem}.md", *written]))


if __name__ == "__main__":
    main()
