"""How long each embedded `cory:` model takes to build, and how good the result is.

Each registered model is built from scratch (`zoo.build(name, force=True)`) into a fresh temporary
cache, `--repeats` times (default: 1 for the tiny models, 3 for the micro ones); the table reports
the median wall time of the whole `build` call (corpus, tokenizer, training, evaluation, saving),
training seconds per step, the threads the build used, and the held-out metrics the build
recorded in its `zoo_info.json`:

- review writer: mean next-token loss on held-out reviews, the share of words of 24 sampled
  continuations that the grammar knows, and the share of those samples that ended with <eos>;
- classifier: accuracy on held-out positive/negative reviews, the pairwise ranking accuracy of the
  positive logit, and the accuracy on one-adjective probes ("The plot is <adjective>.");
- arithmetic solver: accuracy on held-out word problems (the arithmetic task's own evaluation
  problems) with greedy decoding and with one plain sample at T=1, up to 32 new tokens, overall
  and by kind (add, sub, mul, two-step) and tier (easy: small numbers; hard: the rest).

The machine's 1-minute load average is recorded before each build, and the process's CPU seconds
next to the wall time: on a shared CPU a build takes only the cores that are idle, and its wall
time moves with the load.

    python benchmarks/zoo_build.py [--models cory:micro-arith ...] [--repeats N]

Writes benchmarks/results/zoo_build.{json,md}. The rows of the models built replace their earlier
rows; the rows of other models already in zoo_build.json stay, so one model can be re-measured
alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cory.zoo.train  # noqa: F401  (torch and transformers load here, not in the first timed build)
from cory import zoo
from cory.zoo import registry

RESULTS = Path(__file__).parent / "results"


def build_once(name: str) -> dict:
    """One forced build of ``name`` into a fresh temporary cache: its wall time and zoo_info."""
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("CORY_CACHE")
        os.environ["CORY_CACHE"] = cache
        try:
            load = os.getloadavg()[0]
            start, cpu_start = time.perf_counter(), time.process_time()
            folder = zoo.build(name, force=True, progress=False)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            info = json.loads((folder / "zoo_info.json").read_text())
        finally:
            if previous is None:
                del os.environ["CORY_CACHE"]
            else:
                os.environ["CORY_CACHE"] = previous
    return {"seconds": seconds, "cpu_seconds": cpu, "load_before": load, "info": info}


def summarise(name: str, runs: list[dict]) -> dict:
    """The median build of ``runs`` and the metrics of the last run (the same for every run of a
    deterministic build on one thread count)."""
    info = runs[-1]["info"]
    row = {
        "model": name,
        "kind": info["kind"],
        "params": info["params"],
        "runs": len(runs),
        "build_seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
        "build_seconds_all": [round(r["seconds"], 2) for r in runs],
        "build_cpu_seconds_median": round(statistics.median(r["cpu_seconds"] for r in runs), 2),
        "train_seconds_per_step": statistics.median(r["info"]["train"]["seconds_per_step"] for r in runs),
        "train_steps": info["train"]["steps"],
        "threads": [r["info"]["train"]["threads"] for r in runs],
        "load_before": [round(r["load_before"], 2) for r in runs],
        "eval": info["eval"],
        "recipe_hash": info["recipe_hash"],
    }
    if info["kind"] == "causal-lm":
        row["samples"] = info["samples"]
    return row


def quality(row: dict) -> str:
    """The held-out metrics of one model, as a table cell."""
    e = row["eval"]
    if row["kind"] == "classifier":
        return (f"accuracy {e['heldout_accuracy']:.3f}, pairwise {e['heldout_pairwise']:.3f}, "
                f"probes {e['probe_accuracy']:.3f}")
    if "greedy_accuracy" in e:
        return (f"accuracy greedy {e['greedy_accuracy']:.3f}, sampled {e['sampled_accuracy']:.3f} "
                f"({e['heldout_problems']} problems); loss {e['heldout_loss']:.3f}/token")
    if "sample_known_words" in e:
        return (f"loss {e['heldout_loss']:.3f}/token, known words {e['sample_known_words']:.1%}, "
                f"<eos> {e['sample_eos_rate']:.0%}")
    # Other corpora (agent transcripts, dialogues): the held-out loss and the corpus's own checks.
    numbers = [f"{k.replace('_', ' ')} {v:.3f}" for k, v in e.items() if isinstance(v, float) and k != "heldout_loss"]
    return ", ".join([f"loss {e['heldout_loss']:.3f}/token"] + numbers[:4])


def accuracy_by_kind(rows: list[dict]) -> list[str]:
    """Markdown lines: the arithmetic models' held-out accuracy by kind and tier."""
    rows = [r for r in rows if "greedy_accuracy_by_kind" in r["eval"]]
    if not rows:
        return []
    groups = list(rows[0]["eval"]["greedy_accuracy_by_kind"])
    lines = [
        "", "Held-out accuracy of the arithmetic models by kind and tier, greedy / sampled at T=1 "
        "(easy: numbers up to 5; hard: two-digit numbers, larger products, two steps):", "",
        "| model | " + " | ".join(groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    for r in rows:
        greedy, sampled = r["eval"]["greedy_accuracy_by_kind"], r["eval"]["sampled_accuracy_by_kind"]
        cells = [f"{greedy[g]:.2f} / {sampled[g]:.2f}" for g in groups]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Zoo build times",
        "",
        f"{machine['cpus']} CPUs ({machine['processor'] or machine['machine']}), torch {machine['torch']}; "
        "median wall time of `zoo.build(name, force=True)` into an empty cache, and the process's "
        "CPU seconds (all threads; with one thread, about the wall time on an idle machine). The "
        "load average before each build shows how busy the shared machine was.",
        "",
        "| model | params | build s (median) | CPU s | runs | s/step | steps | threads | load before | held-out |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['build_seconds_median']:.1f} | "
            f"{r['build_cpu_seconds_median']:.1f} | {r['runs']} | "
            f"{r['train_seconds_per_step']:.3f} | {r['train_steps']} | {r['threads']} | "
            f"{r['load_before']} | {quality(r)} |"
        )
    lines += accuracy_by_kind(rows)
    for r in rows:
        if "samples" in r:
            lines += ["", f"Samples from {r['model']} (held-out prompts, plain sampling):", ""]
            lines += [f"- {one_line(text)}" for text in r["samples"]]
    return "\n".join(lines) + "\n"


def one_line(text: str) -> str:
    """``text`` for a markdown list item: a word problem's newline before "Answer:" becomes a space,
    and any other unprintable character (a sampled byte token) its escape."""
    text = text.replace("\n", " ")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def merge(new_rows: list[dict], path: Path) -> list[dict]:
    """``new_rows`` with the rows of other models from an earlier ``path``, in the zoo's order
    (models no longer in the zoo are dropped)."""
    rows = {r["model"]: r for r in json.loads(path.read_text())["models"]} if path.exists() else {}
    rows.update({r["model"]: r for r in new_rows})
    return [rows[name] for name in registry.ZOO if name in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(registry.ZOO), help="zoo names to build")
    parser.add_argument("--repeats", type=int, default=None,
                        help="builds per model (default: 1 for tiny models, 3 for micro ones)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    unknown = [name for name in args.models if name not in registry.ZOO]
    if unknown:
        parser.error(f"not in the zoo: {', '.join(unknown)}; the zoo has: {', '.join(registry.ZOO)}")

    rows = []
    for name in args.models:
        repeats = args.repeats or (3 if name.startswith("cory:micro") else 1)
        runs = [build_once(name) for _ in range(repeats)]
        rows.append(summarise(name, runs))
        print(f"{name}: {rows[-1]['build_seconds_all']} s; {quality(rows[-1])}", flush=True)

    machine = {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = merge(rows, args.out_dir / "zoo_build.json")
    (args.out_dir / "zoo_build.json").write_text(json.dumps({"machine": machine, "models": rows}, indent=2) + "\n")
    table = markdown(rows, machine)
    (args.out_dir / "zoo_build.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
