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

`--model real`: the same questions for `cory:smollm2-135m-instruct`, cut to fit about an hour of one
core. Prompts are chat turns after one example turn that shows the answer format; evaluation is greedy
(stage `bandit` also evaluates at temperature 1).
Stage `probes`: the untrained model plays Gaussian bandits (5/10/20 arms, button and continuous, with
and without chain of thought, horizon 50, the last 5 steps shown) next to UCB1 and random, answers
frequency-bias and knowing-doing probes; the report puts the paper's Gemma2 figures beside it. Coverage
is judged on the arms the model named in valid answers: an invalid answer executes a random arm, so
executed coverage measures that fallback where answers are often invalid (the continuous variant), and
the button and continuous variants are never averaged. Stage `ttt`: PPO (value head + GAE) on
tic-tac-toe against a random opponent. Stages can run in separate invocations; each merges its results
into the report.

Stage `bandit` is a pilot and its result, declared here before the runs (issue 24):
- Task: 5-armed Gaussian bandits (button variant, sigma 1, horizon 10, the last 5 steps shown, no chain
  of thought), training instances from a pool of 512, the -5 invalid-action penalty, an exploration bonus
  of 1 for a valid answer naming an arm not yet executed, rewards standardised (`REAL_BANDIT_ENV`).
- Training (`REAL_BANDIT_TRAIN`): REINFORCE with the Monte-Carlo baseline (the batch's mean return of the
  turns at the same step), rewards-to-go discounted once per environment step (algo.turn_gamma 0.5) and
  not within a turn (algo.gamma 1: the committed run's algo.gamma 0.5 discounted token by token, so a
  turn's reward reached the first tokens of its answer at 0.5^5, about 3%), kl.beta 0.05, LoRA r 16 on
  the top 4 decoder layers (model.trainable_layers=4: the frozen trunk runs once per sequence), the
  shared prompt prefix run once, 4 episodes an iteration in 2 optimizer steps of 2 episodes,
  `PILOT_ITERATIONS` (16) iterations, seed 0, one thread (train.num_threads=1). A tiny run measured 62-74
  s an iteration here (the committed run: 212 s).
- Evaluation: 32 held-out bandits (the evaluation pool of seed 0, disjoint from the training pool), played
  by the untrained and the fine-tuned model on the same instances with the same sampling seed, at
  temperature 1 (as training samples) and greedy (as the paper evaluates).
- Primary endpoint: the mean shaped episode return (what training maximises: standardised reward, bonus
  and penalty) at temperature 1, fine-tuned minus untrained, paired by held-out instance; SE = the paired
  differences' standard deviation / sqrt(32). The pilot passes where the difference exceeds 2 SE.
- Settings tried in order, every run reported: run 1 at lr 1e-3; only if it fails, run 2 at lr 3e-4
  where run 1's last training KL exceeded 2 nats (it moved without learning), else at lr 3e-3 (it barely
  moved). At most two runs: each costs about 20 minutes of one thread.
- The stage's result is the passing run itself (nothing is run twice); where no run passes, the last run
  tried, marked as not passing.
- Claims, on the differences paired by held-out bandit, with the project's paired bootstrap
  (`cory.metrics.stats`: one training seed, so the bandits are resampled; 95% percentile interval,
  bootstrap p-value) and its three verdicts "supported", "contradicted", "inconclusive": "fine-tuning
  raised the reward" on the primary endpoint; secondary, with Holm's correction over them: "lowered
  regret" (greedy, the paper's evaluation; and at temperature 1), "raised the share of arms it named"
  (greedy; temperature 1), "raised the share of valid answers" (temperature 1; greedy), "raised the
  greedy shaped return". Where the pilot did not pass nothing was learned, and no claim is "supported":
  those verdicts read "inconclusive". (This bullet was amended after the first run started and before
  any of its results: the claims first used normal intervals and p-values; the pass rule is unchanged.)
- Probes after fine-tuning as well as before: the frequency-bias (16) and knowing-doing (16, chain of
  thought, 96 tokens) probes of stage `probes`' 5-armed button cell (horizon 50), on the untrained and
  the fine-tuned model, the same probes (same seed, same histories), with paired per-probe differences.

    python benchmarks/bandits.py --model real [--stages probes bandit ttt report] [--quick]
Writes benchmarks/results/bandits_real.{json,md}, bandits_real_{coverage,frequency}.png and
bandits_real_ft_{regret,coverage}.png (--quick: bandits_real_quick.*). The committed report came from

    python benchmarks/bandits.py --model real --fresh --stages probes --cot 0
    python benchmarks/bandits.py --model real --stages probes --cot 1 --arms 10 20 --variants button --kd-arms
    python benchmarks/bandits.py --model real --stages ttt --ttt-iterations 10 --ttt-batch 8 --games 32
    python benchmarks/bandits.py --model real --stages bandit
    python benchmarks/bandits.py --model real --stages probes --cot 0 --variants continuous --kd-arms
    python benchmarks/bandits.py --model real --stages report
(the probes 29 minutes of one thread on a loaded machine; the tic-tac-toe stage ran side by side with
other benchmarks, at one thread on each of the two cores; the bandit stage 27 minutes at one thread
beside other runs. The fifth line measured the continuous cells again for the arms they named: every
other column repeated the first measurement exactly. The wall and CPU times of every stage are in the
report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import yaml

from cory import zoo
from cory.config import load_config
from cory.envs import transcripts
from cory.envs.bandit import arm_labels, render_bandit_prompt
from cory.envs.prompts import PromptOptions
from cory.evaluate import episode_metrics, play_agent, play_policy
from cory.generation.sampling import SamplingParams
from cory.metrics import coverage, coverage_curves, plot_coverage, plot_curves, plot_regret, regret_curves
from cory.metrics import t_interval as interval
from cory.metrics.model_probes import frequency_bias_probe, knowing_doing_probe
from cory.metrics.stats import INCONCLUSIVE, SUPPORTED, directional_verdict, holm, paired_bootstrap
from cory.policy import Policy
from cory.train import TrainingRun

matplotlib.use("Agg")

RESULTS = Path(__file__).parent / "results"
MODEL = "cory:tiny-agent"
BANDIT = "cory/Bandit-v0"
TICTACTOE = "cory/TicTacToe-v0"
TTT_KWARGS = {"cot": False}
GOALS = {"regret_cut": 0.30, "coverage_gain": 0.12, "ttt_return": 0.75}

# Fine-tuning. Bandits: REINFORCE with the Monte-Carlo baseline (the mean return of the batch's turns
# at the same step) on discounted rewards-to-go, a small exploration bonus, and the paper's pool of
# 512 training bandits; gamma < 1 keeps each step's advantage about its own reward and the next few,
# which the noise of 50 rewards at sigma 1 would otherwise drown. Minibatches hold whole episodes:
# 2 of the 8 (100 turns, the size the committed results used when minibatches counted turns).
BANDIT_TRAIN = {
    "env.pool_size": 512, "train.batch_size": 8, "algo.name": "reinforce", "algo.baseline": "mean",
    "algo.gamma": 0.5, "algo.lr": 5e-4, "algo.minibatch_size": 2, "kl.beta": 0.01,
}
BANDIT_TRAIN_ENV = {"exploration_bonus": 0.5, "reward_norm": "standard"}
# Tic-tac-toe: the same estimator on undiscounted rewards-to-go (a turn's return holds the game's
# outcome and the penalties of its later invalid moves). The discount also applies between the
# tokens of a turn while the baseline is taken at its first token, so with gamma < 1 the <eos> token
# carries the raw -5 of invalid moves and is pushed down until answers stop ending. Minibatches of
# 16 whole games (about the 64 turns the committed results used when minibatches counted turns).
TTT_TRAIN = {
    "train.batch_size": 32, "algo.name": "reinforce", "algo.baseline": "mean", "algo.gamma": 1.0,
    "algo.lr": 1e-4, "algo.minibatch_size": 16, "kl.beta": 0.05,
}
COMMON_TRAIN = {"generation.max_new_tokens": 6, "env.eval_episodes": 1, "train.log_with": "[]", "train.progress": False,
                "eval.temperature": 1.0}




def cell(values: list[float], fmt: str = ".2f") -> str:
    """`median (mean ± 95% half-width)` of per-seed values."""
    mean, half = interval(values)
    return f"{statistics.median(values):{fmt}} ({mean:{fmt}} ± {half:{fmt}})"


def bandit_kwargs() -> dict:
    return {**transcripts.env_kwargs(10), "sigma": 1.0}


def sampling():
    return SamplingParams(max_new_tokens=COMMON_TRAIN["generation.max_new_tokens"], temperature=1.0)


def evaluate_model(path: str, seed: int, episodes: int, probes: int, games: int, bandit: bool = True, ttt: bool = True) -> dict:
    """A model's bandit metrics (records kept for the curves), frequency-bias probe and tic-tac-toe
    return on the evaluation instances of `seed`."""
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
    m = episode_metrics(records)
    return {"regret": m["regret_mean"], "coverage": m["coverage_final"], "valid_rate": m["valid_rate"],
            "regret_curve": regret_curves(records).mean(0).tolist(), "coverage_curve": coverage_curves(records).mean(0).tolist(),
            "_records": records}


def fine_tune(env_id: str, env_kwargs: dict, settings: dict, seed: int, iterations: int, out: str) -> dict:
    """One RL fine-tuning run of the zoo model; returns its wall and CPU seconds and last metrics."""
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
    ap.add_argument("--iterations", type=int, help="bandit fine-tuning iterations (tiny: 22 of 8 episodes; real: 16 of 4)")
    ap.add_argument("--ttt-iterations", type=int, help="tic-tac-toe fine-tuning iterations (tiny: 40 of 32 games; real: 4)")
    ap.add_argument("--episodes", type=int, help="bandits per evaluation (tiny: 64; real: 32 held out)")
    ap.add_argument("--probes", type=int, help="frequency-bias probes per evaluation (tiny: 100; real: 16 per cell)")
    ap.add_argument("--games", type=int, help="tic-tac-toe games per evaluation (tiny: 200; real: 16)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one seed, 2 iterations, small evaluations")
    ap.add_argument("--model", choices=("tiny", "real"), default="tiny",
                    help="tiny: cory:tiny-agent (the defaults above); real: cory:smollm2-135m-instruct (the options below)")
    real = ap.add_argument_group("--model real")
    real.add_argument("--stages", nargs="+", default=["probes", "bandit", "ttt"], choices=["probes", "bandit", "ttt", "report"],
                      help="what to run (report: only rewrite the report); the results of stages run before stay in it")
    real.add_argument("--fresh", action="store_true", help="start the report afresh (drop earlier stages' results)")
    real.add_argument("--arms", type=int, nargs="+", default=[5, 10, 20], help="probe cells: arm counts")
    real.add_argument("--variants", nargs="+", default=["button", "continuous"], choices=["button", "continuous"])
    real.add_argument("--cot", type=int, nargs="+", default=[0, 1], choices=[0, 1], help="probe cells: without (0) / with (1) chain of thought")
    real.add_argument("--horizon", type=int, default=50, help="probe bandits' horizon")
    real.add_argument("--history", type=int, default=5, help="history window shown to the model")
    real.add_argument("--probe-episodes", type=int, default=4, help="bandits per probe cell")
    real.add_argument("--answer-tokens", type=int, default=8, help="answer budget without chain of thought")
    real.add_argument("--cot-tokens", type=int, default=48, help="answer budget with chain of thought")
    real.add_argument("--kd-arms", type=int, nargs="*", default=[5, 10], help="knowing-doing probe: arm counts")
    real.add_argument("--kd-probes", type=int, default=16)
    real.add_argument("--kd-tokens", type=int, default=96)
    real.add_argument("--train-arms", type=int, default=5)
    real.add_argument("--train-horizon", type=int, default=10)
    real.add_argument("--batch", type=int, default=4, help="bandit episodes per fine-tuning iteration")
    real.add_argument("--sanity-episodes", type=int, default=4,
                      help="bandits in the training run's own evaluations, checked against a fresh evaluation")
    real.add_argument("--pilot-runs", type=int, default=PILOT_MAX_RUNS, help="stage bandit: at most this many pilot runs")
    real.add_argument("--ttt-batch", type=int, default=8, help="tic-tac-toe games per fine-tuning iteration")
    args = ap.parse_args()
    defaults = {"tiny": (22, 40, 64, 100, 200), "real": (PILOT_ITERATIONS, 4, PILOT_EPISODES, 16, 16)}[args.model]
    for key, value in zip(("iterations", "ttt_iterations", "episodes", "probes", "games"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model == "real":
        if args.quick:
            args.seeds, args.arms, args.variants, args.horizon, args.probe_episodes, args.probes = args.seeds[:1], [5], ["button"], 4, 2, 2
            args.kd_arms, args.kd_probes, args.kd_tokens, args.cot_tokens = [5], 2, 16, 16
            args.iterations, args.train_horizon, args.episodes, args.batch, args.sanity_episodes = 1, 3, 2, 2, 2
            args.pilot_runs = 1
            args.ttt_iterations, args.games, args.ttt_batch = 1, 2, 2
        main_real(args)
        return
    if args.quick:
        args.seeds, args.iterations, args.ttt_iterations = args.seeds[:1], 2, 2
        args.episodes, args.probes, args.games = 8, 10, 16
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
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


# --------------------------------------------------------------------------------------------------
# The real model: cory:smollm2-135m-instruct (--model real)
# --------------------------------------------------------------------------------------------------

REAL_MODEL = "cory:smollm2-135m-instruct"
PAPER = {
    # "LLMs are Greedy Agents" (arXiv 2504.16078), as summarised in the shared reference notes.
    "coverage_10_arms_cot": {"Gemma2 2B": 0.40, "Gemma2 9B": 0.65, "Gemma2 27B": 0.65},
    "coverage_10_arms_no_cot": 0.25,
    "coverage_20_arms_max": 0.45,
    "F_f": {"Gemma2 2B": 0.96, "Gemma2 27B": 0.14, "Gemma2 2B after RLFT": 0.67},
    "knowing_doing_27B": {"knowing": 0.87, "greedy_given_knowing": 0.58, "optimal_given_knowing": 0.21},
    "rlft": {"coverage_gain_10_arms": 0.12, "coverage_gain_20_arms": 0.13, "ttt_return": [0.15, 0.75]},
}
# The example turn that shows the answer format (the model answers ACTION=X in 0-1% of its turns
# without it). Its history is the same for every cell; its answer is the best arm of that history.
EXAMPLE_HISTORY = ((0, 0.10), (2, 0.70), (1, -0.30))
EXAMPLE_REASONING = "{label} has paid the most so far."


def real_env_kwargs(n_arms: int, variant: str, cot: bool, horizon: int, history: int) -> dict:
    return {"n_arms": n_arms, "variant": variant, "cot": cot, "sigma": 1.0, "horizon": horizon, "history": history}


def one_shot(env_id: str, kwargs: dict) -> tuple[str, str]:
    """(user, assistant): an observation of the environment with `kwargs` and an answer in the format
    the prompt asks for (with chain of thought: one short sentence before ACTION=X)."""
    cot = kwargs.get("cot", True)
    if env_id == TICTACTOE:
        env = gym.make(TICTACTOE, **kwargs).unwrapped
        observation, _ = env.reset(seed=12345)
        return observation, ("The centre is free. " if cot else "") + "ACTION=4"
    labels = arm_labels(kwargs["n_arms"], kwargs["variant"])
    options = PromptOptions(cot=cot, history=kwargs.get("history"))
    user = render_bandit_prompt(labels, kwargs["variant"], kwargs["horizon"], list(EXAMPLE_HISTORY), options)
    label = labels[2]
    return user, (EXAMPLE_REASONING.format(label=label) + " " if cot else "") + f"ACTION={label}"


def real_params(env_id: str, kwargs: dict, max_new_tokens: int, temperature: float = 0.0):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, chat=True,
                          chat_examples=(one_shot(env_id, kwargs),), shared_prefix=True)


def episode_interval(records, key) -> tuple[float, float]:
    """Mean and 95% half-width over episodes of a per-episode value."""
    return interval([key(r) for r in records])


def named_share(record) -> float:
    """The share of arms an agent named itself in valid answers (the random arm an invalid answer
    executes is left out)."""
    return len({a for a in record.actions if a is not None}) / record.n_actions


EPISODE_VALUES = {"shaped_return": lambda r: r.total_reward, "regret": lambda r: r.total_regret,
                  "named_coverage": named_share, "valid_rate": lambda r: r.valid_rate}
"""Per-episode values kept with every evaluation (`per_episode`), so paired statistics can be recomputed
from the results file: the shaped return (what training maximises), the final cumulative regret, the
share of arms named in valid answers, the share of valid answers."""


def real_bandit_row(records, example_label: int | None = None) -> dict:
    row = bandit_row(records)
    row["regret_curves"], row["coverage_curves"] = regret_curves(records).tolist(), coverage_curves(records).tolist()
    row["regret_ci"] = episode_interval(records, lambda r: r.total_regret)[1]
    row["coverage_ci"] = episode_interval(records, lambda r: coverage(r.executed, r.n_actions)[-1])[1]
    row["valid_ci"] = episode_interval(records, lambda r: r.valid_rate)[1]
    # Invalid answers execute a random arm, which counts in `coverage`; this counts only the arms the
    # agent named itself.
    row["own_coverage"], row["own_coverage_ci"] = episode_interval(records, named_share)
    row["shaped_return"], row["shaped_return_ci"] = episode_interval(records, lambda r: r.total_reward)
    row["per_episode"] = [{"instance": r.instance_seed, **{k: f(r) for k, f in EPISODE_VALUES.items()}} for r in records]
    if example_label is not None:
        answered = [a for r in records for a in r.actions if a is not None]
        row["example_label_rate"] = sum(a == example_label for a in answered) / len(answered) if answered else float("nan")
    return row


def named_coverage(cell: dict) -> tuple[float, float] | None:
    """(mean, 95% half-width) of the share of arms a probe cell's model named in valid answers: stored
    by probe stages run since it was recorded; for older cells where every answer was valid it equals
    the executed coverage (every executed arm was named); otherwise unknown (None)."""
    if "own_coverage" in cell:
        return cell["own_coverage"], cell["own_coverage_ci"]
    if cell["valid_rate"] == 1.0:
        return cell["coverage"], cell["coverage_ci"]
    return None


def differences(before: list[dict], after: list[dict], key: str) -> list[float]:
    """after - before of the per-episode value `key` (`per_episode` rows), paired by held-out instance."""
    base = {e["instance"]: e[key] for e in before}
    return [e[key] - base[e["instance"]] for e in after if e["instance"] in base]


def paired(before: list[dict], after: list[dict], key: str) -> dict:
    """The pilot's test: mean of the paired differences, SE (their sd / sqrt(n)), 95% half-width, n."""
    diffs = differences(before, after, key)
    n = len(diffs)
    mean, half = interval(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "se": se, "half": half, "n": n}


def ci_cell(mean: float, half: float, fmt: str = ".2f") -> str:
    return f"{mean:{fmt}} ± {half:{fmt}}" if half == half else f"{mean:{fmt}}"


def write_real_config(path: Path, env_id: str, kwargs: dict, settings: dict, seed: int, iterations: int,
                      episodes: int, eval_seed: int, max_new_tokens: int) -> Path:
    """The fine-tuning run's YAML config (YAML carries the example turn's text as written)."""
    user, assistant = one_shot(env_id, kwargs)
    cfg = {
        "model": {"name": REAL_MODEL},
        "env": {"id": env_id, "kwargs": kwargs, "chat_template": True, "chat_examples": [[user, assistant]],
                "eval_episodes": episodes},
        "generation": {"max_new_tokens": max_new_tokens, "shared_prefix": True},
        "train": {"seed": seed, "iterations": iterations, "log_with": [], "progress": False},
        "eval": {"temperature": 0.0, "seed": eval_seed},
    }
    for key, value in settings.items():
        section, *rest = key.split(".")
        node = cfg.setdefault(section, {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def real_fine_tune(config: Path, out: str) -> dict:
    cfg = load_config(config)
    t0 = time.perf_counter()
    summary = TrainingRun(cfg, out).run()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - t0, "summary": summary,
            "train_reward": [r["reward_mean"] for r in rows], "train_kl": [r["kl_mean"] for r in rows],
            "iteration_s": [r.get("time/iteration") for r in rows]}


# Tic-tac-toe fine-tuning (stage `ttt`, as committed): PPO, LoRA adapters on layers 26-29 only (the
# backward pass stops there), exact KL accounting off (it costs one more forward pass over every turn).
REAL_LORA_LAYERS = (26, 27, 28, 29)
REAL_LORA_TARGETS = [f"layers.{i}.{m}" for i in REAL_LORA_LAYERS
                     for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
REAL_TTT_TRAIN = {
    "algo.name": "ppo", "algo.gamma": 1.0, "algo.lr": 1e-3, "kl.beta": 0.05, "kl.exact_accounting": False,
    "model.lora.r": 16, "model.lora.alpha": 32, "model.lora.targets": REAL_LORA_TARGETS,
}
# Bandit fine-tuning (stage `bandit`, declared in the module docstring): the learning rate is the
# pilot's (`PILOT_LRS`), the rest is fixed.
REAL_BANDIT_TRAIN = {
    "env.pool_size": 512, "algo.name": "reinforce", "algo.baseline": "mean", "algo.gamma": 1.0, "algo.turn_gamma": 0.5,
    "algo.minibatch_size": 2, "kl.beta": 0.05, "kl.exact_accounting": False, "model.trainable_layers": 4,
    "model.lora.r": 16, "model.lora.alpha": 32, "train.shared_prefix": True, "train.num_threads": 1,
}
REAL_BANDIT_ENV = {"exploration_bonus": 1.0, "reward_norm": "standard"}
PILOT_ITERATIONS = 16
PILOT_EPISODES = 32
"""Held-out bandits of the pilot's evaluations (the evaluation pool of the seed)."""
PILOT_PASS_SE = 2.0
"""The pilot passes where the primary endpoint rises by more than this many standard errors."""
PILOT_LRS = (1e-3,)
"""The first run's learning rate; the second's follows from the first run (`pilot_next_lr`)."""
PILOT_MAX_RUNS = 2
PILOT_KL_MOVED = 2.0
"""Nats of training KL above which a failed run moved without learning (the next run's rate is lower)."""


def pilot_next_lr(run: dict) -> float:
    """The declared second learning rate: a third of the first's where its last training KL exceeded
    `PILOT_KL_MOVED` nats, else three times it."""
    return run["lr"] * (0.3 if run["training"]["train_kl"][-1] > PILOT_KL_MOVED else 3.0)


# The claims judged on the stage's run: (key, claim, evaluation, per-episode value, claimed direction).
# The first is the primary endpoint; Holm's correction runs over the others.
CLAIMS = (
    ("reward", "fine-tuning raised the shaped reward (temperature 1; primary)", "t1", "shaped_return", 1),
    ("regret_greedy", "fine-tuning lowered regret (greedy)", "greedy", "regret", -1),
    ("regret_t1", "fine-tuning lowered regret (temperature 1)", "t1", "regret", -1),
    ("named_greedy", "fine-tuning raised the share of arms it named (greedy)", "greedy", "named_coverage", 1),
    ("named_t1", "fine-tuning raised the share of arms it named (temperature 1)", "t1", "named_coverage", 1),
    ("valid_t1", "fine-tuning raised the share of valid answers (temperature 1)", "t1", "valid_rate", 1),
    ("valid_greedy", "fine-tuning raised the share of valid answers (greedy)", "greedy", "valid_rate", 1),
    ("reward_greedy", "fine-tuning raised the shaped reward (greedy)", "greedy", "shaped_return", 1),
)


def judge(before: dict, after: dict, learned: bool) -> dict:
    """Every claim of `CLAIMS` on per-episode values paired by instance: {key: the bootstrap's mean,
    95% interval and p, Holm's p (the primary's own p), verdict}. `before` / `after`: {"greedy": row,
    "t1": row} with `per_episode` in each row. Where nothing was learned no claim is supported."""
    est = {key: paired_bootstrap([differences(before[ev]["per_episode"], after[ev]["per_episode"], value)])
           for key, _, ev, value, _ in CLAIMS}
    primary, *secondary = (c[0] for c in CLAIMS)
    adjusted = {primary: est[primary].p, **dict(zip(secondary, holm([est[k].p for k in secondary])))}
    out = {}
    for key, claim, ev, value, direction in CLAIMS:
        e = est[key]
        word = directional_verdict(e, direction, adjusted[key])
        out[key] = {"claim": claim, "evaluation": ev, "value": value, "direction": direction, "mean": e.mean,
                    "low": e.low, "high": e.high, "p": e.p, "p_holm": adjusted[key], "n": e.prompts,
                    "verdict": INCONCLUSIVE if word == SUPPORTED and not learned else word}
    return out


def model_probes(policy, args, seed: int) -> dict:
    """The frequency-bias and knowing-doing probes of stage `probes`' 5-armed button cell (the same
    probes for every model: same seed, same histories), with each probe's outcome kept for pairing."""
    kw = real_env_kwargs(5, "button", False, args.horizon, args.history)
    kd_kw = {**kw, "cot": True}
    with policy.frozen_prefix():
        frequency, fb = frequency_bias_probe(policy, args.probes, seed, kw, action_template="ACTION={}",
                                             params=real_params(BANDIT, kw, args.answer_tokens))
        knowing, kd = knowing_doing_probe(policy, args.kd_probes, seed, kd_kw, max_new_tokens=args.kd_tokens, temperature=0.0,
                                          params=real_params(BANDIT, kd_kw, args.kd_tokens))
    return {"frequency": {**frequency, "each": [r.label for r in fb], "chosen": [r.chosen for r in fb]},
            "knowing_doing": {**knowing, "each_knowing": [r.knowing for r in kd], "each_doing": [r.doing for r in kd]}}


def probe_shifts(before: dict, after: dict) -> dict:
    """After - before per probe (the same probes): F_f (top action the most frequent), knowing, and an
    invalid knowing-doing answer, as paired means with 95% intervals."""
    def shift(b, a):
        mean, half = interval([x - y for x, y in zip(a, b)])
        return {"mean": mean, "half": half, "n": len(a)}
    f_b, f_a = before["frequency"]["each"], after["frequency"]["each"]
    k_b, k_a = before["knowing_doing"], after["knowing_doing"]
    return {"F_f": shift([x == "frequent" for x in f_b], [x == "frequent" for x in f_a]),
            "knowing": shift([float(x) for x in k_b["each_knowing"]], [float(x) for x in k_a["each_knowing"]]),
            "invalid": shift([x == "invalid" for x in k_b["each_doing"]], [x == "invalid" for x in k_a["each_doing"]]),
            "same_top_action": sum(x == y for x, y in zip(before["frequency"]["chosen"], after["frequency"]["chosen"]))
            / len(f_b)}


def main_real(args) -> None:
    """Runs the stages in `args.stages` and merges them into the real-model report (stages run earlier
    stay in it, so the report can be built in several invocations)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - start:.0f}s] {msg}", flush=True)

    stem = "bandits_real_quick" if args.quick else "bandits_real"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}.json"
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    data.update({"model": REAL_MODEL, "paper": PAPER})
    fresh = args.fresh

    def save(stages: dict) -> None:
        nonlocal data, fresh
        data, fresh = write_real(stages, stem, data, fresh), False

    if set(args.stages) - {"report"}:
        policy = Policy.from_pretrained(REAL_MODEL)
        log(f"loaded {REAL_MODEL}")
    if "probes" in args.stages:
        new, old = probe_stage(policy, args, log), data.get("probes")
        if old:  # cells and knowing-doing rows of earlier invocations stay unless measured again
            keep = {(c["n_arms"], c["variant"], c["cot"]) for c in new["cells"]}
            new["cells"] = [c for c in old["cells"] if (c["n_arms"], c["variant"], c["cot"]) not in keep] + new["cells"]
            arms = {k["n_arms"] for k in new["knowing_doing"]}
            new["knowing_doing"] = [k for k in old["knowing_doing"] if k["n_arms"] not in arms] + new["knowing_doing"]
            new["wall_s"] += old["wall_s"]
            new["cpu_s"] += old["cpu_s"]
        new["cells"].sort(key=lambda c: (c["cot"], c["n_arms"], c["variant"]))
        save({"probes": new})
    if "bandit" in args.stages:
        save({"bandit": bandit_stage(policy, args, log)})
    if "ttt" in args.stages:
        save({"tictactoe": ttt_stage(policy, args, log)})
    log("wrote " + ", ".join(str(p) for p in real_report(data, stem)))


def plot_ttt_training(training: dict, path: Path) -> Path:
    """Tic-tac-toe fine-tuning: training return and KL per iteration."""
    its = range(1, len(training["train_reward"]) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(its, training["train_reward"], "o-")
    a.set_xlabel("iteration")
    a.set_ylabel("mean training return per game")
    a.set_title("return (invalid-move penalty included)")
    b.plot(its, training["train_kl"], "o-", color="C1")
    b.set_xlabel("iteration")
    b.set_ylabel("KL to the initial model")
    b.set_title("drift")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct, PPO (value head + GAE) on tic-tac-toe against random")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_real(stages: dict, stem: str, data: dict, fresh: bool = False) -> dict:
    """Writes `stages` into the report's JSON as it is on disk now (another invocation may have written
    other stages since this one started; `fresh`: as `data` has it) and returns the merged data."""
    path = RESULTS / f"{stem}.json"
    on_disk = json.loads(path.read_text()) if path.exists() else {}
    merged = {**data, **({} if fresh else on_disk), **stages}
    path.write_text(json.dumps(merged, indent=2))
    return merged


def stage_settings(args, keys) -> dict:
    return {"seed": args.seeds[0], **{k: getattr(args, k) for k in keys}}


def probe_stage(policy, args, log) -> dict:
    """Play, frequency-bias and knowing-doing probes of the untrained model, with UCB1 and random."""
    t0, c0 = time.perf_counter(), time.process_time()
    seed = args.seeds[0]
    cells = []
    with policy.frozen_prefix():
        for cot in args.cot:
            for n_arms in args.arms:
                for variant in args.variants:
                    kw = real_env_kwargs(n_arms, variant, bool(cot), args.horizon, args.history)
                    params = real_params(BANDIT, kw, args.cot_tokens if cot else args.answer_tokens)
                    t1 = time.perf_counter()
                    records, rollout = play_policy(policy, BANDIT, kw, args.probe_episodes, params, seed)
                    cell = {"n_arms": n_arms, "variant": variant, "cot": bool(cot), "episodes": args.probe_episodes,
                            "horizon": args.horizon, "probes": args.probes if not cot else 0,
                            **real_bandit_row(records, example_label=2),
                            "response_tokens": rollout.response_mask.sum(-1).float().mean().item(),
                            "samples": list(rollout.responses[:4])}
                    for name, agent_name in (("random", "random"), ("UCB1", "ucb1")):
                        cell[name] = real_bandit_row(play_agent(agent_name, BANDIT, kw, args.probe_episodes, seed))
                    if not cot and args.probes:
                        cell["probe"], _ = frequency_bias_probe(policy, args.probes, seed, kw, action_template="ACTION={}",
                                                                params=params)
                    cell["wall_s"] = time.perf_counter() - t1
                    cells.append(strip_records(cell))
                    log(f"probe cell {n_arms} arms {variant} cot={bool(cot)}: regret {cell['regret']:.2f} (UCB1 "
                        f"{cell['UCB1']['regret']:.2f}, random {cell['random']['regret']:.2f}), coverage {cell['coverage']:.2f}, "
                        f"valid {cell['valid_rate']:.3f}, F_f {cell.get('probe', {}).get('F_f', float('nan')):.2f}, "
                        f"{cell['wall_s']:.0f} s")
        knowing = []
        for n_arms in args.kd_arms:
            kw = real_env_kwargs(n_arms, "button", True, args.horizon, args.history)
            t1 = time.perf_counter()
            rates, _ = knowing_doing_probe(policy, args.kd_probes, seed, kw, max_new_tokens=args.kd_tokens, temperature=0.0,
                                           params=real_params(BANDIT, kw, args.kd_tokens))
            knowing.append({"n_arms": n_arms, **rates, "wall_s": time.perf_counter() - t1})
            log(f"knowing-doing {n_arms} arms: knowing {rates['knowing']:.2f}, optimal {rates['optimal']:.2f}, "
                f"greedy {rates['greedy']:.2f}, invalid {rates['invalid']:.2f}")
    keys = ("arms", "variants", "cot", "horizon", "history", "probe_episodes", "probes", "answer_tokens", "cot_tokens",
            "kd_arms", "kd_probes", "kd_tokens")
    return {"settings": stage_settings(args, keys), "cells": cells, "knowing_doing": knowing,
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def strip_records(row: dict) -> dict:
    return {k: (strip_records(v) if isinstance(v, dict) else v) for k, v in row.items() if k != "_records"}


def bandit_stage(policy, args, log) -> dict:
    """The declared pilot of RL fine-tuning on bandits, and its result (module docstring): runs in the
    declared order until one raises the primary endpoint by more than `PILOT_PASS_SE` standard errors;
    the untrained and the fine-tuned model (greedy and at temperature 1), UCB1 and random on the same
    held-out bandits; the probes before and after; the training run's initial evaluation checked against
    a fresh one."""
    t0, c0 = time.perf_counter(), time.process_time()
    seed = args.seeds[0]
    kw = real_env_kwargs(args.train_arms, "button", False, args.train_horizon, args.history)
    shaped = {**kw, **REAL_BANDIT_ENV}  # the training environment: the records carry the shaped rewards
    params = real_params(BANDIT, kw, args.answer_tokens)
    modes = {"greedy": params, "t1": replace(params, temperature=1.0)}  # t1: as training samples

    def evaluate(model) -> dict:
        with model.frozen_prefix():
            return {mode: real_bandit_row(play_policy(model, BANDIT, shaped, args.episodes, p, seed)[0], example_label=2)
                    for mode, p in modes.items()}

    before = evaluate(policy)
    log(f"bandit before: shaped return (T=1) {before['t1']['shaped_return']:.2f}, valid (T=1) {before['t1']['valid_rate']:.3f}; "
        f"greedy regret {before['greedy']['regret']:.2f}, arms named {before['greedy']['own_coverage']:.2f}")
    probes_before = model_probes(policy, args, seed)
    log(f"probes before: F_f {probes_before['frequency']['F_f']:.2f}, knowing {probes_before['knowing_doing']['knowing']:.2f}")
    pilot, lr, trained = [], PILOT_LRS[0], None
    for attempt in range(args.pilot_runs):
        settings = {**REAL_BANDIT_TRAIN, "algo.lr": lr, "train.batch_size": args.batch}
        with tempfile.TemporaryDirectory() as tmp:
            config = write_real_config(Path(tmp) / "bandit.yaml", BANDIT, shaped, settings, seed, args.iterations,
                                       args.sanity_episodes, seed, args.answer_tokens)
            run = real_fine_tune(config, str(Path(tmp) / "run"))
            trained = Policy.from_pretrained(str(Path(tmp) / "run" / "final"))
        after = evaluate(trained)
        primary = paired(before["t1"]["per_episode"], after["t1"]["per_episode"], "shaped_return")
        passes = bool(primary["mean"] > PILOT_PASS_SE * primary["se"])
        pilot.append({"run": attempt + 1, "lr": lr, "iterations": args.iterations, "primary": primary, "passes": passes,
                      "after": after, "after_summary": {m: {k: after[m][k] for k in ("shaped_return", "regret", "own_coverage",
                                                                                     "valid_rate")} for m in after}, "training": {k: v for k, v in run.items() if k != "summary"},
                      "summary": {k: {m: v for m, v in run["summary"][k].items() if m != "samples"}
                                  for k in ("initial_eval", "final_eval")}})
        log(f"pilot run {attempt + 1} (lr {lr:g}, {args.iterations} iterations, {run['wall_s']:.0f} s): shaped return (T=1) "
            f"{before['t1']['shaped_return']:.2f} -> {after['t1']['shaped_return']:.2f}, paired {primary['mean']:+.2f} "
            f"(SE {primary['se']:.2f}, {primary['mean'] / primary['se'] if primary['se'] else math.nan:+.1f} SE): "
            f"{'passes' if passes else 'does not pass'}; valid (T=1) {after['t1']['valid_rate']:.3f}, training KL "
            f"{run['train_kl'][-1]:.2f}, train reward {', '.join(f'{x:.1f}' for x in run['train_reward'])}")
        if passes:
            break
        lr = pilot_next_lr(pilot[-1])
    chosen = pilot[-1]
    learned = chosen["passes"]
    probes_after = model_probes(trained, args, seed)
    log(f"probes after: F_f {probes_after['frequency']['F_f']:.2f}, knowing {probes_after['knowing_doing']['knowing']:.2f}")
    claims = judge(before, chosen["after"], learned)
    runs = {"random": real_bandit_row(play_agent("random", BANDIT, shaped, args.episodes, seed)),
            "UCB1": real_bandit_row(play_agent("ucb1", BANDIT, shaped, args.episodes, seed)),
            "before": before["greedy"], "after": chosen["after"]["greedy"],
            "before_t1": before["t1"], "after_t1": chosen["after"]["t1"]}
    # The training run's own initial evaluation (its first `sanity_episodes` instances, greedy) against a
    # fresh one of the untrained model.
    keys = ("regret_mean", "coverage_final", "valid_rate", "env_return_mean", "reward_mean")
    with policy.frozen_prefix():
        fresh = episode_metrics(play_policy(policy, BANDIT, shaped, args.sanity_episodes, params, seed)[0])
    sanity = {k: {"training_run": chosen["summary"]["initial_eval"][k], "fresh": fresh[k]} for k in keys}
    sanity_ok = all(abs(v["training_run"] - v["fresh"]) < 1e-6 for v in sanity.values())
    log(f"bandit stage: {'passed' if learned else 'not passed'} at run {chosen['run']}; initial evaluation matches a fresh "
        f"one: {sanity_ok}; " + "; ".join(f"{k} {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] {c['verdict']}" for k, c in claims.items()))
    keys = ("train_arms", "train_horizon", "history", "horizon", "iterations", "batch", "episodes", "sanity_episodes",
            "answer_tokens", "probes", "kd_probes", "kd_tokens", "pilot_runs")
    return {"settings": {**stage_settings(args, keys), "train": {**REAL_BANDIT_TRAIN, "algo.lr": chosen["lr"]},
                         "env": REAL_BANDIT_ENV, "pass_se": PILOT_PASS_SE},
            "pilot": [{k: v for k, v in r.items() if k != "after"} for r in pilot], "passed": learned,
            "chosen_run": chosen["run"], "runs": {k: strip_records(v) for k, v in runs.items()}, "claims": claims,
            "probes": {"before": probes_before, "after": probes_after, "shift": probe_shifts(probes_before, probes_after)},
            "training": chosen["training"], "final_eval": chosen["summary"]["final_eval"], "sanity": sanity,
            "sanity_ok": sanity_ok, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def ttt_stage(policy, args, log) -> dict:
    """RL fine-tuning on tic-tac-toe against a random opponent (value head + GAE)."""
    t0, c0 = time.perf_counter(), time.process_time()
    seed = args.seeds[0]
    kw = {"cot": False}
    params = real_params(TICTACTOE, kw, args.answer_tokens)

    def row(records):
        m = episode_metrics(records)
        return {**{k: m[k] for k in ("env_return_mean", "win_rate", "draw_rate", "loss_rate", "valid_rate")},
                "return_ci": episode_interval(records, lambda r: sum(r.env_rewards))[1]}

    with policy.frozen_prefix():
        before = row(play_policy(policy, TICTACTOE, kw, args.games, params, seed)[0])
    log(f"tic-tac-toe before: return {before['env_return_mean']:.3f}, valid {before['valid_rate']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        config = write_real_config(Path(tmp) / "ttt.yaml", TICTACTOE, kw, {**REAL_TTT_TRAIN, "train.batch_size": args.ttt_batch},
                                   seed, args.ttt_iterations, args.sanity_episodes, seed, args.answer_tokens)
        run = real_fine_tune(config, str(Path(tmp) / "run"))
        trained = Policy.from_pretrained(str(Path(tmp) / "run" / "final"))
        with trained.frozen_prefix():
            after = row(play_policy(trained, TICTACTOE, kw, args.games, params, seed)[0])
    out = {"random": row(play_agent("random", TICTACTOE, kw, args.games, seed)), "before": before, "after": after}
    log(f"tic-tac-toe return {before['env_return_mean']:.3f} -> {after['env_return_mean']:.3f} "
        f"(random {out['random']['env_return_mean']:.3f}) in {time.perf_counter() - t0:.0f} s")
    keys = ("ttt_iterations", "ttt_batch", "games", "answer_tokens")
    return {"settings": {**stage_settings(args, keys), "train": REAL_TTT_TRAIN}, **out,
            "training": {k: v for k, v in run.items() if k != "summary"}, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0}


def p_cell(p: float) -> str:
    """A bootstrap p-value; 0 means no resample of `paired_bootstrap`'s 10,000 crossed zero."""
    return "< 1e-4" if p == 0 else f"{p:.3g}"


def bandit_section(fine: dict) -> list[str]:
    """Section 2 of the report: the declared pilot, the stage's run against UCB1 and random, the claims
    with paired intervals and verdicts, and the probes before and after."""
    nan = float("nan")
    s, r, c = fine["settings"], fine["runs"], fine["claims"]
    t = s["train"]
    lines = ["", "## 2. RL fine-tuning on bandits", "",
             f"{s['train_arms']}-armed Gaussian bandits (button variant, sigma 1, horizon {s['train_horizon']}, the last "
             f"{s['history']} steps shown, no chain of thought), {s['iterations']} iterations x {s['batch']} episodes from a "
             f"pool of {t['env.pool_size']} training bandits; REINFORCE with the Monte-Carlo baseline, algo.gamma "
             f"{t['algo.gamma']} within a turn and algo.turn_gamma {t['algo.turn_gamma']} per step, minibatches of "
             f"{t['algo.minibatch_size']} episodes, kl.beta {t['kl.beta']}, LoRA r {t['model.lora.r']} on the top "
             f"{t['model.trainable_layers']} of 30 layers (model.trainable_layers), one thread; environment {s['env']} plus "
             f"the -5 invalid-action penalty. Evaluated on {s['episodes']} held-out bandits, the untrained and the "
             "fine-tuned model on the same instances, greedy and at temperature 1 (as training samples).", "",
             "### Pilot (protocol declared in `benchmarks/bandits.py` before the runs)", "",
             f"Primary endpoint: the shaped episode return at temperature 1 (what training maximises), fine-tuned minus "
             f"untrained, paired by held-out bandit; the pilot passes where it rises by more than {s['pass_se']:g} standard "
             "errors. Learning rates in the declared order; every run tried:", "",
             "| run | lr | iterations | shaped return, T=1: before -> after | paired difference | / SE | passes | "
             "valid answers, T=1 (after) | training KL (last) | s / iteration | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    before_t1 = r["before_t1"]["shaped_return"]
    for run in fine["pilot"]:
        pr, tr = run["primary"], run["training"]
        after_t1 = before_t1 + pr["mean"]
        lines.append(f"| {run['run']} | {run['lr']:g} | {run['iterations']} | {before_t1:.2f} -> {after_t1:.2f} | "
                     f"{pr['mean']:+.2f} ± {pr['half']:.2f} | {pr['mean'] / pr['se'] if pr['se'] else nan:+.1f} | "
                     f"{'yes' if run['passes'] else 'no'} | "
                     f"{run['after_summary']['t1']['valid_rate']:.3f} | "
                     f"{tr['train_kl'][-1]:.2f} | {statistics.median(tr['iteration_s']):.0f} | {tr['wall_s']:.0f} s |")
    chosen = fine["chosen_run"]
    lines += ["", (f"The pilot passed at run {chosen} (lr {t['algo.lr']:g}); that run is the stage's result below (it was not "
                   "run again)." if fine["passed"] else
                   f"No run passed: the fine-tuned model's shaped reward did not rise by more than {s['pass_se']:g} standard "
                   f"errors in {len(fine['pilot'])} run(s) of {s['iterations']} iterations (the budget: about 20 minutes of "
                   f"one thread each). Below is the last run tried (run {chosen}); nothing was learned, so no claim is "
                   "credited to fine-tuning."), "",
              f"| agent | shaped return | regret at step {s['train_horizon']} | arms it named | executed coverage | valid actions "
              "| copies example |", "|---|---|---|---|---|---|---|"]
    labels = {"before": "SmolLM2, before (greedy)", "after": "SmolLM2, fine-tuned (greedy)",
              "before_t1": "SmolLM2, before (temperature 1)", "after_t1": "SmolLM2, fine-tuned (temperature 1)"}
    for name in ("random", "UCB1", "before", "after", "before_t1", "after_t1"):
        row = r[name]
        lines.append(f"| {labels.get(name, name)} | {ci_cell(row['shaped_return'], row['shaped_return_ci'])} | "
                     f"{ci_cell(row['regret'], row['regret_ci'])} | {ci_cell(row['own_coverage'], row['own_coverage_ci'])} | "
                     f"{ci_cell(row['coverage'], row['coverage_ci'])} | {ci_cell(row['valid_rate'], row['valid_ci'], '.3f')} | "
                     f"{row.get('example_label_rate', nan):.2f} |")
    lines += ["", "Claims, fine-tuned minus untrained paired by held-out bandit (the paired bootstrap of `cory.metrics.stats` "
              "over the bandits: mean, 95% interval, p; the first is the primary endpoint, Holm's correction runs over the "
              "others; verdicts as declared):", "",
              "| claim | before | after | after - before [95% interval] | p | p (Holm) | verdict |", "|---|---|---|---|---|---|---|"]
    rows = {"greedy": ("before", "after"), "t1": ("before_t1", "after_t1")}
    names = {"shaped_return": "shaped_return", "regret": "regret", "named_coverage": "own_coverage", "valid_rate": "valid_rate"}
    for claim in c.values():
        b, a = (r[x][names[claim["value"]]] for x in rows[claim["evaluation"]])
        lines.append(f"| {claim['claim']} | {b:.3f} | {a:.3f} | {claim['mean']:+.3f} [{claim['low']:+.3f}, {claim['high']:+.3f}] | "
                     f"{p_cell(claim['p'])} | {p_cell(claim['p_holm'])} | {claim['verdict']} |")
    # Where the shaped reward comes from: a valid answer avoids the -5 penalty, so the rise of valid
    # answers alone accounts for (gain in the valid share) x answers per episode x 5 of it.
    valid_part = c["valid_t1"]["mean"] * s["train_horizon"] * 5
    greedy_same = all(c[k]["low"] == c[k]["high"] == 0 for k in ("regret_greedy", "named_greedy", "valid_greedy", "reward_greedy"))
    lines += ["", f"Where the reward came from: at temperature 1 the share of valid answers went from {r['before_t1']['valid_rate']:.2f} "
              f"to {r['after_t1']['valid_rate']:.2f}, which alone is worth {valid_part:+.1f} of the {c['reward']['mean']:+.1f} "
              f"(the -5 penalty avoided on {c['valid_t1']['mean'] * s['train_horizon']:.1f} more answers per episode); the share "
              f"of arms it named fell from {r['before_t1']['own_coverage']:.2f} to {r['after_t1']['own_coverage']:.2f} and the "
              f"share of valid answers naming the example's arm rose from {r['before_t1']['example_label_rate']:.2f} to "
              f"{r['after_t1']['example_label_rate']:.2f}. "
              + ("The greedy evaluation did not change on any held-out bandit (every greedy difference is exactly 0). "
                 if greedy_same else "")
              + ("Fine-tuning taught the answer format and narrowed sampling onto fewer arms; it did not teach exploration."
                 if c["valid_t1"]["verdict"] == "supported" and c["named_t1"]["verdict"] == "contradicted" else "")]
    pb, pa, sh = fine["probes"]["before"], fine["probes"]["after"], fine["probes"]["shift"]
    fb, fa, kb, ka = pb["frequency"], pa["frequency"], pb["knowing_doing"], pa["knowing_doing"]
    lines += ["", f"Probes before and after fine-tuning, the same probes (stage `probes`' 5-armed button cell: horizon "
              f"{s['horizon']}, {fb['probes']} frequency-bias probes, {kb['probes']} knowing-doing probes with chain of thought "
              f"and at most {s['kd_tokens']} tokens); differences paired per probe:", "",
              "| probe | before | after | after - before |", "|---|---|---|---|",
              f"| F_f / F_g / F_o | {fb['F_f']:.2f} / {fb['F_g']:.2f} / {fb['F_o']:.2f} | {fa['F_f']:.2f} / {fa['F_g']:.2f} / "
              f"{fa['F_o']:.2f} | F_f {ci_cell(sh['F_f']['mean'], sh['F_f']['half'])} |",
              f"| action entropy (nats) | {fb['entropy']:.2f} | {fa['entropy']:.2f} | |",
              f"| top action unchanged | | | {sh['same_top_action']:.2f} of the probes |",
              f"| knowing | {kb['knowing']:.2f} | {ka['knowing']:.2f} | {ci_cell(sh['knowing']['mean'], sh['knowing']['half'])} |",
              f"| optimal / greedy / other / invalid | {kb['optimal']:.2f} / {kb['greedy']:.2f} / {kb['other']:.2f} / "
              f"{kb['invalid']:.2f} | {ka['optimal']:.2f} / {ka['greedy']:.2f} / {ka['other']:.2f} / {ka['invalid']:.2f} | "
              f"invalid {ci_cell(sh['invalid']['mean'], sh['invalid']['half'])} |"]
    tr = fine["training"]
    lines += ["", f"The stage took {fine['wall_s']:.0f} s of wall time ({fine.get('cpu_s', nan):.0f} s of CPU time at one thread), "
              f"its pilot runs {sum(x['training']['wall_s'] for x in fine['pilot']):.0f} s of training; the chosen run's training "
              f"reward per iteration {', '.join(f'{x:.1f}' for x in tr['train_reward'])}; KL to the initial model "
              f"{', '.join(f'{x:.2f}' for x in tr['train_kl'])}.",
              f"Sanity: the training run's own initial evaluation ({s['sanity_episodes']} bandits) equals a fresh "
              f"evaluation of the untrained model on the same seed and instances: {'yes' if fine['sanity_ok'] else 'NO'} ("
              + ", ".join(f"{k} {v['training_run']:.4f} vs {v['fresh']:.4f}" for k, v in fine["sanity"].items()) + ")."]
    return lines


def real_report(data: dict, stem: str) -> list[Path]:
    """Markdown and PNGs from the merged stage results."""
    nan = float("nan")
    written = [RESULTS / f"{stem}.json"]
    probes, fine, ttt = data.get("probes"), data.get("bandit"), data.get("tictactoe")
    cells = probes["cells"] if probes else []
    knowing = probes["knowing_doing"] if probes else []
    if cells:
        arms = sorted({c["n_arms"] for c in cells})
        fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 4), squeeze=False)
        for ax, k in zip(axes[0], arms):
            mine = [c for c in cells if c["n_arms"] == k]
            for c in mine:
                ax.plot(range(1, len(c["coverage_curve"]) + 1), c["coverage_curve"],
                        label=f"SmolLM2, {c['variant']}{', CoT' if c['cot'] else ''}")
            for name, style in (("UCB1", "k--"), ("random", "k:")):
                ax.plot(range(1, len(mine[0][name]["coverage_curve"]) + 1), mine[0][name]["coverage_curve"], style, label=name)
            ax.set_title(f"{k} arms")
            ax.set_xlabel("step")
            ax.set_ylabel("coverage C_t")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"SmolLM2-135M-Instruct before training: action coverage "
                     f"({probes['settings']['probe_episodes']} bandits per curve)")
        fig.tight_layout()
        written.append(RESULTS / f"{stem}_coverage.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    probed = [c for c in cells if "probe" in c]
    if probed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in probed:
            rows = c["probe"]["by_repeats"]
            ax.plot([f"{r['repeats_from']}-{r['repeats_to']}" for r in rows], [r["F_f"] for r in rows], "o-",
                    label=f"SmolLM2, {c['n_arms']} arms, {c['variant']}")
        ax.axhline(PAPER["F_f"]["Gemma2 2B"], color="gray", ls="--", label="Gemma2 2B (paper)")
        ax.axhline(PAPER["F_f"]["Gemma2 27B"], color="gray", ls=":", label="Gemma2 27B (paper)")
        ax.set_xlabel("times the last action was repeated")
        ax.set_ylabel("F_f")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("Frequency-bias probe")
        fig.tight_layout()
        written.append(RESULTS / f"{stem}_frequency.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if fine:
        s = fine["settings"]
        names = {"random": "random", "UCB1": "UCB1", "before": "SmolLM2 before", "after": "SmolLM2 fine-tuned",
                 "before_t1": "SmolLM2 before, T=1", "after_t1": "SmolLM2 fine-tuned, T=1"}
        title = f"{s['episodes']} bandits, {s['train_arms']} arms"
        for key, ylabel in (("regret", "cumulative regret"), ("coverage", "coverage C_t")):
            curves = {names[k]: np.asarray(r[f"{key}_curves"]) for k, r in fine["runs"].items()}
            written.append(plot_curves(curves, RESULTS / f"{stem}_ft_{key}.png", f"{ylabel}, {title}", ylabel))

    lines = [
        "# SmolLM2-135M-Instruct as a bandit and tic-tac-toe agent", "",
        f"Model `{REAL_MODEL}` in float32 (on this CPU, without AMX or AVX-512, bf16 generation was 3-5x slower). "
        "Every prompt is a user turn of the model's chat template after one example turn: the environment's own "
        "prompt for a fixed 3-step history, answered `ACTION=<the best arm of that history>` (with one sentence of "
        "reasoning first when the prompt asks for chain of thought). Without it the model answered in the `ACTION=` "
        "format in none of 24 trial turns (8 with the chat template alone, 16 with a system prompt stating the format "
        "too). `copies example` is the share of valid answers naming the example's arm. An invalid answer executes a "
        "random arm, which counts in `executed coverage`: where answers are often invalid (the continuous variant), "
        "that coverage comes from the fallback, not from the model. Coverage is therefore judged on `arms it named`, the "
        "share of arms named in valid answers, everywhere below; the button and continuous variants are reported "
        "apart, never averaged. Evaluation is greedy (temperature 0, as in the paper) unless a row says otherwise; "
        "intervals are 95% intervals over episodes of one evaluation seed.", "",
    ]
    if probes:
        s = probes["settings"]
        lines += [
            "## 1. Before any training", "",
            f"Gaussian bandits (sigma 1, horizon {s['horizon']}, the last {s['history']} steps of history shown; `n` per row), "
            "UCB1 and random on the same instances; frequency-bias probes (`probes` per row, without chain of thought: the "
            "summed log-probability of `ACTION=<label>` after the chat prompt); at most "
            f"{s['answer_tokens']} answer tokens without and {s['cot_tokens']} with chain of thought.", "",
            f"| arms | variant | CoT | n | regret | UCB1 | random | arms it named by step {s['horizon']} | executed coverage "
            "| UCB1 | random | valid actions | probes | F_f / F_g / F_o | copies example | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        unknown = []
        for c in cells:
            p = c.get("probe")
            fb = f"{p['F_f']:.2f} / {p['F_g']:.2f} / {p['F_o']:.2f}" if p else "-"
            named = named_coverage(c)
            if named is None:
                unknown.append(c)
            lines.append(
                f"| {c['n_arms']} | {c['variant']} | {'yes' if c['cot'] else 'no'} | {c['episodes']} | {ci_cell(c['regret'], c['regret_ci'])} | "
                f"{c['UCB1']['regret']:.2f} | {c['random']['regret']:.2f} | {ci_cell(*named) if named else 'not stored'} | "
                f"{ci_cell(c['coverage'], c['coverage_ci'])} | {c['UCB1']['coverage']:.2f} | {c['random']['coverage']:.2f} | "
                f"{ci_cell(c['valid_rate'], c['valid_ci'], '.3f')} | {c['probes'] or '-'} | {fb} | "
                f"{c.get('example_label_rate', nan):.2f} | {c['wall_s']:.0f} |")
        lines += ["", "`arms it named`: where every answer was valid (valid actions 1.000) it equals the executed coverage; "
                  "where some were invalid it is at most the executed coverage"
                  + ((", and the cells recorded before the probe stage kept the named arms (" + ", ".join(
                      f"{c['n_arms']} arms {c['variant']}{' CoT' if c['cot'] else ''}" for c in unknown)
                      + ") do not have it: " + " and ".join(
                          f"`python benchmarks/bandits.py --model real --stages probes --cot {int(cot)} --arms "
                          f"{' '.join(str(a) for a in sorted({c['n_arms'] for c in mine}))} --variants "
                          f"{' '.join(sorted({c['variant'] for c in mine}))} --kd-arms`"
                          for cot in (False, True) if (mine := [c for c in unknown if c["cot"] == cot]))
                      + " measures it again (greedy, the same seed: the other columns repeat).") if unknown else ".")]
        if knowing:
            lines += ["", f"Knowing-doing probe ({knowing[0]['probes']} probes per row, button variant, chain of thought, at most "
                      f"{s['kd_tokens']} tokens): `knowing` = its `<ucb_values>` name the true top-UCB arm; the action is "
                      "optimal / greedy / other / invalid.", "",
                      "| arms | knowing | optimal | greedy | other | invalid |", "|---|---|---|---|---|---|"]
            for k in knowing:
                lines.append(f"| {k['n_arms']} | {k['knowing']:.2f} | {k['optimal']:.2f} | {k['greedy']:.2f} | {k['other']:.2f} | "
                             f"{k['invalid']:.2f} |")

        def cov(k, cot, variant="button"):
            mine = [c for c in cells if c["n_arms"] == k and c["cot"] == cot and c["variant"] == variant]
            named = named_coverage(mine[0]) if mine else None
            if not mine:
                return "not run"
            return f"{named[0]:.2f}" if named else f"<= {mine[0]['coverage']:.2f} (not stored)"

        def ff(variant):
            vals = [c["probe"]["F_f"] for c in probed if c["variant"] == variant]
            return f"{statistics.mean(vals):.2f}" if vals else "not run"

        lines += [
            "", "Side by side with the paper's Gemma2 figures (from the shared reference notes; the paper: 64 bandits, "
            "horizon 50, the whole history, up to 256 tokens). SmolLM2's coverage is the share of arms it named in valid "
            "answers, per variant; the paper's models answer validly, so its coverage is theirs:", "",
            "| measure | SmolLM2-135M, button (here) | SmolLM2-135M, continuous (here) | Gemma2 2B | Gemma2 9B | Gemma2 27B |",
            "|---|---|---|---|---|---|",
            f"| arms named by step 50, 10 arms, CoT | {cov(10, True)} | {cov(10, True, 'continuous')} | 0.40 | 0.65 | 0.65 |",
            f"| arms named by step 50, 10 arms, no CoT | {cov(10, False)} | {cov(10, False, 'continuous')} | 0.25 (the paper's "
            "no-CoT figure) | | |",
            f"| arms named by step 50, 20 arms, CoT | {cov(20, True)} | {cov(20, True, 'continuous')} | <= 0.45 | <= 0.45 | <= 0.45 |",
            f"| arms named by step 50, 20 arms, no CoT | {cov(20, False)} | {cov(20, False, 'continuous')} | <= 0.45 | <= 0.45 | <= 0.45 |",
            f"| F_f (frequency bias; mean over the arm counts) | {ff('button')} | {ff('continuous')} | 0.96 | | 0.14 |",
            (f"| knowing (correct UCB rationale) | {statistics.mean(k['knowing'] for k in knowing):.2f} | not run | | | 0.87 |"
             if knowing else "| knowing | not run | not run | | | 0.87 |"),
            "", f"Probes took {probes['wall_s']:.0f} s.",
        ]
    goals = {}
    if fine and "claims" not in fine:
        lines += ["", "## 2. RL fine-tuning on bandits", "",
                  "The results file holds a bandit stage from before the declared pilot; `--stages bandit` runs it."]
    elif fine:
        r = fine["runs"]  # the claims follow from the stored per-episode values, whichever code judged them first
        fine["claims"] = judge({"greedy": r["before"], "t1": r["before_t1"]}, {"greedy": r["after"], "t1": r["after_t1"]},
                               fine["passed"])
        lines += bandit_section(fine)
        c = fine["claims"]
        goals["regret_down"] = {"goal": "after < before (greedy)", "measured": c["regret_greedy"]["mean"],
                                "met": c["regret_greedy"]["verdict"] == "supported", "verdict": c["regret_greedy"]["verdict"]}
        goals["coverage_gain"] = {"goal": ">= 12 points of the arms it named (greedy)", "measured": c["named_greedy"]["mean"],
                                  "met": c["named_greedy"]["verdict"] == "supported" and c["named_greedy"]["mean"] >= 0.12,
                                  "verdict": c["named_greedy"]["verdict"]}
    if ttt:
        s = ttt["settings"]
        lines += ["", "## 3. RL fine-tuning on tic-tac-toe", "",
                  f"Agent first against a random opponent; PPO with a value head and GAE, LoRA r 16 on layers "
                  f"{REAL_LORA_LAYERS[0]}-{REAL_LORA_LAYERS[-1]} of 30 (the backward pass stops there), {s['ttt_iterations']} "
                  f"iterations x {s['ttt_batch']} games; {s['games']} evaluation games.", "",
                  "| agent | return | win | draw | loss | valid actions |", "|---|---|---|---|---|---|"]
        for name in ("random", "before", "after"):
            row = ttt[name]
            label = {"before": "SmolLM2, before", "after": "SmolLM2, fine-tuned"}.get(name, "random agent")
            lines.append(f"| {label} | {ci_cell(row['env_return_mean'], row['return_ci'], '.3f')} | {row['win_rate']:.2f} | "
                         f"{row['draw_rate']:.2f} | {row['loss_rate']:.2f} | {row['valid_rate']:.3f} |")
        goals["ttt_return"] = {"goal": ">= 0.75 (paper: 0.15 -> 0.75)", "measured": ttt["after"]["env_return_mean"],
                               "met": ttt["after"]["env_return_mean"] >= 0.75}
        t = ttt["training"]
        lines += ["", f"Training return per iteration (the -5 invalid-move penalty included): "
                  f"{', '.join(f'{x:.2f}' for x in t['train_reward'])}; KL to the initial model per iteration "
                  f"{', '.join(f'{x:.2f}' for x in t['train_kl'])}.", "",
                  f"![tic-tac-toe training]({stem}_ttt_training.png)", "",
                  f"Tic-tac-toe took {ttt['wall_s']:.0f} s of wall time ({ttt.get('cpu_s', nan):.0f} s of CPU time at one thread; "
                  f"fine-tuning {t['wall_s']:.0f} s, median iteration {statistics.median(t['iteration_s']):.0f} s)."]
        written.append(plot_ttt_training(t, RESULTS / f"{stem}_ttt_training.png"))
    if goals:
        lines += ["", "| paper anchor | target | measured | met | verdict (section 2's claims) |", "|---|---|---|---|---|"]
        for key, g in goals.items():
            lines.append(f"| {key} | {g['goal']} | {g['measured']:.3f} | {'yes' if g['met'] else 'no'} | {g.get('verdict', '-')} |")
    lines += ["", "## Cut relative to the papers", "",
              "- Bandits per cell 4 (paper 64), one evaluation seed, the last 5 steps of history (paper: all of them), "
              "48 tokens for chain of thought (paper 256); chain of thought only where a row says so.",
              "- Every prompt carries one example turn (the paper's models follow the format without one), so the "
              "model's choices partly copy that example (`copies example`).",
              "- Bandit fine-tuning: 5 arms and horizon 10 (paper 10/20 arms, horizon 50), 16 iterations of 4 episodes "
              "(64 episodes, 640 answers, 32 optimizer steps), one training seed, LoRA on the top 4 layers instead of full "
              "fine-tuning, REINFORCE with the Monte-Carlo baseline instead of PPO, 32 held-out bandits."]
    if fine and "claims" in fine:
        s = fine["settings"]
        answers = s["iterations"] * s["batch"] * s["train_horizon"]
        lines[-1] = (f"- Bandit fine-tuning: {s['train_arms']} arms and horizon {s['train_horizon']} (paper 10/20 arms, horizon "
                     f"50), {s['iterations']} iterations of {s['batch']} episodes per run ({s['iterations'] * s['batch']} episodes, "
                     f"{answers} answers), one training seed, LoRA on the top {s['train']['model.trainable_layers']} layers "
                     f"instead of full fine-tuning, REINFORCE with the Monte-Carlo baseline instead of PPO, {s['episodes']} "
                     "held-out bandits.")
    if ttt:
        s = ttt["settings"]
        lines.append(f"- Tic-tac-toe: {s['ttt_iterations']} iterations of {s['ttt_batch']} games, one training seed, LoRA on "
                     f"layers 26-29, {s['games']} greedy evaluation games; an invalid move plays a random empty cell (and "
                     "costs -5 in training), so an agent that is always invalid plays like the random agent.")
    else:
        lines.append("- Tic-tac-toe fine-tuning (stage `ttt`) did not fit in the hour and was not run; "
                     "`--stages ttt` runs it.")
    total = sum(data[k]["wall_s"] for k in ("probes", "bandit", "tictactoe") if data.get(k))
    cpu = sum(data[k].get("cpu_s", nan) for k in ("probes", "bandit", "tictactoe") if data.get(k))
    lines += ["", f"Wall time of the stages {total:.0f} s, {cpu:.0f} s of CPU time, one thread each (load average "
              f"{os.getloadavg()[0]:.1f} when this report was written)."]
    write_real({"goals": goals, **({"bandit": fine} if fine else {})}, stem, data)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return [*written, RESULTS / f"{stem}.md"]


if __name__ == "__main__":
    main()
