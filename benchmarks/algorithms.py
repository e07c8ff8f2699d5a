"""Every algorithm on both tasks with the same number of generated samples per iteration.

For each task (sentiment, arithmetic), algorithm and seed, trains for `--iterations` iterations with
32 sampled responses per iteration (GRPO and RLOO: 8 prompts x 4 samples) and records the final
evaluation reward on the task's fixed prompt set, the final episode KL to the reference, and the wall
time. Prints a table (mean and 95% interval over seeds) and writes PNG curves.

    python benchmarks/algorithms.py [--iterations 40] [--seeds 0 1 2] [--tasks sentiment arithmetic]
                                    [--algos dr_grpo dapo ...] [--merge]
Writes benchmarks/results/algorithms.{json,md} and benchmarks/results/algorithms_<task>.png. With
--merge the runs replace those of the same task and algorithm in the existing results, and the
table and plots are rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from cory.config import load_config
from cory.metrics import t_interval as interval
from cory.train import TrainingRun

matplotlib.use("Agg")

RESULTS = Path(__file__).parent / "results"
ALGOS = ["reinforce", "a2c", "ppo", "grpo", "rloo", "dr_grpo", "dapo", "gspo", "cispo"]
TASKS = {
    "sentiment": ["model.name=cory:tiny-reviews", "task.name=sentiment", "task.reward=cory:tiny-sentiment",
                  "generation.max_new_tokens=16", "algo.lr=3e-4", "kl.beta=0.05"],
    "arithmetic": ["model.name=cory:tiny-arith", "task.name=arithmetic", "generation.max_new_tokens=24",
                   "generation.stop_strings=[Question]", "algo.lr=1e-4", "kl.beta=0.01", "eval.temperature=0"],
}
PER_ALGO = {
    "reinforce": ["train.batch_size=32"],
    "a2c": ["train.batch_size=32"],
    "ppo": ["train.batch_size=32", "algo.epochs=2", "algo.minibatch_size=16"],
    "grpo": ["train.batch_size=8", "algo.group_size=4"],
    "rloo": ["train.batch_size=8", "algo.group_size=4"],
    "dr_grpo": ["train.batch_size=8", "algo.group_size=4"],
    "dapo": ["train.batch_size=8", "algo.group_size=4"],
    "gspo": ["train.batch_size=8", "algo.group_size=4"],
    "cispo": ["train.batch_size=8", "algo.group_size=4"],
}




def run_one(task: str, algo: str, seed: int, iterations: int) -> dict:
    overrides = TASKS[task] + PER_ALGO[algo] + [
        f"algo.name={algo}", f"train.seed={seed}", f"train.iterations={iterations}", "train.log_with=[]",
        "train.progress=false", "task.num_eval_prompts=64"]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = TrainingRun(load_config(None, overrides), out).run()
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"task": task, "algo": algo, "seed": seed, "wall_s": wall,
            "initial_reward": summary["initial_eval"]["reward_mean"], "final_reward": summary["final_eval"]["reward_mean"],
            "final_kl": summary["final_eval"]["kl_mean"],
            "curve": [{"iteration": r["iteration"], "reward_mean": r["reward_mean"], "kl_mean": r["kl_mean"]} for r in rows]}


def plot(task: str, runs: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algo in ALGOS:
        mine = [r for r in runs if r["algo"] == algo]
        if not mine:
            continue
        its = [p["iteration"] for p in mine[0]["curve"]]
        for ax, key in zip(axes, ("reward_mean", "kl_mean")):
            ys = [statistics.fmean(r["curve"][i][key] for r in mine) for i in range(len(its))]
            ax.plot(its, ys, label=algo)
    axes[0].set_title(f"{task}: training reward (mean over seeds)")
    axes[1].set_title(f"{task}: episode KL to the reference")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--algos", nargs="+", default=ALGOS, choices=ALGOS)
    ap.add_argument("--merge", action="store_true", help="merge into the existing results instead of replacing them")
    ap.add_argument("--note", default="", help="a line added under the table's caption (e.g. which rows were measured when)")
    args = ap.parse_args()
    runs = []
    for task in args.tasks:
        for algo in args.algos:
            for seed in args.seeds:
                r = run_one(task, algo, seed, args.iterations)
                print(f"{task:<11} {algo:<10} seed {seed}: reward {r['initial_reward']:.3f} -> {r['final_reward']:.3f}, "
                      f"KL {r['final_kl']:.2f}, {r['wall_s']:.0f} s", flush=True)
                runs.append(r)
    RESULTS.mkdir(exist_ok=True)
    if args.merge and (RESULTS / "algorithms.json").exists():
        fresh = {(r["task"], r["algo"]) for r in runs}
        kept = [r for r in json.loads((RESULTS / "algorithms.json").read_text()) if (r["task"], r["algo"]) not in fresh]
        runs = kept + runs
        args.tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
        args.algos = [a for a in ALGOS if any(r["algo"] == a for r in runs)]
    lines = [f"# Algorithms on the embedded tasks ({args.iterations} iterations, 32 samples each, seeds {args.seeds})", "",
             "Final reward and episode KL: evaluation on the fixed prompt set; mean ± 95% interval over seeds.", "",
             *([args.note, ""] if args.note else []),
             "| task | algorithm | initial reward | final reward | final episode KL | wall time (s) |", "|---|---|---|---|---|---|"]
    for task in args.tasks:
        for algo in args.algos:
            mine = [r for r in runs if r["task"] == task and r["algo"] == algo]
            if not mine:
                continue
            cells = [interval([r[k] for r in mine]) for k in ("initial_reward", "final_reward", "final_kl", "wall_s")]
            lines.append(f"| {task} | {algo} | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in cells) + " |")
        plot(task, [r for r in runs if r["task"] == task], RESULTS / f"algorithms_{task}.png")
    (RESULTS / "algorithms.json").write_text(json.dumps(runs, indent=2))
    (RESULTS / "algorithms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
