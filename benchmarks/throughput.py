"""Training-loop throughput on cory:tiny-reviews: generated tokens/s and trained tokens/s.

Each iteration = one rollout of `batch_size` prompts (generation + reward) and one learner step
(reference scoring + REINFORCE update). The baseline, measured in the same run on the same model and
prompts, is transformers' own `model.generate` with the same sampling settings.

    python benchmarks/throughput.py [--iterations 10] [--batch-size 32] [--max-new-tokens 16]
Writes benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cory.config import load_config
from cory.train import load_reference, make_accelerator, sampling_params

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--model", default="cory:tiny-reviews")
    ap.add_argument("--reward", default="cory:tiny-sentiment")
    args = ap.parse_args()

    from cory.algorithms import make_algorithm
    from cory.learner import Learner
    from cory.policy import Policy
    from cory.rollout import Sampler
    from cory.tasks import TaskEnv, make_task

    cfg = load_config(None, [f"model.name={args.model}", f"task.reward={args.reward}", f"train.batch_size={args.batch_size}",
                             f"generation.max_new_tokens={args.max_new_tokens}", "train.log_with=[]"])
    out_dir = Path("runs/bench-throughput")
    accelerator = make_accelerator(cfg, out_dir)
    torch.manual_seed(0)
    policy = Policy.from_pretrained(cfg.model.name)
    reference = load_reference(cfg.model.name, torch.float32)
    task = make_task(cfg.task)
    sampler = Sampler(policy, TaskEnv(task), sampling_params(cfg))
    learner = Learner(policy, reference, make_algorithm(cfg), cfg, accelerator)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)

    rows = []
    for it in range(args.iterations + 1):  # the first iteration warms up and is dropped
        t0 = time.perf_counter()
        rollout = sampler.collect(cfg.train.batch_size, rng, gen)
        t1 = time.perf_counter()
        _, metrics = learner.step(rollout, it, gen)
        t2 = time.perf_counter()
        n_gen = int(rollout.response_mask.sum())
        n_train = int(rollout.response_mask.sum() + rollout.query_mask.sum())
        if it:
            rows.append({"gen_s": t1 - t0, "step_s": t2 - t1, "gen_tok": n_gen, "train_tok": n_train})

    # The cost of exact episode-KL accounting (one more policy forward over the rollout): learner
    # steps alternating with it on and off, on fresh rollouts.
    step_by_flag: dict[bool, list[float]] = {True: [], False: []}
    for it in range(2 * args.iterations):
        flag = it % 2 == 0
        cfg.kl.exact_accounting = flag
        rollout = sampler.collect(cfg.train.batch_size, rng, gen)
        t0 = time.perf_counter()
        learner.step(rollout, it, gen)
        step_by_flag[flag].append(time.perf_counter() - t0)
    cfg.kl.exact_accounting = True

    # Baseline: HF generate on the same prompts and settings, alternating with cory's Policy.generate.
    hf_rates, own_rates = [], []
    prompts = task.sample_prompts(cfg.train.batch_size, np.random.default_rng(1))
    tok = policy.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    for _ in range(max(3, args.iterations // 2)):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = policy.model.generate(**enc, do_sample=True, max_new_tokens=args.max_new_tokens, top_k=0, top_p=1.0,
                                        temperature=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1]:]
        n = int(((new != tok.pad_token_id) | (new == tok.eos_token_id)).sum())
        hf_rates.append(n / dt)
        t0 = time.perf_counter()
        g = policy.generate(prompts, sampler.params, generator=gen)
        own_rates.append(int(g.response_mask.sum()) / (time.perf_counter() - t0))

    med = statistics.median
    gen_rate = med(r["gen_tok"] / r["gen_s"] for r in rows)
    train_rate = med(r["train_tok"] / r["step_s"] for r in rows)
    result = {
        "model": args.model, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "iterations_timed": len(rows), "threads": torch.get_num_threads(),
        "iteration_s_median": med(r["gen_s"] + r["step_s"] for r in rows),
        "generate_tokens_per_s": gen_rate, "train_tokens_per_s": train_rate,
        "hf_generate_tokens_per_s": med(hf_rates), "policy_generate_tokens_per_s": med(own_rates),
        "generate_vs_hf": med(own_rates) / med(hf_rates),
        "step_s_exact_accounting": med(step_by_flag[True]), "step_s_no_accounting": med(step_by_flag[False]),
    }
    accounting = result["step_s_exact_accounting"] / result["step_s_no_accounting"]
    lines = [
        f"# Loop throughput on {args.model} (batch {args.batch_size}, {args.max_new_tokens} new tokens, CPU, {result['threads']} threads)",
        "",
        "| measure | median |",
        "|---|---|",
        f"| iteration (rollout + step) | {result['iteration_s_median']:.3f} s |",
        f"| generated tokens/s (sampler, incl. reward) | {gen_rate:,.0f} |",
        f"| trained tokens/s (prompt+response tokens through ref scoring + update) | {train_rate:,.0f} |",
        f"| cory `Policy.generate` alone, tokens/s | {med(own_rates):,.0f} |",
        f"| HF `generate` tokens/s, same prompts and settings (baseline) | {med(hf_rates):,.0f} |",
        f"| cory `Policy.generate` / HF `generate` | {result['generate_vs_hf']:.2f}x |",
        f"| learner step with exact episode-KL accounting (default) | {result['step_s_exact_accounting']:.3f} s |",
        f"| learner step with `kl.exact_accounting=false` (baseline) | {result['step_s_no_accounting']:.3f} s |",
        f"| accounting on / off | {accounting:.2f}x |",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
