"""Single-agent PPO against CORY-PPO: task reward, KL, the reward-vs-KL frontier, degeneration.

For each task and seed:
- PPO at every KL coefficient beta of the task's `betas`: trained for `iterations` iterations
  (equal iterations with CORY), evaluated, then resumed exactly to twice as many (equal generated
  samples: CORY generates two responses per prompt) and evaluated again;
- CORY-PPO (`cory.enabled=true`) at every beta, `iterations` iterations; each agent is evaluated
  answering alone from the prompt;
- at the task's `main_beta` only, the two ablations: no role exchange (`cory.exchange=false`) and an
  observer that does not see the pioneer (`cory.observe=false`).
Every run uses the fixed KL controller, so beta is both the training coefficient and the paper's eta
in the combined reward r - eta * KL. Final evaluations are on the task's fixed prompt set (64 prompts
x 2 samples, fixed seed): reward, episode KL to the initial model, and degeneration measures
computed here from the samples: the share of responses with a word repeated twice or more in a row
("marvelous marvelous"), the mean share of distinct words, the share that end without EOS (cut at
max_new_tokens), the mean length in tokens. Curves over iterations (reward, KL, combined reward per
agent and role) come from the runs' metrics.jsonl.

    python benchmarks/coevolution.py [--tasks sentiment arithmetic] [--seeds 0 1 2] [--quick] [--report]
(sentiment with the settings below: about 40 minutes on one thread; --quick: about a minute.)
Writes benchmarks/results/cory.{json,md} and benchmarks/results/cory_<task>_{curves,frontier}.png;
a task's results replace that task's earlier ones and keep the others. --quick (two iterations on a
tiny batch, two betas, one seed) writes to a temporary folder instead; --report only rewrites the
Markdown and the plots from the JSON.

`--out` writes elsewhere; `--merge` joins the seeds of result files whose runs differ only in their
seeds (e.g. one seed per process, each with its own `--seeds` and `--out`) into `--out`'s, and
`--together` says the parts ran at once (the task's wall time is then the longest part's).

CORY against single-agent RL on a pretrained model (SmolLM2-135M-Instruct) is a separate experiment:
benchmarks/cory_real.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

from cory.api import train
from cory.build import eval_params, eval_scorer, load_reference
from cory.config import CoryConfig, load_config
from cory.evaluate import evaluate
from cory.metrics import t_interval as interval
from cory.policy import Policy
from cory.report import read_jsonl
from cory.tasks import make_task

matplotlib.use("Agg")

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results"

# Per-task settings: the runs' config overrides, iterations, KL coefficients (the frontier) and the
# coefficient of the main comparison and the ablations.
TASKS = {
    "sentiment": {
        "overrides": ["model.name=cory:tiny-reviews", "task.name=sentiment", "task.reward=cory:tiny-sentiment",
                      "generation.max_new_tokens=16", "generation.temperature=1.0", "eval.temperature=1.0",
                      "algo.lr=3e-4", "train.batch_size=32"],
        "iterations": 30,
        "betas": [0.01, 0.03, 0.1, 0.3],
        "main_beta": 0.03,
    },
    "arithmetic": {
        "overrides": ["model.name=cory:tiny-arith", "task.name=arithmetic", "generation.max_new_tokens=24",
                      "generation.temperature=1.0", "generation.stop_strings=[Question]", "eval.temperature=1.0",
                      # 3e-4 and above collapse the 4-layer arithmetic model within ~40 iterations.
                      "algo.lr=2e-4", "train.batch_size=32"],
        "iterations": 30,
        "betas": [0.001, 0.003, 0.01, 0.03],
        "main_beta": 0.01,
    },
}
COMMON = ["algo.name=ppo", "algo.epochs=2", "algo.minibatch_size=16", "kl.controller=fixed", "kl.estimator=k1",
          "task.num_eval_prompts=64", "eval.samples_per_prompt=2", "train.log_with=[]", "train.progress=false"]
# algo.minibatch_size=0 (one minibatch of the whole batch): what COMMON's 16 gave a batch of 8 before
# minibatch sizes had to divide the batch.
QUICK = ["train.batch_size=8", "task.num_eval_prompts=8", "algo.minibatch_size=0"]
CORY_VARIANTS = {"cory": [], "cory-no-exchange": ["cory.exchange=false"], "cory-no-observe": ["cory.observe=false"]}
# What differs from the paper (the report's preamble).
ABOUT = ("Against the paper's setup: embedded models of about 1.2M parameters instead of GPT2-Large / Llama-2-7b; a fixed "
         "KL coefficient (the frontier's beta) instead of the adaptive controller; the k1 estimator instead of the exact "
         "KL; the same learning rate for PPO and CORY; far fewer iterations; role exchange every 5 iterations and "
         "optimizer and controller states kept across exchanges, as in cory.")
METHODS = {
    "ppo": "PPO, equal iterations",
    "ppo-2x": "PPO, equal samples (2x iterations)",
    "cory": "CORY-PPO",
    "cory-no-exchange": "CORY, no role exchange",
    "cory-no-observe": "CORY, observer blind to the pioneer",
}
WORD = re.compile(r"[a-z0-9']+")




# -- degeneration measures ----------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def repeats_word(text: str) -> bool:
    """A word immediately repeated ("marvelous marvelous"), case and punctuation ignored."""
    w = words(text)
    return any(a == b for a, b in itertools.pairwise(w))


def distinct_share(text: str) -> float:
    """Distinct words / words (1.0 for an empty response)."""
    w = words(text)
    return len(set(w)) / len(w) if w else 1.0


# -- runs ---------------------------------------------------------------------------------------------
class Judge:
    """A task's fixed evaluation: the task, its frozen reference and the evaluation settings. The KL
    reported is the sampled k1 sum."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.task = make_task(cfg.task)
        # The reference scored at the evaluation temperature, with the run's prefix sharing.
        self.reference = eval_scorer(cfg, load_reference(cfg.model.name, torch.float32))
        self.params = eval_params(cfg)

    def __call__(self, model, beta: float) -> dict:
        """Final figures of one model (a folder, a zoo name or a loaded Policy) answering alone."""
        cfg = self.cfg
        policy = model if isinstance(model, Policy) else Policy.from_pretrained(model)
        # One sample per row, every row returned: the same draws as the run's own final evaluation.
        prompts = [p for p in self.task.eval_prompts for _ in range(cfg.eval.samples_per_prompt)]
        res = evaluate(policy, prompts, self.task.reward, self.params, 1, cfg.eval.seed, reference=self.reference,
                       num_samples_shown=len(prompts))
        texts = [s["response"] for s in res["samples"]]
        kl = res["kl_mean"]
        return {"reward": res["reward_mean"], "kl": kl, "combined": res["reward_mean"] - beta * kl,
                "repeat_share": statistics.fmean(map(repeats_word, texts)), "distinct": statistics.fmean(map(distinct_share, texts)),
                "missing_eos": 1.0 - res["eos_rate"], "length": res["response_length"], "n": res["n"],
                "examples": res["samples"][:4]}


def curves(run_dir: Path, agents: list[str]) -> dict:
    """Per-iteration training figures per agent (own task reward, episode KL, share cut without EOS)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if agents == ["policy"]:
        return {"policy": {"reward": [r["reward_mean"] for r in rows], "kl": [r["kl_mean"] for r in rows],
                           "missing_eos": [r["truncated_rate"] for r in rows]}}
    out = {n: {"reward": [r[f"{n}/task_reward"] for r in rows], "kl": [r[f"{n}/kl_mean"] for r in rows],
               "missing_eos": [r[f"{n}/truncated_rate"] for r in rows]} for n in agents}
    out["pioneer_is_a"] = [r["pioneer_is_a"] for r in rows]
    return out


def run_ppo(overrides: list[str], beta: float, seed: int, iterations: int, batch: int, judge: Judge) -> list[dict]:
    """PPO to `iterations`, evaluated; then resumed to 2 x `iterations` (the same run continued exactly)."""
    records, wall = [], 0.0
    with tempfile.TemporaryDirectory() as out:
        for method, its in (("ppo", iterations), ("ppo-2x", 2 * iterations)):
            cfg = load_config(None, overrides + [f"train.iterations={its}"])
            t0 = time.perf_counter()
            train(cfg, out, resume=method == "ppo-2x")
            wall += time.perf_counter() - t0
            agents = {"policy": judge(Path(out) / "final", beta)}
            records.append({"method": method, "beta": beta, "seed": seed, "iterations": its, "samples": its * batch,
                            "wall_s": wall, "agents": agents, "curves": curves(Path(out), ["policy"])})
    return records


def run_cory(variant: str, overrides: list[str], beta: float, seed: int, iterations: int, batch: int, judge: Judge) -> dict:
    cfg = load_config(None, overrides + CORY_VARIANTS[variant] + ["cory.enabled=true", f"train.iterations={iterations}"])
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train(cfg, out)
        wall = time.perf_counter() - t0
        agents = {n: judge(Path(out) / "agents" / n, beta) for n in ("a", "b")}
        return {"method": variant, "beta": beta, "seed": seed, "iterations": iterations, "samples": 2 * iterations * batch,
                "wall_s": wall, "agents": agents, "curves": curves(Path(out), ["a", "b"])}


def run_task(task: str, seeds: list[int], quick: bool, threads: int = 0, iterations: int = 0) -> dict:
    """Every run of a task."""
    spec = TASKS[task]
    iterations = iterations or (2 if quick else spec["iterations"])
    betas = sorted({spec["betas"][0], spec["main_beta"]}) if quick else spec["betas"]
    base = COMMON + spec["overrides"] + (QUICK if quick else []) + ([f"train.num_threads={threads}"] if threads else [])
    cfg = load_config(None, base)
    batch = cfg.train.batch_size
    judge = Judge(cfg)
    t_start = time.perf_counter()
    initial = judge(cfg.model.name, 0.0)
    print(f"{task}: initial model reward {initial['reward']:.3f}, repeats {initial['repeat_share']:.3f}, "
          f"no-EOS {initial['missing_eos']:.3f}, length {initial['length']:.1f} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    records = []

    def show(r: dict) -> None:
        cells = ", ".join(f"{n}: reward {a['reward']:.3f} KL {a['kl']:.2f} repeats {a['repeat_share']:.2f} "
                          f"no-EOS {a['missing_eos']:.2f}" for n, a in r["agents"].items())
        print(f"{task} {r['method']:<16} beta {r['beta']:<6} seed {r['seed']}: {cells} ({r['wall_s']:.0f} s)", flush=True)

    for seed in seeds:
        for beta in betas:
            overrides = base + [f"kl.beta={beta}", f"train.seed={seed}"]
            new = run_ppo(overrides, beta, seed, iterations, batch, judge)
            for r in new:
                show(r)
            variants = list(CORY_VARIANTS) if beta == spec["main_beta"] else ["cory"]
            for v in variants:
                new.append(run_cory(v, overrides, beta, seed, iterations, batch, judge))
                show(new[-1])
            records += new
    settings = {"overrides": base, "iterations": iterations, "batch_size": batch, "betas": betas,
                "main_beta": spec["main_beta"], "seeds": seeds, "quick": quick}
    return {"settings": settings, "wall_s": time.perf_counter() - t_start, "initial": initial, "runs": records}


# -- aggregation ----------------------------------------------------------------------------------------
def value(record: dict, key: str) -> float:
    """A run's final figure; for CORY the mean over its two agents, each answering alone."""
    return statistics.fmean(a[key] for a in record["agents"].values())


def runs_of(result: dict, method: str, beta: float) -> dict[int, dict]:
    """seed -> record."""
    return {r["seed"]: r for r in result["runs"] if r["method"] == method and r["beta"] == beta}


def over_seeds(result: dict, method: str, beta: float, key: str, agent: str | None = None) -> tuple[float, float]:
    rs = runs_of(result, method, beta).values()
    return interval([r["agents"][agent][key] if agent else value(r, key) for r in rs])


def paired(result: dict, method: str, other: str, beta: float, key: str) -> tuple[float, float]:
    """method - other, paired by seed: mean and 95% half-width."""
    a, b = runs_of(result, method, beta), runs_of(result, other, beta)
    return interval([value(a[s], key) - value(b[s], key) for s in sorted(a.keys() & b.keys())])


def best_combined(result: dict, method: str, seed: int, eta: float) -> float:
    """The frontier's support at eta: the best r - eta * KL the method reaches over its betas."""
    return max(value(runs_of(result, method, b)[seed], "reward") - eta * value(runs_of(result, method, b)[seed], "kl")
               for b in result["settings"]["betas"])


def frontier_gap(result: dict, method: str, other: str, eta: float) -> tuple[float, float]:
    seeds = result["settings"]["seeds"]
    return interval([best_combined(result, method, s, eta) - best_combined(result, other, s, eta) for s in seeds])


def fmt(mi: tuple[float, float], digits: int = 3) -> str:
    m, h = mi
    return f"{m:.{digits}f} ± {h:.{digits}f}" if not math.isnan(h) else f"{m:.{digits}f}"


def significance(mi: tuple[float, float]) -> int:
    """+1 / -1 where the 95% interval lies above / below zero, else 0."""
    m, h = mi
    if math.isnan(h):
        return 0
    return 1 if m - h > 0 else -1 if m + h < 0 else 0


# -- plots ----------------------------------------------------------------------------------------------
def plot_curves(task: str, result: dict, path: Path) -> None:
    """Reward, KL and r - beta * KL over iterations at the main beta (means over seeds): PPO, and every
    CORY variant by role; below, CORY's agents a and b with agent a's pioneer phases shaded."""
    beta = result["settings"]["main_beta"]
    iterations = result["settings"]["iterations"]
    keys = [("reward", "task reward (training samples)"), ("kl", "episode KL to the initial model"),
            ("combined", f"combined reward r - {beta} KL")]

    def series(records, pick) -> list[float]:
        """Mean over seeds of pick(curves, i) at every iteration."""
        n = min(len(r["curves"]["policy" if "policy" in r["curves"] else "a"]["reward"]) for r in records)
        return [statistics.fmean(pick(r["curves"], i) for r in records) for i in range(n)]

    def stat(c: dict, agent: str, key: str, i: int) -> float:
        if key == "combined":
            return c[agent]["reward"][i] - beta * c[agent]["kl"][i]
        return c[agent][key][i]

    def role_agent(c: dict, role: str, i: int) -> str:
        return "a" if (c["pioneer_is_a"][i] == 1.0) == (role == "pioneer") else "b"

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = {"cory": "tab:blue", "cory-no-exchange": "tab:orange", "cory-no-observe": "tab:green"}
    ppo = list(runs_of(result, "ppo-2x", beta).values())
    for ax, (key, title) in zip(axes[0], keys):
        ys = series(ppo, lambda c, i, k=key: stat(c, "policy", k, i))
        ax.plot(range(1, len(ys) + 1), ys, color="black", label="PPO (to 2x iterations)")
        ax.axvline(iterations, color="gray", ls=":", lw=1)
        for variant, color in colors.items():
            records = list(runs_of(result, variant, beta).values())
            if not records:
                continue
            for role, ls in (("pioneer", "-"), ("observer", "--")):
                ys = series(records, lambda c, i, k=key, ro=role: stat(c, role_agent(c, ro, i), k, i))
                ax.plot(range(1, len(ys) + 1), ys, color=color, ls=ls, label=f"{METHODS[variant]}: {role}")
        ax.set_title(f"{task}: {title}", fontsize=10)
    cory = list(runs_of(result, "cory", beta).values())
    for ax, (key, _) in zip(axes[1], keys):
        for agent, color in (("a", "tab:purple"), ("b", "tab:red")):
            ys = series(cory, lambda c, i, k=key, ag=agent: stat(c, ag, k, i))
            ax.plot(range(1, len(ys) + 1), ys, color=color, label=f"CORY agent {agent}")
        for i, a_leads in enumerate(cory[0]["curves"]["pioneer_is_a"]):
            if a_leads == 1.0:
                ax.axvspan(i + 0.5, i + 1.5, color="tab:purple", alpha=0.08, lw=0)
        ax.set_title(f"CORY agents a, b (shaded: a pioneers): {key}", fontsize=10)
    for ax in axes.flat:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(task: str, result: dict, path: Path) -> None:
    """Left: final reward against final KL at every beta (95% intervals over seeds). Right: the best
    combined reward r - eta * KL over the betas, as a function of eta."""
    betas = result["settings"]["betas"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"ppo": ("black", "x"), "ppo-2x": ("gray", "s"), "cory": ("tab:blue", "o")}
    for method, (color, marker) in styles.items():
        kl = [over_seeds(result, method, b, "kl") for b in betas]
        rw = [over_seeds(result, method, b, "reward") for b in betas]
        left.errorbar([k[0] for k in kl], [r[0] for r in rw], xerr=[k[1] for k in kl], yerr=[r[1] for r in rw],
                      color=color, marker=marker, capsize=3, label=METHODS[method])
        for b, k, r in zip(betas, kl, rw):
            left.annotate(f"{b:g}", (k[0], r[0]), fontsize=7, xytext=(4, 4), textcoords="offset points", color=color)
        etas = [0.0] + betas
        gaps = [interval([best_combined(result, method, s, e) for s in result["settings"]["seeds"]]) for e in etas]
        xs = range(len(etas))
        right.plot(xs, [g[0] for g in gaps], color=color, marker=marker, label=METHODS[method])
        half = [0.0 if math.isnan(g[1]) else g[1] for g in gaps]
        right.fill_between(xs, [g[0] - h for g, h in zip(gaps, half)], [g[0] + h for g, h in zip(gaps, half)],
                           color=color, alpha=0.15, lw=0)
        right.set_xticks(list(xs), [f"{e:g}" for e in etas])
    init = result["initial"]
    left.plot([init["kl"]], [init["reward"]], "k*", ms=10, label="initial model")
    left.set_xlabel("final episode KL to the initial model (nats)")
    left.set_ylabel("final task reward")
    left.set_title(f"{task}: reward vs KL over the KL coefficient (labels)", fontsize=10)
    right.set_xlabel("eta")
    right.set_ylabel("max over betas of r - eta KL")
    right.set_title(f"{task}: the frontier's best combined reward", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- report ---------------------------------------------------------------------------------------------
def task_time(result: dict) -> str:
    """How long the task took: the wall time of one process, or of each seed's process (merged parts)."""
    threads = [o.split("=", 1)[1] for o in result["settings"]["overrides"] if o.startswith("train.num_threads=")]
    note = f"{threads[-1]} CPU thread(s)" if threads else "torch's default CPU threads"
    walls = result.get("part_wall_s", [])
    if len(walls) < 2:
        return f"Wall time of the whole task: {result['wall_s'] / 60:.1f} min ({note})."
    parts = ", ".join(f"{w / 60:.1f}" for w in walls)
    if result.get("together"):
        return (f"Time: {max(walls) / 60:.1f} min of wall time on this machine's two cores: the {len(walls)} seeds' processes "
                f"ran at once, one seed each at {note} ({parts} min).")
    return (f"Time: {sum(walls) / 60:.1f} min of {len(walls)} processes in all, one seed each at {note} "
            f"({parts} min).")


def task_report(task: str, result: dict, png_prefix: str) -> list[str]:
    s = result["settings"]
    beta, betas, its = s["main_beta"], s["betas"], s["iterations"]
    init = result["initial"]
    lines = [f"## {task}", "",
             (f"Settings: {its} iterations (PPO also resumed to {2 * its}), {s['batch_size']} prompts per iteration, "
             f"KL coefficients {betas} (main comparison and ablations at {beta}), seeds {s['seeds']}; "
             f"overrides `{' '.join(s['overrides'])}`. {task_time(result)}"), "",
             f"### Final evaluation at beta = {beta}", "",
             ("Fixed prompt set, each agent answering alone; mean ± 95% interval over seeds. Combined = reward - beta x KL. "
             "Repeats: share of responses with a word twice or more in a row; distinct: mean share of distinct words; "
             "no EOS: share cut at the length limit."), "",
             "| model | samples generated | reward | episode KL | combined | repeats | distinct | no EOS | length | train time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|",
             (f"| initial model | 0 | {init['reward']:.3f} | {init['kl']:.3f} | {init['reward']:.3f} | {init['repeat_share']:.3f} | "
             f"{init['distinct']:.3f} | {init['missing_eos']:.3f} | {init['length']:.1f} | |")]
    keys = ("reward", "kl", "combined", "repeat_share", "distinct", "missing_eos")
    for method, label in METHODS.items():
        mine = runs_of(result, method, beta)
        if not mine:
            continue
        first = next(iter(mine.values()))
        agents = list(first["agents"])
        rows = [(label, None)] if agents == ["policy"] else \
            [(f"{label}: mean of agents", None)] + [(f"{label}: agent {a}", a) for a in agents]
        for name, agent in rows:
            cells = [fmt(over_seeds(result, method, beta, k, agent)) for k in keys]
            cells.append(fmt(over_seeds(result, method, beta, "length", agent), 1))
            wall = fmt(interval([r["wall_s"] for r in mine.values()]), 0) if agent is None else ""
            lines.append(f"| {name} | {first['samples']} | " + " | ".join(cells) + f" | {wall} |")
    lines += ["", "### Every KL coefficient (the frontier's points)", "",
              "| beta | method | reward | episode KL | combined | repeats | no EOS | length |", "|---|---|---|---|---|---|---|---|"]
    for b in betas:
        for method in ("ppo", "ppo-2x", "cory"):
            cells = [fmt(over_seeds(result, method, b, k)) for k in ("reward", "kl", "combined", "repeat_share", "missing_eos")]
            lines.append(f"| {b:g} | {METHODS[method]} | " + " | ".join(cells) + f" | {fmt(over_seeds(result, method, b, 'length'), 1)} |")
    etas = [0.0] + betas
    lines += ["", "### The frontier: best combined reward over the KL coefficients", "",
              ("For each eta, the highest r - eta x KL a method reaches over its runs at the betas above (per seed; "
              "mean ± 95% interval). CORY's frontier dominates where it is higher at every eta."), "",
              "| eta | PPO, equal iterations | PPO, equal samples | CORY | CORY - PPO (equal iterations) | CORY - PPO (equal samples) |",
              "|---|---|---|---|---|---|"]
    for e in etas:
        best = [fmt(interval([best_combined(result, m, sd, e) for sd in s["seeds"]])) for m in ("ppo", "ppo-2x", "cory")]
        gaps = [fmt(frontier_gap(result, "cory", m, e)) for m in ("ppo", "ppo-2x")]
        lines.append(f"| {e:g} | " + " | ".join(best + gaps) + " |")
    lines += ["", f"![curves]({png_prefix}_curves.png)", "", f"![frontier]({png_prefix}_frontier.png)", "",
              "### Samples (first seed, first evaluation prompts)", ""]
    for method in ("ppo", "ppo-2x", "cory"):
        record = runs_of(result, method, beta)[min(s["seeds"])]
        for agent, a in record["agents"].items():
            for ex in a["examples"][:2]:
                lines.append(f"- {METHODS[method]}{'' if agent == 'policy' else f', agent {agent}'}: "
                             f"`{ex['prompt']}` -> `{ex['response']}`")
    return lines + [""] + verdicts(task, result)


def verdicts(task: str, result: dict) -> list[str]:
    """The paper's claims (a), (b), (c) judged on this task's numbers."""
    s = result["settings"]
    beta, betas = s["main_beta"], s["betas"]
    init = result["initial"]
    budgets = (("ppo", "equal iterations"), ("ppo-2x", "equal generated samples"))
    out = [f"### Report: do the paper's claims hold on {task}?", ""]
    if len(s["seeds"]) < 2:
        out += [("With one seed there is no interval, and every rule below needs one: no claim can be established from "
                 "these runs, whichever way the differences point; \"does not hold\" below means \"not shown\"."), ""]
    # Did anything learn? Each method's final reward minus the initial model's, over seeds.
    gains = {m: interval([value(r, "reward") - init["reward"] for r in runs_of(result, m, beta).values()])
             for m in ("ppo", "ppo-2x", "cory") if runs_of(result, m, beta)}
    rose = [METHODS[m] for m, g in gains.items() if significance(g) > 0]
    fell = [METHODS[m] for m, g in gains.items() if significance(g) < 0]
    # The initial figure is one draw of the fixed evaluation set; with 0/1 rewards (arithmetic) the
    # answers' scores follow from the mean and their number, and so does the draw's own interval.
    n = init.get("n", 0)
    right = round(init["reward"] * n)
    spread = (f" The initial model's figure is itself one draw of {n} answers scored 0 or 1: "
              f"{fmt(interval([1.0] * right + [0.0] * (n - right)))}, so a gain or loss within that can be the draw."
              if task == "arithmetic" and n > 1 else "")
    out += [(f"**Learning at beta = {beta}** (final reward minus the initial model's, over seeds): "
             + "; ".join(f"{METHODS[m]} {fmt(g)}" for m, g in gains.items()) + ". "
             + (f"Significant for {', '.join(rose)}." if rose else
                "No method's reward rose significantly in this budget: the claims below compare models that drifted "
                "(KL) more than they learned, and a KL difference mostly counts the updates each model received.")
             + (f" Fell significantly: {', '.join(fell)}." if fell else "") + spread), ""]

    # (a) similar task reward with lower KL, at the main beta.
    parts, holds = [], []
    for ppo, budget in budgets:
        d_r, d_k = paired(result, "cory", ppo, beta, "reward"), paired(result, "cory", ppo, beta, "kl")
        k_ppo, k_cory = over_seeds(result, ppo, beta, "kl")[0], over_seeds(result, "cory", beta, "kl")[0]
        ratio = f"{k_ppo / k_cory:.2f}" if k_cory > 0 and k_ppo > 0 else "n/a"
        holds.append(significance(d_k) < 0 and significance(d_r) >= 0)
        parts.append(f"at {budget}, CORY's reward minus PPO's is {fmt(d_r)} and its KL minus PPO's {fmt(d_k)} "
                     f"(PPO's KL / CORY's = {ratio})")
    others = [f"beta {b:g}: reward {fmt(paired(result, 'cory', 'ppo', b, 'reward'))}, KL {fmt(paired(result, 'cory', 'ppo', b, 'kl'))}"
              for b in betas if b != beta]
    out.append(f"**(a) Similar task reward with lower KL than single-agent PPO: {overall(holds, budgets)}.** At beta = {beta} "
               "(CORY = mean of its two agents answering alone; differences paired by seed): " + "; ".join(parts) + ". "
               "Rule: holds where the KL difference's interval lies below zero and the reward difference's does not lie "
               "below zero. At equal iterations, other betas (CORY - PPO): " + "; ".join(others) + ".")
    out.append("")

    # (b) frontier dominance.
    etas = [0.0] + betas
    parts, holds = [], []
    for ppo, budget in budgets:
        gaps = [frontier_gap(result, "cory", ppo, e) for e in etas]
        sig = [significance(g) for g in gaps]
        holds.append(all(x > 0 for x in sig))
        shape = "dominates" if holds[-1] else "is dominated" if all(x < 0 for x in sig) else "does not dominate"
        parts.append(f"at {budget}, CORY - PPO = " + ", ".join(f"{fmt(g)} (eta {e:g})" for e, g in zip(etas, gaps))
                     + f": CORY's frontier {shape}")
    out.append(f"**(b) CORY's reward-vs-KL frontier dominates PPO's: {overall(holds, budgets)}.** Best r - eta x KL over the "
               f"betas {betas}; " + "; ".join(parts) + ". Rule: dominates where the difference's interval lies above zero "
               "at every eta.")
    out.append("")

    # (c) degeneration: PPO above the initial model and above CORY on a measure, CORY not above the initial model.
    parts, found = [], []
    for ppo, budget in budgets:
        for b in betas:
            for key, name in (("repeat_share", "repeated words"), ("missing_eos", "missing EOS")):
                p = interval([value(r, key) - init[key] for r in runs_of(result, ppo, b).values()])
                c = interval([value(r, key) - init[key] for r in runs_of(result, "cory", b).values()])
                d = paired(result, ppo, "cory", b, key)
                if significance(p) > 0 and significance(d) > 0 and significance(c) <= 0:
                    found.append(f"{name} at beta {b:g}, {budget} (rise over the initial model: PPO {fmt(p)}, CORY {fmt(c)}; "
                                 f"PPO - CORY {fmt(d)})")
        parts.append(f"at {budget}, beta {beta}: repeated words PPO {fmt(over_seeds(result, ppo, beta, 'repeat_share'))}, "
                     f"missing EOS PPO {fmt(over_seeds(result, ppo, beta, 'missing_eos'))}")
    cory_rep, cory_eos = over_seeds(result, "cory", beta, "repeat_share"), over_seeds(result, "cory", beta, "missing_eos")
    worst = {m: max((a["repeat_share"], r["method"], r["beta"], r["seed"]) for r in result["runs"] if r["method"] in ms
                    for a in r["agents"].values()) for m, ms in (("PPO", ("ppo", "ppo-2x")), ("CORY", ("cory",)))}
    extremes = "; ".join(f"{m} {w[0]:.3f} ({METHODS[w[1]]}, beta {w[2]:g}, seed {w[3]})" for m, w in worst.items())
    out.append(f"**(c) PPO degenerates (repeated words, missing EOS) where CORY does not: {'holds' if found else 'does not hold'}.** "
               f"Initial model: repeated words {init['repeat_share']:.3f}, missing EOS {init['missing_eos']:.3f}; "
               + "; ".join(parts) + f"; CORY at beta {beta}: repeated words {fmt(cory_rep)}, missing EOS {fmt(cory_eos)}. "
               f"The largest share of repeated words in any single run: {extremes}. "
               "Rule: holds where, on a measure, PPO's rise over the initial model and PPO's excess over CORY (paired by seed) "
               "both have intervals above zero while CORY's rise does not"
               + (": " + "; ".join(found) + "." if found else "; no measure at any beta and budget meets it."))
    out.append("")

    # (d) without role exchange, the fixed observer's KL stays below the fixed pioneer's.
    fixed = runs_of(result, "cory-no-exchange", beta)
    if fixed:
        cory = runs_of(result, "cory", beta)
        gap = interval([r["agents"]["a"]["kl"] - r["agents"]["b"]["kl"] for r in fixed.values()])
        vs_cory = interval([fixed[sd]["agents"]["b"]["kl"] - value(cory[sd], "kl") for sd in sorted(fixed.keys() & cory.keys())])
        last = max(1, s["iterations"] // 3)
        train_gap = interval([statistics.fmean(r["curves"]["a"]["kl"][-last:]) - statistics.fmean(r["curves"]["b"]["kl"][-last:])
                              for r in fixed.values()])
        out.append(f"**(d) Without role exchange, the observer's KL stays low (below the pioneer's): "
                   f"{'holds' if significance(gap) > 0 else 'does not hold'}.** At beta = {beta}, each agent answering alone: "
                   f"fixed pioneer's KL {fmt(over_seeds(result, 'cory-no-exchange', beta, 'kl', 'a'))}, fixed observer's "
                   f"{fmt(over_seeds(result, 'cory-no-exchange', beta, 'kl', 'b'))}, pioneer - observer {fmt(gap)}; the fixed "
                   f"observer's KL minus CORY's (mean of its agents) {fmt(vs_cory)}. In training (each on its own prompts, last "
                   f"{last} iterations), pioneer - observer {fmt(train_gap)}. Rule: holds where the pioneer - observer interval "
                   "(alone) lies above zero.")
        out.append("")
    return out + ablations(result)


def role_gap(record: dict, last: int) -> float:
    """Observer's minus pioneer's training task reward, averaged over the last iterations."""
    c = record["curves"]
    gaps = []
    for i in range(len(c["pioneer_is_a"]) - last, len(c["pioneer_is_a"])):
        pioneer, observer = ("a", "b") if c["pioneer_is_a"][i] == 1.0 else ("b", "a")
        gaps.append(c[observer]["reward"][i] - c[pioneer]["reward"][i])
    return statistics.fmean(gaps)


def ablations(result: dict) -> list[str]:
    """The paper's ablation findings, with this task's numbers (not part of the claims above)."""
    beta = result["settings"]["main_beta"]
    last = max(1, result["settings"]["iterations"] // 3)
    cory = runs_of(result, "cory", beta)
    lines = []
    for variant in ("cory-no-exchange", "cory-no-observe"):
        if runs_of(result, variant, beta):
            lines.append(f"{METHODS[variant]} - CORY: reward {fmt(paired(result, variant, 'cory', beta, 'reward'))}, "
                         f"KL {fmt(paired(result, variant, 'cory', beta, 'kl'))}")
    fixed = runs_of(result, "cory-no-exchange", beta).values()
    if fixed:
        lines.append("without exchange, the fixed pioneer's KL minus the fixed observer's (agent a - agent b, alone) "
                     + fmt(interval([r["agents"]["a"]["kl"] - r["agents"]["b"]["kl"] for r in fixed])))
    lines.append(f"in CORY, the observer's training task reward minus the pioneer's over the last {last} iterations "
                 + fmt(interval([role_gap(r, last) for r in cory.values()])))
    out = [f"Ablations at beta = {beta} (differences paired by seed): " + "; ".join(lines) + ".", ""]
    swap = swap_every(result["settings"])
    if result["settings"]["iterations"] <= swap and runs_of(result, "cory-no-exchange", beta):
        out += [(f"**Caveat:** the runs are {result['settings']['iterations']} iterations long and roles are exchanged every "
                 f"{swap} (cory.swap_every), so no exchange happened: CORY without exchange is the same run as CORY (its "
                 "figures are identical), and agent a was the pioneer throughout in both. The exchange ablation needs runs "
                 "longer than cory.swap_every (or cory.swap_every=1)."), ""]
    return out


def swap_every(settings: dict) -> int:
    """cory.swap_every as the runs had it (the last override, else the default)."""
    values = [o.split("=", 1)[1] for o in settings["overrides"] if o.startswith("cory.swap_every=")]
    return int(values[-1]) if values else CoryConfig.swap_every


def overall(holds: list[bool], budgets) -> str:
    if all(holds):
        return "holds"
    if any(holds):
        return "holds only at " + " and ".join(b for (_, b), h in zip(budgets, holds) if h)
    return "does not hold"


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# CORY-PPO against single-agent PPO", "",
             ("`python benchmarks/coevolution.py` (see its docstring for what runs). CORY's figures are the mean of its two "
             "agents, each answering alone from the prompt, unless a row names an agent. Intervals: 95% t-intervals over seeds."), "",
             ABOUT, ""]
    for task, result in results.items():
        prefix = f"cory_{task}"
        plot_curves(task, result, out_dir / f"{prefix}_curves.png")
        plot_frontier(task, result, out_dir / f"{prefix}_frontier.png")
        lines += task_report(task, result, prefix)
    (out_dir / "cory.json").write_text(json.dumps(results, indent=1))
    (out_dir / "cory.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: OMP_NUM_THREADS, else all cores)")
    ap.add_argument("--iterations", type=int, default=0, help="iterations per run (0: the task's setting)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 iterations of a tiny batch, two betas, one seed")
    ap.add_argument("--report", action="store_true", help="only rewrite the Markdown and the plots from the JSON")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON, Markdown and plots (default benchmarks/results)")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="combine these result files' seeds (runs with equal settings, e.g. one seed per process) into --out")
    ap.add_argument("--together", action="store_true",
                    help="with --merge: the parts' processes ran at once, so the longest part is the task's wall time")
    args = ap.parse_args()
    if args.together and not args.merge:
        raise SystemExit("--together describes merged parts: give --merge too")
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1, 2]
    out_dir = Path(tempfile.mkdtemp(prefix="cory_quick_")) if args.quick else Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = out_dir / "cory.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    if args.merge:
        for task, merged in merge_seeds([json.loads(Path(f).read_text()) for f in args.merge]).items():
            results[task] = {**merged, "together": args.together}
        args.report = True
    for task in [] if args.report else args.tasks:
        results[task] = run_task(task, seeds, args.quick, args.threads, iterations=args.iterations)
    write(results, out_dir)
    print(f"written to {out_dir}")


def merge_seeds(parts: list[dict]) -> dict:
    """Per task, the runs of several result files whose settings differ only in their seeds (e.g. one
    seed per process, run side by side): seeds and runs joined, the wall time the longest part's and
    each part's. Stops where settings or the initial model's evaluation differ."""
    out = {}
    for task in sorted({t for p in parts for t in p}):
        pieces = [p[task] for p in parts if "runs" in p.get(task, {})]
        if not pieces:
            continue
        first = pieces[0]
        same = lambda r: {k: v for k, v in r["settings"].items() if k != "seeds"}
        for other in pieces[1:]:
            if same(other) != same(first):
                raise SystemExit(f"--merge: {task}: the parts' settings differ")
            if other["initial"]["reward"] != first["initial"]["reward"]:
                raise SystemExit(f"--merge: {task}: the parts' initial evaluations differ")
        seeds = [s for p in pieces for s in p["settings"]["seeds"]]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"--merge: {task}: a seed is in more than one part")
        out[task] = {"settings": {**first["settings"], "seeds": sorted(seeds)}, "initial": first["initial"],
                     "wall_s": max(p["wall_s"] for p in pieces), "part_wall_s": [p["wall_s"] for p in pieces],
                     "runs": [r for p in pieces for r in p["runs"]]}
    return out


if __name__ == "__main__":
    main()
