"""The pilot of the real-model CORY experiment: does single-agent RL learn at all, and at what settings?

Before CORY and single-agent RL are compared on SmolLM2-135M-Instruct, one seed of the single-agent
run must raise the evaluation reward by more than two standard errors; otherwise a comparison of the
two could only say that neither learned. Declared before the runs:

- Task: examples/smollm2_sentiment.yaml's. Review openings as chat prompts, the reward VADER's
  compound score of the response alone, answers of up to `--new-tokens` (48) tokens so that most
  end at the end of turn (the rate is reported).
- Algorithm, as the main experiment will run it: GRPO (group 4), LoRA r 16 on the top 8 decoder
  layers (`model.trainable_layers=8`: the frozen trunk runs once per sequence), kl.beta 0.05 with
  the exact episode KL accounted, 8 prompts x 4 answers an iteration, `--iterations` (30), seed 0,
  float32, 2 threads.
- Evaluation: the run's own, on 64 fixed prompts x 2 samples, at iteration 0 and every 10.
- Learning rates tried in the order of `LRS` (benchmarks/trunk_learning.py kept 2e-3 for the top 8
  at 12 iterations of 4 prompts, where its KL reached 7 nats): the pilot passes at the first rate
  whose final evaluation reward exceeds the initial one by more than two standard errors,
  SE = sqrt(s0^2 / n0 + s1^2 / n1) with s the evaluations' sample standard deviations over their n
  answers (unpaired, so conservative: both evaluations answer the same prompts). Every run tried is
  reported; none is left out.
- What the main experiment takes from it: the passing run's learning rate, iterations, group size
  and answer length, and its wall time per iteration for the budget.
- `--kl-check`, after a passing pilot: does the KL coefficient control the KL? The passing settings
  run again at each kl.beta of `KL_BETAS`; the KL control acts where the final evaluation's
  episode KL at the larger beta is below that at the smaller by more than two standard errors
  (SE = sqrt(s1^2 / n1 + s2^2 / n2) over the evaluation's answers).
- The evaluations' episode KL: the committed runs' evaluations logged the sampled estimate (the sum
  over each answer of log q - log p of its tokens, whose mean is the sequence KL); evaluations now
  account the exact one as well (`kl.exact_accounting`), which a rerun reports instead. `kl_kind`
  in the results says which.

    python benchmarks/cory_pilot.py [--iterations 30] [--new-tokens 48] [--threads 2] [--kl-check] [--report-only]
Writes benchmarks/results/cory_pilot.{json,md} (results are written after every run).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from cory.api import train
from cory.config import load_config

RESULTS = Path(__file__).parent / "results"
EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2_sentiment.yaml"
LRS = [1e-3, 2e-3, 5e-4]
KL_BETAS = (0.05, 0.5)
"""kl.beta of the KL check: the pilot's, and ten times it."""
PASS_SE = 2.0
"""The pilot passes where the final evaluation reward exceeds the initial by more than this many SE."""


def episode_kl(row: dict) -> float:
    """An evaluation's episode KL to the reference: the exact one where the run accounts it (its
    standard deviation likewise: `kl_exact_std`, else `kl_std`)."""
    return row.get("kl_exact_mean", row["kl_mean"])


def kl_name(run: dict) -> str:
    """What a run's reported KL is (runs written before evaluations accounted the exact KL have no `kl_kind`)."""
    return "exact episode KL" if run.get("kl_kind") == "exact" else "sampled episode KL"



def run_one(lr: float, args, beta: float = KL_BETAS[0]) -> dict:
    """One single-agent run at learning rate `lr` and kl.beta `beta`: its evaluations, the reward's
    gain and its standard error, the final KL and its standard deviation."""
    overrides = ["model.trainable_layers=8", "model.lora.r=16", "model.lora.alpha=32", f"algo.lr={lr}", f"kl.beta={beta}",
                 "algo.group_size=4", "train.batch_size=8", f"train.iterations={args.iterations}", "train.seed=0",
                 f"generation.max_new_tokens={args.new_tokens}", "kl.exact_accounting=true", "task.num_eval_prompts=64",
                 "eval.samples_per_prompt=2", "train.eval_every=10", "train.checkpoint_every=0", "train.log_with=[]",
                 "train.progress=false", f"train.num_threads={args.threads}"]
    cfg = load_config(str(EXAMPLE), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        train(cfg, str(out))
        wall = time.perf_counter() - t0
        evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = evals[0], evals[-1]
    se = math.sqrt(first["reward_std"] ** 2 / first["n"] + last["reward_std"] ** 2 / last["n"])
    gain = last["reward_mean"] - first["reward_mean"]
    row = {"lr": lr, "beta": beta, "iterations": args.iterations, "new_tokens": args.new_tokens, "wall_s": wall,
           "seconds_per_iteration": sum(m["time/iteration"] for m in metrics) / len(metrics),
           "initial_reward": first["reward_mean"], "final_reward": last["reward_mean"], "gain": gain, "se": se,
           "gain_in_se": gain / se if se else math.nan, "passes": bool(gain > PASS_SE * se),
           "initial_eos_rate": first["eos_rate"], "final_eos_rate": last["eos_rate"], "final_kl": episode_kl(last),
           "final_kl_std": last.get("kl_exact_std", last.get("kl_std")), "final_n": last["n"],
           "kl_kind": "exact" if "kl_exact_mean" in last else "sampled",
           "curve": [{"iteration": e["iteration"], "reward": e["reward_mean"], "kl": episode_kl(e), "eos_rate": e["eos_rate"]}
                     for e in evals]}
    print(f"lr {lr:.0e}, beta {beta:g}: reward {row['initial_reward']:.3f} -> {row['final_reward']:.3f} ({row['gain_in_se']:+.1f} SE), "
          f"KL {row['final_kl']:.2f}, end of turn {row['final_eos_rate']:.2f}, {wall:.0f} s", flush=True)
    return row


def report(result: dict) -> list[str]:
    s = result["settings"]
    lines = ["# Pilot of the real-model CORY experiment: does single-agent GRPO learn? (SmolLM2-135M-Instruct, sentiment)", "",
             f"examples/smollm2_sentiment.yaml's task (chat prompts, VADER of the response alone), GRPO group 4, LoRA r 16 "
             f"on the top 8 layers, kl.beta 0.05, 8 prompts x 4 answers an iteration, {s['iterations']} iterations, at most "
             f"{s['new_tokens']} new tokens, seed 0, float32, {s['threads']} threads; evaluation on 64 fixed prompts x 2 "
             "samples every 10 iterations. Protocol declared in `benchmarks/cory_pilot.py` before the runs: learning rates "
             f"tried in order until the final evaluation reward exceeds the initial by more than {PASS_SE:g} standard errors.", "",
             "| lr | initial reward | final reward | gain | gain / SE | passes | final KL | end of turn (initial -> final) "
             "| s / iteration | wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['lr']:.0e} | {r['initial_reward']:.3f} | {r['final_reward']:.3f} | {r['gain']:+.3f} | "
                     f"{r['gain_in_se']:+.1f} | {'yes' if r['passes'] else 'no'} | {r['final_kl']:.2f} | "
                     f"{r['initial_eos_rate']:.2f} -> {r['final_eos_rate']:.2f} | {r['seconds_per_iteration']:.1f} | "
                     f"{r['wall_s']:.0f} s |")
    passing = [r for r in result["runs"] if r["passes"]]
    drift = [f"at lr {r['lr']:.0e} the end-of-turn rate fell from {r['initial_eos_rate']:.2f} to {r['final_eos_rate']:.2f} "
             f"while the KL reached {r['final_kl']:.1f} nats: the reward rose as more answers ran to the length cap"
             for r in result["runs"] if r["final_eos_rate"] < r["initial_eos_rate"] - 0.2]
    lines += ["", (f"Pilot passed at lr {passing[0]['lr']:.0e}: the main experiment uses it." if passing else
                   "Pilot not passed: no rate tried raised the reward by more than two standard errors; the main "
                   "experiment needs more iterations or samples before it can answer."), ""]
    if drift:
        lines += ["Degeneration: " + "; ".join(drift) + ". The main experiment's KL coefficients and its curves along "
                  "training (the frontier) have to show how much of the reward comes with that drift.", ""]
    if result.get("kl_check"):
        runs = result["kl_check"]
        betas = " and ".join(f"{r['beta']:g}" for r in runs)
        lines += [f"## KL check: the passing settings at kl.beta {betas}", "",
                  f"| kl.beta | final reward | reward gain / SE | final {kl_name(runs[0])} (± SD) | end of turn | wall time |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['beta']:g} | {r['final_reward']:.3f} | {r['gain_in_se']:+.1f} | {r['final_kl']:.2f} ± "
                  f"{r['final_kl_std']:.2f} | {r['final_eos_rate']:.2f} | {r['wall_s']:.0f} s |" for r in runs]
        c = kl_control(runs)
        lines += ["", f"KL at kl.beta {c['high']:g} minus at {c['low']:g}: {c['diff']:+.2f} nats, {c['diff_in_se']:+.1f} SE: "
                  + ("the coefficient controls the KL." if c["acts"] else "no significant control of the KL."), ""]
    lines += [f"Evaluation curves (reward / {kl_name(result['runs'][0])} / end-of-turn rate by iteration):", ""]
    shown = []
    for r in result["runs"] + result.get("kl_check", []):
        if r["curve"] in shown:  # the KL check's run at the pilot's beta repeats the pilot's run exactly
            lines.append(f"- lr {r['lr']:.0e}, kl.beta {r.get('beta', KL_BETAS[0]):g} (KL check): the pilot's curve again, "
                         "to the last digit")
            continue
        shown.append(r["curve"])
        lines.append(f"- lr {r['lr']:.0e}, kl.beta {r.get('beta', KL_BETAS[0]):g}: " + ", ".join(f"{p['iteration']}: {p['reward']:.3f} / {p['kl']:.2f} / "
                                                         f"{p['eos_rate']:.2f}" for p in r["curve"]))
    return lines


def kl_control(runs: list[dict]) -> dict:
    """The declared KL check: the final KL at the larger beta minus at the smaller, in standard errors."""
    low, high = min(runs, key=lambda r: r["beta"]), max(runs, key=lambda r: r["beta"])
    se = math.sqrt(low["final_kl_std"] ** 2 / low["final_n"] + high["final_kl_std"] ** 2 / high["final_n"])
    diff = high["final_kl"] - low["final_kl"]
    return {"low": low["beta"], "high": high["beta"], "diff": diff, "diff_in_se": diff / se if se else math.nan,
            "acts": bool(-diff > PASS_SE * se)}


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cory_pilot.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "cory_pilot.md").write_text("\n".join(report(result)) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-check", action="store_true", help="after a passing pilot: its settings at each kl.beta of KL_BETAS")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the results JSON")
    args = ap.parse_args()
    if args.report_only:
        write(json.loads((RESULTS / "cory_pilot.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    if args.kl_check:
        result = json.loads((RESULTS / "cory_pilot.json").read_text())
        passing = [r for r in result["runs"] if r["passes"]]
        if not passing:
            ap.error("--kl-check runs after a passing pilot: benchmarks/results/cory_pilot.json has none")
        result["kl_check"] = []
        for beta in KL_BETAS:
            result["kl_check"].append(run_one(passing[0]["lr"], args, beta))
            write(result)
        print("\n".join(report(result)))
        return
    result = {"settings": {"iterations": args.iterations, "new_tokens": args.new_tokens, "threads": args.threads,
                           "lrs": LRS, "pass_se": PASS_SE}, "runs": []}
    for lr in LRS:
        result["runs"].append(run_one(lr, args))
        write(result)
        if result["runs"][-1]["passes"]:
            break
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
