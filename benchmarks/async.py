"""Asynchronous rollouts (train.max_staleness = k) against the synchronous loop (k = 0) on
SmolLM2-135M-Instruct (`cory:smollm2-135m-instruct`), on this CPU: trainer and rollout worker one
thread (one core) each; the synchronous run one thread too.

The run: the sentiment task with chat prompts, VADER's score of the response as the reward, GRPO
(group 4), LoRA r 8 on every linear layer (only the adapters travel to the worker), the default
importance correction (token-level TIS, cap 2). For each k in --staleness and each seed:
- iterations per hour: 3600 / the median `time/iteration` of iterations 2..N (the first one also
  waits for the worker to start and load the model, so both modes drop it; the median, because the
  shared machine's other work stalls some iterations many times over); evaluation and checkpoints
  are outside `time/iteration`;
- reward per sample: the mean training reward (`reward_mean`, VADER on the sampled responses) over
  all iterations, and its curve per iteration;
- the worker's versions: the largest staleness trained on, and the measured behaviour gap.
Means over seeds with 95% t-intervals; the speedup is k's iterations per hour over k = 0's, per seed
then averaged. The machine is shared: the 1-minute load average is recorded before and after each run.

    python benchmarks/async.py [--iterations 30] [--seeds 0 1 2] [--staleness 0 1 2] [--batch-size 2]
Writes benchmarks/results/async.{json,md} (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from cory.api import train
from cory.config import load_config
from cory.metrics import t_interval
from cory.report import read_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "cory:smollm2-135m-instruct"


def overrides(k: int, seed: int, args) -> list[str]:
    out = [f"model.name={MODEL}", "model.lora.r=8", "model.lora.alpha=16", "task.name=sentiment", "task.chat_template=true",
           "task.reward=vader", "task.reward_on=response", "task.num_eval_prompts=2", "eval.samples_per_prompt=1",
           f"generation.max_new_tokens={args.new_tokens}", "algo.name=grpo", "algo.group_size=4", "algo.lr=3e-5",
           "kl.beta=0.05", "kl.exact_accounting=false", f"train.iterations={args.iterations}",
           f"train.batch_size={args.batch_size}", f"train.seed={seed}", "train.num_threads=1", "train.log_with=[]",
           "train.progress=false", f"train.max_staleness={k}"]
    return out


def one_run(k: int, seed: int, args, root: Path) -> dict:
    cfg = load_config(None, overrides(k, seed, args))
    out = root / f"k{k}_seed{seed}"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    train(cfg, out, overwrite=True)
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "metrics.jsonl")
    timed = [r["time/iteration"] for r in rows[1:]]
    result = {
        "k": k, "seed": seed, "iterations": len(rows), "wall_s": wall,
        "iterations_per_hour": 3600 / statistics.median(timed),
        "seconds_per_iteration": statistics.median(timed),
        "seconds_per_iteration_mean": sum(timed) / len(timed),
        "generate_s": statistics.median(r["time/generate"] for r in rows[1:]),
        "update_s": statistics.median(r["time/update"] for r in rows[1:]),
        "reward_per_sample": sum(r["reward_mean"] for r in rows) / len(rows),
        "reward_curve": [r["reward_mean"] for r in rows],
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    if k:
        result["staleness_max"] = max(r["async/staleness_max"] for r in rows)
        result["behaviour_gap_max"] = max(r["async/behaviour_gap"] for r in rows)
        result["wait_s"] = statistics.median(r["async/wait"] for r in rows[1:])
        result["publish_s"] = statistics.median(r["async/publish"] for r in rows[1:])
        result["is_log_ratio_abs_mean"] = sum(r["is/log_ratio_abs_mean"] for r in rows) / len(rows)
    print(json.dumps({key: v for key, v in result.items() if key != "reward_curve"}), flush=True)
    return result


def summarise(runs: list[dict], staleness: list[int]) -> dict:
    by_k = {k: sorted((r for r in runs if r["k"] == k), key=lambda r: r["seed"]) for k in staleness}
    base = {r["seed"]: r for r in by_k.get(0, [])}
    summary = {}
    for k, rs in by_k.items():
        s = {"iterations_per_hour": t_interval([r["iterations_per_hour"] for r in rs]),
             "reward_per_sample": t_interval([r["reward_per_sample"] for r in rs]),
             "load": [round(r["load_before"], 2) for r in rs] + [round(r["load_after"], 2) for r in rs]}
        if base and k:
            s["speedup"] = t_interval([r["iterations_per_hour"] / base[r["seed"]]["iterations_per_hour"] for r in rs if r["seed"] in base])
        summary[k] = s
    return summary


def markdown(results: dict) -> str:
    a, summary = results["settings"], results["summary"]
    lines = ["# Asynchronous rollouts on SmolLM2-135M-Instruct (CPU)", "",
             f"Generated by `python benchmarks/async.py {a['argv']}` on {results['date']} ({results['cpus']} CPUs, "
             "shared with other work: the 1-minute load averages around each run are listed). Trainer and rollout worker "
             "one thread each; the synchronous run (k = 0) one thread. Sentiment task with chat prompts, VADER reward, GRPO "
             f"(group 4), LoRA r 8, {a['batch_size']} prompts x 4 samples per iteration, {a['new_tokens']} new tokens at most, "
             f"{a['iterations']} iterations, seeds {a['seeds']}. Iterations per hour are 3600 / the median seconds per "
             "iteration, leaving out the first iteration (which waits for the worker to start); reward per sample is the mean training reward over all iterations. "
             "Means over seeds with 95% t-intervals.", "",
             "| k | iterations / hour | speedup vs k = 0 | reward per sample | load averages |",
             "|---|---|---|---|---|"]
    for k, s in summary.items():
        ips, rew = s["iterations_per_hour"], s["reward_per_sample"]
        speed = f"{s['speedup'][0]:.2f} ± {s['speedup'][1]:.2f}" if "speedup" in s else "1"
        lines.append(f"| {k} | {ips[0]:.0f} ± {ips[1]:.0f} | {speed} | {rew[0]:.3f} ± {rew[1]:.3f} | "
                     f"{', '.join(map(str, s['load']))} |")
    lines += ["", "Per run, medians over iterations 2..N (seconds per iteration: the trainer's wall time; generate: the sampler's time for a batch; "
              "update: the learner's step; wait: time the trainer waited for the worker's batch; publish: sending the "
              "weights; gap: the largest behaviour log-prob gap at the batch's own version):", "",
              "| k | seed | s / iteration | generate s | update s | wait s | publish s | max staleness | gap | reward per sample |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        extra = (f"{r['wait_s']:.2f} | {r['publish_s']:.3f} | {r['staleness_max']} | {r['behaviour_gap_max']:.1e}" if r["k"]
                 else "- | - | 0 | -")
        lines.append(f"| {r['k']} | {r['seed']} | {r['seconds_per_iteration']:.2f} | {r['generate_s']:.2f} | {r['update_s']:.2f} | "
                     f"{extra} | {r['reward_per_sample']:.3f} |")
    lines += ["", "Reward per sample by iteration (mean over seeds):", "",
              "| k | " + " | ".join(str(i + 1) for i in range(a["iterations"])) + " |",
              "|---|" + "---|" * a["iterations"]]
    for k in summary:
        curves = [r["reward_curve"] for r in results["runs"] if r["k"] == int(k)]
        means = [sum(c[i] for c in curves) / len(curves) for i in range(a["iterations"])]
        lines.append(f"| {k} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", default=str(RESULTS / "async"), help="results path without suffix")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="cory-async-") as root:
        for seed in args.seeds:  # seeds outermost: the modes of one seed run close in time (similar load)
            for k in args.staleness:
                runs.append(one_run(k, seed, args, Path(root)))
    argv = (f"--iterations {args.iterations} --seeds {' '.join(map(str, args.seeds))} --staleness "
            f"{' '.join(map(str, args.staleness))} --batch-size {args.batch_size} --new-tokens {args.new_tokens}")
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
               "settings": {**vars(args), "argv": argv}, "runs": runs,
               "summary": {str(k): v for k, v in summarise(runs, args.staleness).items()}}
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    Path(args.out).with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
