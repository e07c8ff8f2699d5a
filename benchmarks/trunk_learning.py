"""Does training only the top K layers learn as much as LoRA on every layer, at matched KL?

The task is examples/smollm2_sentiment.yaml's (SmolLM2-135M-Instruct continues movie-review openings,
VADER scores the answer), run for 12 GRPO iterations (4 prompts x 4 answers, 24 new tokens, LoRA r 16,
kl.beta 0.05), evaluated every 3 iterations on 64 fixed prompts. Three arms: LoRA on all 30 layers
(`model.trainable_layers=0`), on the top 8 and on the top 4 (the frozen trunk run once per sequence).

Declared before any run (the protocol the results follow):
1. Pilot, seed 0: each arm at each learning rate of its grid. Per arm, the learning rate kept is the one
   with the highest final evaluation reward among those whose final evaluation KL (the sum of the
   log-ratios to the reference along the evaluation's answers: the episode KL's sampled estimate) is
   at most `--kl-max` (8 nats); an arm with none under it keeps its smallest rate.
2. Main, seeds 1, 2, 3 (fresh seeds: the pilot's selection does not leak into them), each arm at its
   kept rate. Primary endpoint: the final evaluation reward. Each top-K arm is compared with the
   all-layers arm paired by seed (same prompts, same sampling seeds); the two comparisons are
   Bonferroni-corrected at 0.05 (97.5% t-intervals on the paired differences). A top-K arm "falls short" where its
   corrected interval lies wholly below -0.1 (the margin), "matches" where it lies within +-0.1, and is
   "inconclusive" otherwise. Secondary: the final KL, the wall time, the reward-KL curves.
3. Learning is shown only where the all-layers arm's final reward exceeds its initial one by more than
   its interval; otherwise the comparison is reported as inconclusive.

    python benchmarks/trunk_learning.py [--threads 2] [--pilot-only] [--main-only] [--report-only]
Writes benchmarks/results/trunk_learning.{json,md} and trunk_learning.png; the pilot's runs are kept
in the JSON (`--main-only` reads them back from it).
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
import torch
from matplotlib.figure import Figure

from cory.api import train
from cory.config import load_config
from cory.metrics import t_interval as interval

matplotlib.use("Agg")

RESULTS = Path(__file__).parent / "results"
EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2_sentiment.yaml"
ARMS = {"all 30": 0, "top 8": 8, "top 4": 4}
GRIDS = {"all 30": [2e-4, 5e-4, 1e-3], "top 8": [1e-3, 2e-3, 4e-3], "top 4": [1e-3, 2e-3, 4e-3]}
"""Learning rates tried in the pilot; the issue's single-seed figures put the all-layers rate near
5e-4 and the top-4 rate between 5e-4 (nothing learned) and 5e-3 (KL 49)."""
ITERATIONS = 12
MARGIN = 0.1
T_9875 = {2: 25.452, 3: 6.205, 4: 4.177, 5: 3.495}
"""t quantiles at 0.9875 by sample size (df = n - 1): two-sided 97.5% intervals, each of the two
comparisons at 0.025 (Bonferroni over two)."""


NOT_LEARNED = "inconclusive (the all-layers arm's gain is not above its interval)"
"""Every comparison's verdict where the all-layers arm learned nothing measurable (rule 3)."""


def all_layers_gain(main: list[dict]) -> tuple[float, float]:
    """The all-layers arm's final minus initial reward over the main seeds: mean and 95% half-width."""
    return interval([r["final_reward"] - r["initial_reward"] for r in main if r["arm"] == "all 30"])


def run_one(arm: str, lr: float, seed: int, threads: int) -> dict:
    """One run of `arm` at learning rate `lr`: its evaluation curve and wall time."""
    overrides = [f"model.trainable_layers={ARMS[arm]}", f"algo.lr={lr}", f"train.seed={seed}", f"train.iterations={ITERATIONS}",
                 "train.batch_size=4", "algo.group_size=4", "model.lora.r=16", "model.lora.alpha=32",
                 "task.num_eval_prompts=64", "train.eval_every=3", "kl.exact_accounting=true", "train.log_with=[]",
                 "train.progress=false", f"train.num_threads={threads}", "train.checkpoint_every=0"]
    cfg = load_config(str(EXAMPLE), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        summary = train(cfg, str(out))
        wall = time.perf_counter() - t0
        evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    curve = [{"iteration": e["iteration"], "reward": e["reward_mean"], "kl": e["kl_mean"]} for e in evals]
    row = {"arm": arm, "lr": lr, "seed": seed, "wall_s": wall, "curve": curve,
           "initial_reward": summary["initial_eval"]["reward_mean"], "final_reward": curve[-1]["reward"],
           "final_kl": curve[-1]["kl"]}
    print(f"{arm:<7} lr {lr:.0e} seed {seed}: reward {row['initial_reward']:.3f} -> {row['final_reward']:.3f}, "
          f"KL {row['final_kl']:.2f}, {wall:.0f} s", flush=True)
    return row


def choose(pilot: list[dict], arm: str, kl_max: float) -> float:
    """The declared rule: the highest final reward with final KL <= kl_max; else the smallest rate."""
    mine = [r for r in pilot if r["arm"] == arm]
    under = [r for r in mine if r["final_kl"] <= kl_max]
    return max(under, key=lambda r: r["final_reward"])["lr"] if under else min(r["lr"] for r in mine)


def paired(main: list[dict], arm: str, key: str = "final_reward") -> dict:
    """Arm minus all layers, paired by seed: mean difference, its Bonferroni-corrected half-width
    (97.5% t-interval), n, and the verdict against the margin."""
    base = {r["seed"]: r[key] for r in main if r["arm"] == "all 30"}
    diffs = [r[key] - base[r["seed"]] for r in main if r["arm"] == arm and r["seed"] in base]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    half = T_9875.get(n, 3.0) * statistics.stdev(diffs) / math.sqrt(n) if n >= 2 else math.nan
    lo, hi = mean - half, mean + half
    verdict = "falls short" if hi < -MARGIN else "matches" if (lo >= -MARGIN and hi <= MARGIN) else "inconclusive"
    return {"mean": mean, "half_corrected": half, "n": n, "verdict": verdict}


def plot(main: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for arm in ARMS:
        mine = [r for r in main if r["arm"] == arm]
        if not mine:
            continue
        its = [p["iteration"] for p in mine[0]["curve"]]
        reward = [statistics.fmean(r["curve"][i]["reward"] for r in mine) for i in range(len(its))]
        kl = [statistics.fmean(r["curve"][i]["kl"] for r in mine) for i in range(len(its))]
        label = f"{arm} (lr {mine[0]['lr']:.0e})"
        axes[0].plot(its, reward, marker="o", label=label)
        axes[1].plot(kl, reward, marker="o", label=label)
        for r in mine:
            axes[1].plot([p["kl"] for p in r["curve"]], [p["reward"] for p in r["curve"]], alpha=0.2, color=axes[1].lines[-1].get_color())
    axes[0].set(title="evaluation reward (mean of 3 seeds)", xlabel="iteration", ylabel="VADER reward")
    axes[1].set(title="reward against episode KL (each seed faint)", xlabel="episode KL to the reference (nats, evaluation)", ylabel="VADER reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict) -> list[str]:
    pilot, main, kept = result["pilot"], result["main"], result["kept_lr"]
    lines = ["# Training only the top layers: learning at matched KL (SmolLM2-135M-Instruct, sentiment)", "",
             f"12 GRPO iterations (4 prompts x 4 answers, 24 new tokens), LoRA r 16, kl.beta 0.05, float32, "
             f"{result['threads']} threads; evaluation on 64 fixed prompts every 3 iterations. Protocol declared in "
             "`benchmarks/trunk_learning.py` before the runs.", "",
             f"## Pilot (seed 0): learning rate per arm (kept: highest final reward with final KL <= {result['kl_max']:g})", "",
             "| arm | lr | final reward | final KL | wall time |", "|---|---|---|---|---|"]
    for r in pilot:
        mark = " (kept)" if kept.get(r["arm"]) == r["lr"] else ""
        lines.append(f"| {r['arm']} | {r['lr']:.0e}{mark} | {r['final_reward']:.3f} | {r['final_kl']:.2f} | {r['wall_s']:.0f} s |")
    if main:
        lines += ["", f"## Main (seeds {sorted({r['seed'] for r in main})}): mean ± 95% t-interval", "",
                  "| arm | lr | initial reward | final reward | final KL | wall time |", "|---|---|---|---|---|---|"]
        for arm in ARMS:
            mine = [r for r in main if r["arm"] == arm]
            if mine:
                cells = [interval([r[k] for r in mine]) for k in ("initial_reward", "final_reward", "final_kl", "wall_s")]
                lines.append(f"| {arm} | {kept[arm]:.0e} | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in cells[:3])
                             + f" | {cells[3][0]:.0f} ± {cells[3][1]:.0f} s |")
        learned = result["learned"]
        gain, half = all_layers_gain(main)
        lines += ["", f"All 30 layers, final minus initial reward: {gain:+.3f} ± {half:.3f} "
                  f"({'learning shown' if learned else 'no learning shown: the interval reaches zero'}).", "", "Paired by seed against all 30 layers (final reward; Bonferroni-corrected over the two comparisons, "
                  f"margin ±{MARGIN}):", "", "| arm | difference | corrected interval | verdict |", "|---|---|---|---|"]
        for arm, c in result["comparisons"].items():
            verdict = c["verdict"] if learned else NOT_LEARNED
            lines.append(f"| {arm} | {c['mean']:+.3f} | [{c['mean'] - c['half_corrected']:+.3f}, "
                         f"{c['mean'] + c['half_corrected']:+.3f}] | {verdict} |")
        lines += ["", "![reward and reward-KL curves](trunk_learning.png)"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-max", type=float, default=8.0)
    ap.add_argument("--pilot-only", action="store_true")
    ap.add_argument("--main-only", action="store_true", help="reuse the pilot in the results JSON")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plot from the results JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "trunk_learning.json"
    if args.report_only:
        result = json.loads(path.read_text())
        if result["main"]:
            plot(result["main"], RESULTS / "trunk_learning.png")
        (RESULTS / "trunk_learning.md").write_text("\n".join(report(result)) + "\n")
        return
    if args.main_only:
        pilot = json.loads(path.read_text())["pilot"]
    else:
        pilot = [run_one(arm, lr, 0, args.threads) for arm in ARMS for lr in GRIDS[arm]]
    kept = {arm: choose(pilot, arm, args.kl_max) for arm in ARMS}
    result = {"threads": args.threads, "kl_max": args.kl_max, "pilot": pilot, "kept_lr": kept, "main": []}
    if not args.pilot_only:
        result["main"] = [run_one(arm, kept[arm], seed, args.threads) for seed in args.seeds for arm in ARMS]
        gain = all_layers_gain(result["main"])
        result["learned"] = bool(gain[0] - gain[1] > 0)
        result["comparisons"] = {arm: paired(result["main"], arm) for arm in ("top 8", "top 4")}
        plot(result["main"], RESULTS / "trunk_learning.png")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    lines = report(result)
    (RESULTS / "trunk_learning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
