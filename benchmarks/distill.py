"""On-policy distillation against RL from scratch, on SmolLM2-135M-Instruct.

1. The teacher: `cory:smollm2-135m-instruct` fine-tuned by RL as in examples/smollm2_sentiment.yaml
   (GRPO, VADER's score of the response, chat prompts), for `--teacher-iterations` iterations at
   `--lr` (the example's 3e-5 barely moves the model in a few iterations).
2. From the base model again, with the same budget (`--iterations` iterations of the same number of
   sampled responses, `--samples` an iteration), per seed:
   - distill: algo.name=distill with the teacher (k1 per-token reward, no task reward: distill.task_coef=0);
   - rl: GRPO on the task reward, the teacher's own recipe.
   Both students keep the example's kl.beta (its KL penalty to the base model): the yaml's value
   overrides distill's own default of 0.
3. Each model answers the fixed evaluation prompts (the run's final evaluation, fixed seed). The
   measure is the fraction of the teacher's gain recovered at equal sample budget,
   (reward - base reward) / (teacher reward - base reward): 1 means the teacher's gain is all there.
   Reported with 95% t-intervals over the seeds, and the paired difference distill - rl.

One CPU thread (torch.set_num_threads(1)).

    python benchmarks/distill.py [--seeds 0 1 2] [--iterations 6] [--teacher-iterations 20] [--lr 1e-4] [--quick]
    python benchmarks/distill.py --report-only     # rewrite distill.md from distill.json, running nothing
Writes benchmarks/results/distill.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cory.api import train
from cory.config import load_config
from cory.metrics import t_interval

RESULTS = Path(__file__).parent / "results"
EXAMPLE = Path(__file__).parents[1] / "examples" / "smollm2_sentiment.yaml"
MODEL = "cory:smollm2-135m-instruct"
GROUP = 4
"""GRPO's samples per prompt (the example's algo.group_size): the rl runs' and the teacher's."""
TEACHER_SEED = 100
QUICK = {"prompts": 2, "eval_prompts": 8, "max_new_tokens": 16}
"""--quick's settings."""


def run(overrides: list[str], out: Path) -> dict:
    """A run of examples/smollm2_sentiment.yaml with `overrides`; its summary (initial and final evaluation)."""
    cfg = load_config(EXAMPLE, ["train.log_with=[]", "train.progress=false", "train.num_threads=1", *overrides])
    return train(cfg, out, overwrite=True)


def student_kl_beta() -> float:
    """The kl.beta a distill student runs with: the example's (a yaml value beats distill's default of 0)."""
    return load_config(EXAMPLE, ["algo.name=distill", "distill.teacher=teacher", f"train.batch_size={GROUP}"]).kl.beta


def write_report(result: dict) -> str:
    """benchmarks/results/distill.md from the JSON result (settings a result predates are derived:
    prompts from samples_per_iteration / the group size, the rest from the script's constants and
    --quick, the students' kl.beta from the example as it stands, and the report says so)."""
    st, derived = dict(result["settings"]), []

    def setting(key: str, value, how: str):
        if key not in st:
            st[key] = value
            derived.append(f"{key} ({how})")

    setting("group_size", GROUP, "the script's GRPO group size")
    setting("prompts", st["samples_per_iteration"] // st["group_size"], "samples_per_iteration / group size" +
            (f", as --quick's {QUICK['prompts']}" if st.get("quick") else ""))
    setting("teacher_seed", TEACHER_SEED, "the script's teacher seed")
    setting("students_kl_beta", student_kl_beta(), "examples/smollm2_sentiment.yaml's kl.beta as it stands")
    base, teacher = result["base_reward"], result["teacher_reward"]
    runs, recovered, paired = result["runs"], result["recovered"], result["distill_minus_rl"]
    seeds = st["seeds"]
    lines = [
        "# On-policy distillation against RL from scratch (SmolLM2-135M-Instruct): the fraction of the teacher's "
        "gain recovered at equal sample budget", "",
        f"Teacher: examples/smollm2_sentiment.yaml (GRPO, VADER's score of the response, chat prompts, kl.beta "
        f"{st['students_kl_beta']:g}) at lr {st['lr']:g} for {st['teacher_iterations']} iterations of {st['prompts']} prompts "
        f"x {st['group_size']} samples, {st['max_new_tokens']} new tokens, seed {st['teacher_seed']}; evaluated on "
        f"{st['eval_prompts']} fixed prompts x 2 samples.", "",
        f"Students, from the base model, seeds {seeds}, at the teacher's lr {st['lr']:g} and new tokens, "
        f"{st['iterations']} iterations of {st['samples_per_iteration']} sampled responses each: distill (algo.name=distill, "
        f"k1, distill.task_coef=0: {st['samples_per_iteration']} prompts x 1 sample) and rl (GRPO on the task reward, "
        f"{st['prompts']} prompts x {st['group_size']}). Both inherit the example's kl.beta={st['students_kl_beta']:g}, "
        "the KL penalty to the base model (the yaml's value beats distill's default of 0). "
        f"1 CPU thread{' (reduced: --quick)' if st.get('quick') else ''}.", "",
        f"Measure: (reward - base) / (teacher - base) of the evaluation reward, the fraction of the teacher's gain "
        f"recovered at equal sample budget. Base {base:.3f}, teacher {teacher:.3f}.", "",
        "| method | fraction of the teacher's gain recovered (95% CI over seeds) | final rewards by seed |", "|---|---|---|"]
    for m, v in recovered.items():
        by_seed = ", ".join(f"{r['reward']:.3f}" for r in runs[m].values())
        lines.append(f"| {m} | {v['mean']:.2f} ± {v['half_width']:.2f} | {by_seed} |")
    lines += ["", f"Paired difference distill - rl: {paired['mean']:+.2f} ± {paired['half_width']:.2f}. "
              f"Total time {result['seconds'] / 60:.1f} min.", ""]
    if derived:
        lines += [f"Not recorded in distill.json, derived: {'; '.join(derived)}.", ""]
    text = "\n".join(lines)
    (RESULTS / "distill.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=6, help="iterations of each student run")
    ap.add_argument("--teacher-iterations", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of the teacher and of both students")
    ap.add_argument("--prompts", type=int, default=4, help="prompts an iteration (x group size 4: the samples an iteration)")
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="a reduced run: 2 prompts an iteration, 8 evaluation prompts, 16 tokens")
    ap.add_argument("--report-only", action="store_true", help="rewrite distill.md from distill.json; run nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        report = write_report(json.loads((RESULTS / "distill.json").read_text()))
        print(report)
        return 0
    if args.quick:
        args.prompts, args.eval_prompts, args.max_new_tokens = QUICK["prompts"], QUICK["eval_prompts"], QUICK["max_new_tokens"]
    torch.set_num_threads(1)
    group = GROUP
    samples = args.prompts * group
    common = [f"task.num_eval_prompts={args.eval_prompts}", f"generation.max_new_tokens={args.max_new_tokens}",
              "eval.samples_per_prompt=2", "eval.seed=1234", f"algo.lr={args.lr}"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cory-distill-") as tmp:
        tmp = Path(tmp)
        teacher = tmp / "teacher"
        summary = run([*common, f"train.iterations={args.teacher_iterations}", f"train.batch_size={args.prompts}",
                       f"train.seed={TEACHER_SEED}"], teacher)
        base_reward = summary["initial_eval"]["reward_mean"]
        teacher_reward = summary["final_eval"]["reward_mean"]
        t_teacher = time.perf_counter() - t0
        runs: dict[str, dict[int, dict]] = {"distill": {}, "rl": {}}
        for seed in args.seeds:
            for method in runs:
                if method == "distill":  # the same samples an iteration: one response per prompt
                    extra = ["algo.name=distill", f"distill.teacher={teacher / 'final'}", f"train.batch_size={samples}"]
                else:
                    extra = [f"train.batch_size={args.prompts}"]
                start = time.perf_counter()
                s = run([*common, *extra, f"train.iterations={args.iterations}", f"train.seed={seed}"], tmp / f"{method}{seed}")
                reward = s["final_eval"]["reward_mean"]
                runs[method][seed] = {"reward": reward, "kl": s["final_eval"].get("kl_mean"),
                                      "recovered": (reward - base_reward) / (teacher_reward - base_reward),
                                      "seconds": time.perf_counter() - start}
                print(f"{method} seed {seed}: reward {reward:.3f}, recovered {runs[method][seed]['recovered']:.2f}", flush=True)
    recovered = {m: t_interval([r["recovered"] for r in rs.values()]) for m, rs in runs.items()}
    paired = t_interval([runs["distill"][s]["recovered"] - runs["rl"][s]["recovered"] for s in args.seeds])
    result = {
        "settings": {"model": MODEL, "seeds": args.seeds, "iterations": args.iterations, "teacher_iterations": args.teacher_iterations, "lr": args.lr,
                     "prompts": args.prompts, "group_size": group, "samples_per_iteration": samples,
                     "eval_prompts": args.eval_prompts, "max_new_tokens": args.max_new_tokens, "teacher_seed": TEACHER_SEED,
                     "students_kl_beta": student_kl_beta(), "quick": args.quick, "threads": 1},
        "base_reward": base_reward, "teacher_reward": teacher_reward, "teacher_seconds": t_teacher,
        "runs": {m: {str(s): r for s, r in rs.items()} for m, rs in runs.items()},
        "recovered": {m: {"mean": v[0], "half_width": v[1]} for m, v in recovered.items()},
        "distill_minus_rl": {"mean": paired[0], "half_width": paired[1]},
        "seconds": time.perf_counter() - t0,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(result, indent=2))
    print(write_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
