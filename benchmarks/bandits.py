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
core. Prompts are chat turns after one example turn that shows the answer format; evaluation is greedy.
Stage `probes`: the untrained model plays Gaussian bandits (5/10/20 arms, button and continuous, with
and without chain of thought, horizon 50, the last 5 steps shown) next to UCB1 and random, answers
frequency-bias and knowing-doing probes; the report puts the paper's Gemma2 figures beside it. Stage
`bandit`: REINFORCE with the Monte-Carlo baseline, the -5 invalid-action penalty and the exploration
bonus, LoRA on the top 4 layers, on 5-armed bandits of horizon 10; before/after against UCB1 and
random on the same held-out bandits, and the training run's initial evaluation checked against a
fresh one. Stage `ttt`: PPO (value head + GAE) on tic-tac-toe against a random opponent. Stages can
run in separate invocations; each merges its results into the report.

    python benchmarks/bandits.py --model real [--stages probes bandit ttt report] [--iterations 6] [--quick]
Writes benchmarks/results/bandits_real.{json,md}, bandits_real_{coverage,frequency}.png and
bandits_real_ft_{regret,coverage}.png (--quick: bandits_real_quick.*). The committed report came from

    python benchmarks/bandits.py --model real --fresh --stages probes --cot 0
    python benchmarks/bandits.py --model real --stages probes --cot 1 --arms 10 20 --variants button --kd-arms
    python benchmarks/bandits.py --model real --stages ttt --ttt-iterations 10 --ttt-batch 8 --games 32
    python benchmarks/bandits.py --model real --stages bandit --iterations 6
    python benchmarks/bandits.py --model real --stages report
(the probes 29 minutes of one thread on a loaded machine; the tic-tac-toe and bandit stages ran side
by side with other benchmarks, at one thread each on the two cores: their wall and CPU times are in
the report).
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--iterations", type=int, help="bandit fine-tuning iterations (tiny: 22 of 8 episodes; real: 6)")
    ap.add_argument("--ttt-iterations", type=int, help="tic-tac-toe fine-tuning iterations (tiny: 40 of 32 games; real: 4)")
    ap.add_argument("--episodes", type=int, help="bandits per evaluation (tiny: 64; real: 8)")
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
    real.add_argument("--ttt-batch", type=int, default=8, help="tic-tac-toe games per fine-tuning iteration")
    args = ap.parse_args()
    defaults = {"tiny": (22, 40, 64, 100, 200), "real": (6, 4, 8, 16, 16)}[args.model]
    for key, value in zip(("iterations", "ttt_iterations", "episodes", "probes", "games"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model == "real":
        if args.quick:
            args.seeds, args.arms, args.variants, args.horizon, args.probe_episodes, args.probes = args.seeds[:1], [5], ["button"], 4, 2, 2
            args.kd_arms, args.kd_probes, args.kd_tokens, args.cot_tokens = [5], 2, 16, 16
            args.iterations, args.train_horizon, args.episodes, args.batch, args.sanity_episodes = 1, 3, 2, 2, 2
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


def real_bandit_row(records, example_label: int | None = None) -> dict:
    row = bandit_row(records)
    row["regret_curves"], row["coverage_curves"] = regret_curves(records).tolist(), coverage_curves(records).tolist()
    row["regret_ci"] = episode_interval(records, lambda r: r.total_regret)[1]
    row["coverage_ci"] = episode_interval(records, lambda r: coverage(r.executed, r.n_actions)[-1])[1]
    row["valid_ci"] = episode_interval(records, lambda r: r.valid_rate)[1]
    # Invalid answers execute a random arm, which counts in `coverage`; this counts only the arms the
    # agent named itself.
    own = [len({a for a in r.actions if a is not None}) / r.n_actions for r in records]
    row["own_coverage"], row["own_coverage_ci"] = interval(own)
    if example_label is not None:
        answered = [a for r in records for a in r.actions if a is not None]
        row["example_label_rate"] = sum(a == example_label for a in answered) / len(answered) if answered else float("nan")
    return row


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


# Fine-tuning settings (cut to fit an hour of one core, see the report): REINFORCE with the Monte-Carlo
# baseline on rewards-to-go, the -5 invalid-action penalty (the environment's default), the exploration
# bonus, LoRA on the top layers only (the backward pass stops there), exact KL accounting off (it costs
# one more forward pass over every turn).
REAL_LORA_LAYERS = (26, 27, 28, 29)
REAL_LORA_TARGETS = [f"layers.{i}.{m}" for i in REAL_LORA_LAYERS
                     for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
REAL_BANDIT_TRAIN = {
    "env.pool_size": 512, "algo.name": "reinforce", "algo.baseline": "mean", "algo.gamma": 0.5, "algo.lr": 1e-3,
    "kl.beta": 0.05, "kl.exact_accounting": False, "model.lora.r": 16, "model.lora.alpha": 32,
    "model.lora.targets": REAL_LORA_TARGETS,
}
REAL_BANDIT_ENV = {"exploration_bonus": 1.0, "reward_norm": "standard"}
REAL_TTT_TRAIN = {
    "algo.name": "ppo", "algo.gamma": 1.0, "algo.lr": 1e-3, "kl.beta": 0.05, "kl.exact_accounting": False,
    "model.lora.r": 16, "model.lora.alpha": 32, "model.lora.targets": REAL_LORA_TARGETS,
}


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
    """RL fine-tuning on bandits; the untrained and trained model, UCB1 and random on the same held-out
    bandits; the training run's own initial evaluation checked against the fresh one."""
    t0, c0 = time.perf_counter(), time.process_time()
    seed = args.seeds[0]
    kw = real_env_kwargs(args.train_arms, "button", False, args.train_horizon, args.history)
    params = real_params(BANDIT, kw, args.answer_tokens)
    sampled = replace(params, temperature=1.0)  # as training samples its rollouts
    with policy.frozen_prefix():
        before_records, _ = play_policy(policy, BANDIT, kw, args.episodes, params, seed)
        before_sampled, _ = play_policy(policy, BANDIT, kw, args.episodes, sampled, seed)
    runs = {"random": real_bandit_row(play_agent("random", BANDIT, kw, args.episodes, seed)),
            "UCB1": real_bandit_row(play_agent("ucb1", BANDIT, kw, args.episodes, seed)),
            "before": real_bandit_row(before_records, example_label=2),
            "before_t1": real_bandit_row(before_sampled, example_label=2)}
    log(f"bandit before: regret {runs['before']['regret']:.2f}, coverage {runs['before']['coverage']:.2f}, "
        f"valid {runs['before']['valid_rate']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        config = write_real_config(Path(tmp) / "bandit.yaml", BANDIT, {**kw, **REAL_BANDIT_ENV},
                                   {**REAL_BANDIT_TRAIN, "train.batch_size": args.batch}, seed, args.iterations,
                                   args.sanity_episodes, seed, args.answer_tokens)
        run = real_fine_tune(config, str(Path(tmp) / "run"))
        log(f"bandit fine-tuning: {args.iterations} iterations in {run['wall_s']:.0f} s, train reward "
            f"{', '.join(f'{x:.2f}' for x in run['train_reward'])}")
        trained = Policy.from_pretrained(str(Path(tmp) / "run" / "final"))
        with trained.frozen_prefix():
            after_records, _ = play_policy(trained, BANDIT, kw, args.episodes, params, seed)
            after_sampled, _ = play_policy(trained, BANDIT, kw, args.episodes, sampled, seed)
    runs["after"] = real_bandit_row(after_records, example_label=2)
    runs["after_t1"] = real_bandit_row(after_sampled, example_label=2)
    keys = ("regret_mean", "coverage_final", "valid_rate", "env_return_mean")
    # Shaped rewards differ (the bonus and normalisation act in training only): compare the
    # environment's own quantities.
    with policy.frozen_prefix():
        fresh = episode_metrics(play_policy(policy, BANDIT, kw, args.sanity_episodes, params, seed)[0])
    sanity = {k: {"training_run": run["summary"]["initial_eval"][k], "fresh": fresh[k]} for k in keys}
    sanity_ok = all(abs(v["training_run"] - v["fresh"]) < 1e-9 for v in sanity.values())
    log(f"bandit after: regret {runs['after']['regret']:.2f}, coverage {runs['after']['coverage']:.2f}, valid "
        f"{runs['after']['valid_rate']:.3f}; initial evaluation matches a fresh one: {sanity_ok}")
    keys = ("train_arms", "train_horizon", "history", "iterations", "batch", "episodes", "sanity_episodes", "answer_tokens")
    return {"settings": {**stage_settings(args, keys), "train": REAL_BANDIT_TRAIN, "env": REAL_BANDIT_ENV},
            "runs": {k: strip_records(v) for k, v in runs.items()},
            "training": {k: v for k, v in run.items() if k != "summary"},
            "final_eval": {k: v for k, v in run["summary"]["final_eval"].items() if k != "samples"},
            "sanity": sanity, "sanity_ok": sanity_ok, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


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
        "random arm, which counts in `coverage`: where answers are often invalid (the continuous variant), coverage "
        "comes from that fallback, not from the model. Evaluation is greedy (temperature 0, as in the paper); "
        "intervals are 95% t-intervals over episodes of one evaluation seed.", "",
    ]
    if probes:
        s = probes["settings"]
        lines += [
            "## 1. Before any training", "",
            f"Gaussian bandits (sigma 1, horizon {s['horizon']}, the last {s['history']} steps of history shown; `n` per row), "
            "UCB1 and random on the same instances; frequency-bias probes (`probes` per row, without chain of thought: the "
            "summed log-probability of `ACTION=<label>` after the chat prompt); at most "
            f"{s['answer_tokens']} answer tokens without and {s['cot_tokens']} with chain of thought.", "",
            f"| arms | variant | CoT | n | regret | UCB1 | random | coverage at step {s['horizon']} | UCB1 | random | valid actions "
            "| probes | F_f / F_g / F_o | copies example | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cells:
            p = c.get("probe")
            fb = f"{p['F_f']:.2f} / {p['F_g']:.2f} / {p['F_o']:.2f}" if p else "-"
            lines.append(
                f"| {c['n_arms']} | {c['variant']} | {'yes' if c['cot'] else 'no'} | {c['episodes']} | {ci_cell(c['regret'], c['regret_ci'])} | "
                f"{c['UCB1']['regret']:.2f} | {c['random']['regret']:.2f} | {ci_cell(c['coverage'], c['coverage_ci'])} | "
                f"{c['UCB1']['coverage']:.2f} | {c['random']['coverage']:.2f} | {ci_cell(c['valid_rate'], c['valid_ci'], '.3f')} | "
                f"{c['probes'] or '-'} | {fb} | {c.get('example_label_rate', nan):.2f} | {c['wall_s']:.0f} |")
        if knowing:
            lines += ["", f"Knowing-doing probe ({knowing[0]['probes']} probes per row, button variant, chain of thought, at most "
                      f"{s['kd_tokens']} tokens): `knowing` = its `<ucb_values>` name the true top-UCB arm; the action is "
                      "optimal / greedy / other / invalid.", "",
                      "| arms | knowing | optimal | greedy | other | invalid |", "|---|---|---|---|---|---|"]
            for k in knowing:
                lines.append(f"| {k['n_arms']} | {k['knowing']:.2f} | {k['optimal']:.2f} | {k['greedy']:.2f} | {k['other']:.2f} | "
                             f"{k['invalid']:.2f} |")

        def cov(k, cot):
            vals = [c["coverage"] for c in cells if c["n_arms"] == k and c["cot"] == cot]
            return f"{statistics.mean(vals):.2f}" if vals else "not run"

        ff = [c["probe"]["F_f"] for c in probed]
        lines += [
            "", "Side by side with the paper's Gemma2 figures (from the shared reference notes; the paper: 64 bandits, "
            "horizon 50, the whole history, up to 256 tokens); SmolLM2 cells are means over the variants run:", "",
            "| measure | SmolLM2-135M (here) | Gemma2 2B | Gemma2 9B | Gemma2 27B |", "|---|---|---|---|---|",
            f"| coverage at step 50, 10 arms, CoT | {cov(10, True)} | 0.40 | 0.65 | 0.65 |",
            f"| coverage at step 50, 10 arms, no CoT | {cov(10, False)} | 0.25 (the paper's no-CoT figure) | | |",
            f"| coverage at step 50, 20 arms | CoT {cov(20, True)}, no CoT {cov(20, False)} | <= 0.45 | <= 0.45 | <= 0.45 |",
            f"| F_f (frequency bias) | {statistics.mean(ff):.2f} | 0.96 | | 0.14 |" if ff else "| F_f | not run | 0.96 | | 0.14 |",
            (f"| knowing (correct UCB rationale) | {statistics.mean(k['knowing'] for k in knowing):.2f} | | | 0.87 |"
             if knowing else "| knowing | not run | | | 0.87 |"),
            "", f"Probes took {probes['wall_s']:.0f} s.",
        ]
    goals = {}
    if fine:
        s, r = fine["settings"], fine["runs"]
        lines += ["", "## 2. RL fine-tuning on bandits", "",
                  f"{s['train_arms']}-armed Gaussian bandits (button variant, sigma 1, horizon {s['train_horizon']}, no chain of "
                  f"thought), {s['iterations']} iterations x {s['batch']} episodes from a pool of 512 training bandits; "
                  f"{', '.join(f'{k}={v}' for k, v in s['train'].items() if k != 'model.lora.targets')}, LoRA on layers "
                  f"{REAL_LORA_LAYERS[0]}-{REAL_LORA_LAYERS[-1]} of 30 (the backward pass stops there), environment "
                  f"{s['env']} plus the -5 invalid-action penalty. Evaluated on {s['episodes']} held-out bandits.", "",
                  f"| agent | regret at step {s['train_horizon']} | coverage at step {s['train_horizon']} | arms it named | valid actions "
                  "| copies example |",
                  "|---|---|---|---|---|---|"]
        for name in ("random", "UCB1", "before", "after", "before_t1", "after_t1"):
            if name not in r:
                continue
            row = r[name]
            label = {"before": "SmolLM2, before (greedy)", "after": "SmolLM2, fine-tuned (greedy)",
                     "before_t1": "SmolLM2, before (temperature 1)", "after_t1": "SmolLM2, fine-tuned (temperature 1)"}.get(name, name)
            lines.append(f"| {label} | {ci_cell(row['regret'], row['regret_ci'])} | {ci_cell(row['coverage'], row['coverage_ci'])} | "
                         f"{ci_cell(row.get('own_coverage', nan), row.get('own_coverage_ci', nan))} | "
                         f"{ci_cell(row['valid_rate'], row['valid_ci'], '.3f')} | {row.get('example_label_rate', nan):.2f} |")
        # Coverage counts the random arm an invalid answer executes; the goal is about the arms the model
        # itself chose, so it is judged on those (greedy, as evaluated).
        gain = r["after"]["own_coverage"] - r["before"]["own_coverage"]
        goals["regret_down"] = {"goal": "after < before (greedy)", "measured": r["after"]["regret"] - r["before"]["regret"],
                                "met": r["after"]["regret"] < r["before"]["regret"]}
        goals["coverage_gain"] = {"goal": ">= 12 points of the arms it named (greedy)", "measured": gain, "met": gain >= 0.12}
        t = fine["training"]
        lines += ["", f"Fine-tuning took {t['wall_s']:.0f} s (median iteration {statistics.median(t['iteration_s']):.0f} s; "
                  f"the stage with its evaluations {fine['wall_s']:.0f} s); training reward per iteration "
                  f"{', '.join(f'{x:.2f}' for x in t['train_reward'])}.",
                  f"Sanity: the training run's own initial evaluation ({s['sanity_episodes']} bandits) equals a fresh "
                  f"evaluation of the untrained model on the same seed and instances: {'yes' if fine['sanity_ok'] else 'NO'} ("
                  + ", ".join(f"{k} {v['training_run']:.4f} vs {v['fresh']:.4f}" for k, v in fine["sanity"].items()) + ")."]
    if ttt:
        s = ttt["settings"]
        lines += ["", "## 3. RL fine-tuning on tic-tac-toe", "",
                  f"Agent first against a random opponent; PPO with a value head and GAE, LoRA as above, {s['ttt_iterations']} "
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
        lines += ["", "| paper anchor | target | measured | met |", "|---|---|---|---|"]
        for key, g in goals.items():
            lines.append(f"| {key} | {g['goal']} | {g['measured']:.3f} | {'yes' if g['met'] else 'no'} |")
    lines += ["", "## Cut relative to the papers", "",
              "- Bandits per cell 4 (paper 64), one evaluation seed, the last 5 steps of history (paper: all of them), "
              "48 tokens for chain of thought (paper 256); chain of thought only where a row says so.",
              "- Every prompt carries one example turn (the paper's models follow the format without one), so the "
              "model's choices partly copy that example (`copies example`).",
              "- Fine-tuning: 5 arms and horizon 10 (paper 10/20 arms, horizon 50), a few iterations of 4 episodes, one "
              "training seed, LoRA on the top 4 layers instead of full fine-tuning, REINFORCE with the Monte-Carlo "
              "baseline instead of PPO."]
    if ttt:
        s = ttt["settings"]
        lines.append(f"- Tic-tac-toe: {s['ttt_iterations']} iterations of {s['ttt_batch']} games, one training seed, LoRA on the "
                     f"top 4 layers, {s['games']} greedy evaluation games; an invalid move plays a random empty cell (and "
                     "costs -5 in training), so an agent that is always invalid plays like the random agent.")
    else:
        lines.append("- Tic-tac-toe fine-tuning (stage `ttt`) did not fit in the hour and was not run; "
                     "`--stages ttt` runs it.")
    total = sum(data[k]["wall_s"] for k in ("probes", "bandit", "tictactoe") if data.get(k))
    cpu = sum(data[k].get("cpu_s", nan) for k in ("probes", "bandit", "tictactoe") if data.get(k))
    lines += ["", f"Wall time of the stages {total:.0f} s, {cpu:.0f} s of CPU time, one thread each (load average "
              f"{os.getloadavg()[0]:.1f} when this report was written)."]
    write_real({"goals": goals}, stem, data)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return [*written, RESULTS / f"{stem}.md"]


if __name__ == "__main__":
    main()
