"""Training-loop throughput on cory:tiny-reviews: generated tokens/s and trained tokens/s.

Each iteration = one rollout of `batch_size` prompts (generation + reward) and one learner step
(reference scoring + REINFORCE update). The baseline, measured in the same run on the same model and
prompts, is transformers' own `model.generate` with the same sampling settings.

    python benchmarks/throughput.py [--iterations 10] [--batch-size 32] [--max-new-tokens 16]
Writes benchmarks/results/throughput.{json,md}.

With --phases (e.g. on the real model), it instead reports, for fp32 and bf16, where a REINFORCE
iteration's time goes (generation, reference scoring, update forward+backward, optimizer step), the
update's model FLOP utilisation against the matmul peak of the dtype in use and decoding's ms per
token step against the weight-read bound, with both limits measured in the same run
(benchmarks/limits.py):

    python benchmarks/throughput.py --phases --model cory:smollm2-135m-instruct --batch-size 16 \
        --max-new-tokens 16 --iterations 3 --threads 2
Writes benchmarks/results/throughput_<model>.{json,md}. bf16 at a smaller size (on a CPU without
bf16 matmul kernels the backward's x @ W layout crawls):

    python benchmarks/throughput.py --phases --model cory:smollm2-135m-instruct --batch-size 4 \
        --max-new-tokens 8 --iterations 2 --threads 2 --out benchmarks/results/throughput_smollm2-135m-instruct_small

With --trunk, an iteration of REINFORCE and of GRPO on SmolLM2-135M-Instruct (16 sequences x 16 new
tokens, float32) for LoRA on every layer and on the top K = 2, 4, 8 layers only
(`model.trainable_layers`: the frozen trunk runs once per sequence), each phase timed, against the
iteration's floor measured in the same run: the FLOPs each configuration must do (prefill, the
reference's and the update's passes) at the matmul peak, plus the decode steps at their GEMM floor
(the step's matrix products alone, at their real shapes, with every layer's own weights):

    python benchmarks/throughput.py --trunk --model cory:smollm2-135m-instruct --threads 2 --iterations 3
Writes benchmarks/results/throughput_trunk.{json,md}.

With --decode, one decode step of the native loop on SmolLM2-135M-Instruct (float32, chat prompts,
batch 16 and 64) with each lever of the loop turned off in turn, against the step's GEMM floor
measured in the same run; greedy tokens and log-probs are compared with the levers off:

    python benchmarks/throughput.py --decode --model cory:smollm2-135m-instruct --threads 2
Writes benchmarks/results/throughput_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState

from limits import attention_flops, llama_train_flops, matmul_flops, matmul_layouts, median_time, read_bandwidth

from cory.algorithms import make_algorithm
from cory.build import load_reference, make_accelerator, sampling_params
from cory.config import load_config
from cory.generation.sampling import SamplingParams
from cory.learner import Learner
from cory.policy import Policy, eos_ids
from cory.rollout import Sampler
from cory.tasks import TaskEnv, make_task

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--model", default="cory:tiny-reviews")
    ap.add_argument("--reward", default="cory:tiny-sentiment")
    ap.add_argument("--phases", action="store_true", help="time per phase, MFU and decode bound, fp32 and bf16")
    ap.add_argument("--decode", action="store_true", help="one decode step with each lever of the loop off, against its GEMM floor")
    ap.add_argument("--trunk", action="store_true", help="LoRA on every layer against the top K layers on a shared trunk")
    ap.add_argument("--layers", default="0,2,4,8", help="with --trunk: trainable_layers values (0 = every layer)")
    ap.add_argument("--algos", default="reinforce,grpo", help="with --trunk: algorithms")
    ap.add_argument("--precisions", default="fp32,bf16", help="with --phases: fp32, bf16 or both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--report", default="", help="with --phases: only rewrite the report from this JSON file")
    ap.add_argument("--note", default="", help="with --phases: a line for the results file (machine load, ...)")
    ap.add_argument("--out", default="", help="with --phases: results path without suffix "
                    "(default benchmarks/results/throughput_<model>)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        write_phases(json.loads(Path(args.report).read_text()))
        return
    if args.phases:
        phases_main(args)
        return
    if args.trunk:
        trunk_main(args)
        return
    if args.decode:
        decode_main(args)
        return

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


# -- --phases: where the time goes, against the machine's limits ---------------------------------
class Timer:
    """Wraps a bound method; accumulates its wall time per call into `self.times`."""

    def __init__(self, owner, name: str):
        self.inner, self.times = getattr(owner, name), []
        setattr(owner, name, self)

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self.inner(*a, **kw)
        finally:
            self.times.append(time.perf_counter() - t0)


def phase_run(args, precision: str, limits: dict) -> dict:
    """REINFORCE iterations on `args.model` in one precision; times per phase, MFU, decode."""
    overrides = [f"model.name={args.model}", "task.reward=vader", "task.reward_on=response", "task.chat_template=true",
                 f"train.batch_size={args.batch_size}", f"generation.max_new_tokens={args.max_new_tokens}",
                 "train.log_with=[]", "algo.name=reinforce", "kl.exact_accounting=false"]
    if precision == "bf16":
        overrides.append("train.mixed_precision=bf16")
    cfg = load_config(None, overrides)
    AcceleratorState._reset_state(reset_partial_state=True)  # each precision gets its own accelerator
    accelerator = make_accelerator(cfg, Path("runs/bench-throughput"))
    torch.manual_seed(0)
    policy = Policy.from_pretrained(cfg.model.name)
    reference = load_reference(cfg.model.name, torch.float32)  # as training loads it (model.dtype)
    task = make_task(cfg.task)
    t_gen = Timer(policy, "generate")  # before the Sampler, which keeps the bound method it is given
    sampler = Sampler(policy, TaskEnv(task), sampling_params(cfg))
    learner = Learner(policy, reference, make_algorithm(cfg), cfg, accelerator)
    t_score, t_update = Timer(learner, "score"), Timer(learner, "update")
    t_opt = Timer(learner.optimizer, "step")
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    rows = []
    for it in range(args.iterations + 1):  # the first iteration warms up and is dropped
        for t in (t_gen, t_score, t_update, t_opt):
            t.times.clear()
        t0 = time.perf_counter()
        rollout = sampler.collect(cfg.train.batch_size, rng, gen)
        learner.step(rollout, it, gen)
        total = time.perf_counter() - t0
        b, lq = rollout.query_ids.shape
        lr = rollout.response_ids.shape[1]
        flops = llama_train_flops(policy.model.config, b * (lq + lr), b * (lr + 1)) + attention_flops(policy.model.config, b, lq + lr)
        fwd_bwd = sum(t_update.times) - sum(t_opt.times)
        if it:
            rows.append({"iteration_s": total, "generate_s": sum(t_gen.times), "reference_s": sum(t_score.times),
                         "update_s": sum(t_update.times), "forward_backward_s": fwd_bwd, "optimizer_s": sum(t_opt.times),
                         "other_s": total - sum(t_gen.times) - sum(t_score.times) - sum(t_update.times),
                         "update_tflops": flops / fwd_bwd / 1e12, "rows": b, "query_len": lq, "response_len": lr})
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    peak = limits["matmul_tflops_" + precision]
    out = {k: med(k) for k in rows[0]}
    out["update_mfu"] = out["update_tflops"] / peak
    out.update(decode_run(args, precision, policy, limits))
    print(precision, json.dumps(out), flush=True)
    return out


def decode_run(args, precision: str, policy, limits: dict) -> dict:
    """Decode ms per token step at the batch size (fixed length: EOS is masked out) against the time
    to read every weight once at the measured bandwidth, in the dtype the weights are in."""
    if precision == "bf16":  # decoding runs in the weights' dtype: load them in bf16
        policy = Policy.from_pretrained(args.model, dtype="bfloat16")
    eos = torch.tensor(eos_ids(policy.tokenizer, policy.model), dtype=torch.long, device=policy.device)

    def no_eos(step, logprobs):
        return logprobs.index_fill(-1, eos, float("-inf"))

    prompts = ["Write one sentence about a movie you liked."] * args.batch_size
    times = {}
    for n in (1, args.max_new_tokens):
        params = SamplingParams(max_new_tokens=n, chat=True)
        policy.generate(prompts, params, torch.Generator().manual_seed(0), logits_hook=no_eos)
        samples = []
        for r in range(3):
            t0 = time.perf_counter()
            policy.generate(prompts, params, torch.Generator().manual_seed(r), logits_hook=no_eos)
            samples.append(time.perf_counter() - t0)
        times[n] = statistics.median(samples)
    step_ms = (times[args.max_new_tokens] - times[1]) / (args.max_new_tokens - 1) * 1e3
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    bound_ms = weight_bytes / limits["read_gb_s"] / 1e9 * 1e3
    return {"prefill_s": times[1], "decode_ms_per_step": step_ms, "weight_read_bound_ms": bound_ms,
            "decode_vs_bound": step_ms / bound_ms, "weight_mb": weight_bytes / 1e6,
            "params": sum(p.numel() for p in policy.model.parameters())}


def phases_main(args) -> None:
    def limits_now() -> dict:
        return {"matmul_tflops_fp32": matmul_flops(torch.float32) / 1e12,
                "matmul_tflops_bf16": matmul_flops(torch.bfloat16) / 1e12, "read_gb_s": read_bandwidth() / 1e9,
                # the backward's grad-input layout, at n = 1024 (bf16 takes a minute at 2048 on AVX2)
                "matmul_nn_tflops_fp32": matmul_layouts(torch.float32, 1024, layouts=("nn",))["nn"] / 1e12,
                "matmul_nn_tflops_bf16": matmul_layouts(torch.bfloat16, 1024, layouts=("nn",))["nn"] / 1e12}

    limits = limits_now()
    t0 = time.perf_counter()
    results = {p: phase_run(args, p, limits) for p in args.precisions.split(",")}
    wall = time.perf_counter() - t0
    result = {"model": args.model, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "iterations_timed": args.iterations, "threads": torch.get_num_threads(), "cpu": platform.processor(),
              "limits_before": limits, "limits_after": limits_now(), "note": args.note, "precisions": results,
              "load_average_end": os.getloadavg()[0], "phases_wall_s": wall, "out": args.out}
    write_phases(result)


def write_phases(result: dict) -> None:
    """Ratios against the best limit measured in the run (the higher of before / after): a
    conservative MFU. Decoding is held against two bounds: reading every weight once per step, and
    doing the step's matmul FLOPs (2 x parameters x batch) at the matmul peak."""
    before, after = result["limits_before"], result["limits_after"]
    best = {k: max(before[k], after[k]) for k in before}
    for precision, r in result["precisions"].items():
        peak = best["matmul_tflops_" + precision]
        r["update_mfu"] = r["update_tflops"] / peak
        r["weight_read_bound_ms"] = r["weight_mb"] / best["read_gb_s"]
        r["compute_bound_ms"] = 2 * r["params"] * result["batch_size"] / (peak * 1e12) * 1e3 if "params" in r else float("nan")
        r["decode_bound_ms"] = max(r["weight_read_bound_ms"], r["compute_bound_ms"])
        r["decode_vs_bound"] = r["decode_ms_per_step"] / r["decode_bound_ms"]
    results = result["precisions"]
    name = result["model"].removeprefix("cory:").replace("/", "_")
    lines = [f"# Where a REINFORCE iteration goes on {result['model']} (batch {result['batch_size']}, {result['max_new_tokens']} new "
             f"tokens, chat prompts, VADER reward, CPU, {result['threads']} threads)", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += ["Limits measured in this run (before / after; ratios use the higher): "
              f"fp32 matmul {before['matmul_tflops_fp32']:.3f} / {after['matmul_tflops_fp32']:.3f} TFLOP/s, "
              f"bf16 matmul {before['matmul_tflops_bf16']:.4f} / {after['matmul_tflops_bf16']:.4f} TFLOP/s, "
              f"memory read {before['read_gb_s']:.1f} / {after['read_gb_s']:.1f} GB/s. "
              + (f"The matmul peak is the fastest of the x @ W.T and x.T @ W layouts; the backward's x @ W layout ran at "
                 f"{after['matmul_nn_tflops_fp32']:.3f} TFLOP/s in fp32 and {after['matmul_nn_tflops_bf16']:.4f} in bf16 (n = 1024). "
                 if "matmul_nn_tflops_bf16" in after else "") +
              f"Load average at the end: {result.get('load_average_end', float('nan')):.1f}.", "",
              "| median per iteration | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    show = [("iteration", "iteration_s", "{:.2f} s"), ("generation (sampler)", "generate_s", "{:.2f} s"),
            ("reference scoring", "reference_s", "{:.2f} s"), ("update: forward + backward", "forward_backward_s", "{:.2f} s"),
            ("update: optimizer step", "optimizer_s", "{:.2f} s"), ("everything else", "other_s", "{:.2f} s"),
            ("update TFLOP/s", "update_tflops", "{:.3f}"), ("update MFU (vs matmul peak of the dtype)", "update_mfu", "{:.0%}"),
            ("decode ms per token step", "decode_ms_per_step", "{:.1f}"),
            ("weight-read bound ms (weights / read bandwidth)", "weight_read_bound_ms", "{:.1f}"),
            ("compute bound ms (2 x params x batch FLOPs at the matmul peak)", "compute_bound_ms", "{:.1f}"),
            ("decode / the larger bound", "decode_vs_bound", "{:.2f}x"), ("prefill (1 token) s", "prefill_s", "{:.2f}")]
    for label, key, fmt in show:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r.get(key, float("nan"))) for r in results.values()) + " |")
    out = Path(result["out"]) if result.get("out") else RESULTS / f"throughput_{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- --trunk: training only the top layers, against the iteration's floor ----------------------------
def forward_flops(config, layers: int, tokens: int, head_tokens: int, context: int) -> float:
    """FLOPs of a forward of `layers` decoder layers over `tokens` positions (of `context` on
    average), with the LM head at `head_tokens` of them: 2 x matrix parameters x positions, plus
    attention's scores and values (2 x 2 x tokens x context x hidden per layer)."""
    c = config.get_text_config()
    d, inter = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    block = d * d * 2 + d * kv * 2 + 3 * d * inter
    return 2 * layers * block * tokens + 2 * d * c.vocab_size * head_tokens + 4 * layers * tokens * context * d


def iteration_flops(config, trainable: int, rows: int, lq: int, lr: int, values: bool, prompts: int | None = None) -> dict:
    """What one iteration must compute (per phase), with LoRA on the top `trainable` layers (0: every
    layer). Prefill of the `prompts` distinct prompts (a group's answers share one; default: one per
    row) and scoring passes run the trunk only when there is none; the
    update's backward is one more pass of input gradients through every trained layer and the head
    (LoRA's own weight gradients are negligible); the exact KL waits for the update (no policy pass
    in scoring unless values need one)."""
    layers = config.get_text_config().num_hidden_layers
    top = trainable or layers
    seq = lq + lr
    prompts = prompts or rows
    prefill = forward_flops(config, layers, prompts * lq, prompts, lq / 2)
    one_pass = forward_flops(config, top, rows * (seq - 1), rows * lr, seq / 2)
    return {"prefill": prefill, "scoring": one_pass * (2 if values else 1), "update": 2 * one_pass}


def decode_gemm_floor(config, batch: int, repeats: int = 5) -> float:
    """Seconds of one decode step's matrix products alone, at the step's shapes ([batch, hidden] x
    every layer's q, k, v, o, gate, up, down, then the LM head), each layer with its own weights
    (read from memory as the real step reads them): the median of `repeats`."""
    c = config.get_text_config()
    d, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d)]
    weights = [[torch.randn(o, i) for o, i in shapes] + [torch.randn(d, inter)] for _ in range(c.num_hidden_layers)]
    head = torch.randn(vocab, d)
    x, h = torch.randn(batch, d), torch.randn(batch, inter)

    def step():
        for layer in weights:
            for w in layer[:-1]:
                torch.nn.functional.linear(x, w)
            torch.nn.functional.linear(h, layer[-1])
        torch.nn.functional.linear(x, head)

    seconds, _ = median_time(step, repeats)
    return seconds


def trunk_iterations(args, algo: str, trainable: int, peak: float, decode_floor_s: float, exact: bool = True):
    """Yields the timed phases of each iteration of `algo` with LoRA (r 16) on the top `trainable`
    layers (0: all), endlessly, after one warm-up iteration; `exact`: kl.exact_accounting."""
    from cory.train import TrainingRun

    group = ["algo.group_size=4", "train.batch_size=4"] if algo == "grpo" else ["train.batch_size=16"]
    overrides = [f"model.name={args.model}", "task.reward=vader", "task.reward_on=response", "task.chat_template=true",
                 "generation.max_new_tokens=16", "train.log_with=[]", "train.progress=false", f"algo.name={algo}",
                 "model.lora.r=16", f"model.trainable_layers={trainable}", f"kl.exact_accounting={str(exact).lower()}", *group]
    cfg = load_config(None, overrides)
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    run = TrainingRun(cfg, tempfile.mkdtemp(prefix="cory-bench-trunk-"))
    policy, learner = run.policy, run.learner
    timers = {"generate": Timer(policy, "generate"), "score": Timer(learner, "score"), "update": Timer(learner, "update"),
              "optimizer": Timer(learner.optimizer, "step")}
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    trained = sum(p.numel() for p in learner.optimizer.param_groups[0]["params"])
    for it in itertools.count():  # the first iteration warms up and is dropped
        for t in timers.values():
            t.times.clear()
        t0 = time.perf_counter()
        rollout = run.sampler.collect(cfg.train.batch_size, rng, gen, group_size=run.algorithm.group_size)
        learner.step(rollout, it, gen)
        total = time.perf_counter() - t0
        b, lq = rollout.query_ids.shape
        lr = rollout.response_ids.shape[1]
        prompts = len({tuple(row) for row in rollout.query_ids.tolist()})
        flops = iteration_flops(policy.model.config, trainable, b, lq, lr, run.algorithm.needs_values, prompts)
        floor = (flops["prefill"] + flops["scoring"] + flops["update"]) / peak + decode_floor_s * (lr - 1)
        if it:
            t = {k: sum(v.times) for k, v in timers.items()}
            yield {"iteration_s": total, "generate_s": t["generate"], "scoring_s": t["score"],
                   "update_s": t["update"] - t["optimizer"], "optimizer_s": t["optimizer"],
                   "other_s": total - t["generate"] - t["score"] - t["update"], "floor_s": floor,
                   "floor_generate_s": flops["prefill"] / peak + decode_floor_s * (lr - 1),
                   "floor_scoring_s": flops["scoring"] / peak, "floor_update_s": flops["update"] / peak,
                   "rows": b, "query_len": lq, "response_len": lr, "trained_params": trained}


def trunk_run(args, algo: str, trainable: int, peak: float, decode_floor_s: float) -> dict:
    """The medians of `args.iterations` iterations (see `trunk_iterations`)."""
    rows = list(itertools.islice(trunk_iterations(args, algo, trainable, peak, decode_floor_s), args.iterations))
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["vs_floor"] = out["iteration_s"] / out["floor_s"]
    print(algo, trainable, json.dumps(out), flush=True)
    return out


def exact_kl_cost(args, trainable: int, peak: float, decode_floor_s: float) -> float:
    """GRPO's iteration with the exact KL's accounting over the same iteration without it: two runs
    alternating single iterations (so both see the same machine), the median of the paired ratios."""
    on = trunk_iterations(args, "grpo", trainable, peak, decode_floor_s, exact=True)
    off = trunk_iterations(args, "grpo", trainable, peak, decode_floor_s, exact=False)
    ratios = [next(on)["iteration_s"] / next(off)["iteration_s"] for _ in range(2 * args.iterations)]
    print("exact KL cost", trainable, ratios, flush=True)
    return statistics.median(ratios)


def reference_memory(model: str, ks: list[int]) -> dict[str, float]:
    """MB of weights the reference holds of its own: a whole copy of the model, and `FrozenTop` (a
    frozen copy of the top K layers on the policy's trunk) for each K."""
    from cory import zoo
    from cory.trunk import FrozenTop, num_layers

    lm = Policy.from_pretrained(str(zoo.build(model, progress=False))).model
    mb = lambda module: sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20  # noqa: E731
    out = {"whole copy": mb(lm)}
    for k in ks:
        out[str(k)] = mb(FrozenTop(lm, num_layers(lm) - k))
    return out


def trunk_main(args) -> None:
    from transformers import AutoConfig

    from cory import zoo

    config = AutoConfig.from_pretrained(zoo.resolve(args.model))
    peak = matmul_flops(torch.float32)
    decode_floor = {b: decode_gemm_floor(config, b) for b in (16, 64)}
    results = {algo: {str(k): trunk_run(args, algo, int(k), peak, decode_floor[16]) for k in args.layers.split(",")}
               for algo in args.algos.split(",")}
    # The exact KL's cost: the same iteration without its accounting, GRPO with LoRA on every layer and on the top 4.
    exact_cost = {k: exact_kl_cost(args, int(k), peak, decode_floor[16]) for k in ("0", "4") if k in results.get("grpo", {})}
    reference_mb = reference_memory(args.model, [int(k) for k in args.layers.split(",") if int(k)])
    result = {"model": args.model, "threads": torch.get_num_threads(), "iterations_timed": args.iterations,
              "reference_weights_mb": reference_mb, "exact_kl_cost": exact_cost,
              "matmul_tflops_fp32": peak / 1e12, "matmul_tflops_fp32_after": matmul_flops(torch.float32) / 1e12,
              "decode_gemm_floor_ms": {str(b): v * 1e3 for b, v in decode_floor.items()}, "results": results,
              "load_average_end": os.getloadavg()[0], "layers": config.num_hidden_layers}
    lines = [f"# An iteration with only the top layers training, on {args.model} (16 sequences x 16 new tokens, LoRA r 16, "
             f"float32, CPU, {result['threads']} threads)", "",
             f"Measured in this run: fp32 matmul peak {result['matmul_tflops_fp32']:.3f} TFLOP/s "
             f"({result['matmul_tflops_fp32_after']:.3f} after); one decode step's matrix products alone "
             f"{result['decode_gemm_floor_ms']['16']:.0f} ms at batch 16, {result['decode_gemm_floor_ms']['64']:.0f} ms at batch 64. "
             "The floor is the FLOPs each configuration must do (prefill of each distinct prompt, the reference's pass, the update's forward and "
             "backward) at that peak, plus the decode steps at their GEMM floor. Medians of "
             f"{args.iterations} iterations after one warm-up; load average at the end {result['load_average_end']:.1f}.", ""]
    for algo, by_k in results.items():
        lines += [f"## {algo}", "", "| trained layers | iteration | generation | scoring | update fwd+bwd | optimizer | other | floor | "
                  "iteration / floor |", "|---|---|---|---|---|---|---|---|---|"]
        for k, r in by_k.items():
            label = f"all {config.num_hidden_layers}" if k == "0" else f"top {k}"
            lines.append(f"| {label} | {r['iteration_s']:.2f} s | {r['generate_s']:.2f} s | {r['scoring_s']:.2f} s | "
                         f"{r['update_s']:.2f} s | {r['optimizer_s']:.3f} s | {r['other_s']:.2f} s | {r['floor_s']:.2f} s | "
                         f"{r['vs_floor']:.2f}x |")
        lines.append("")
    lines += ["## The exact KL's cost", "", "GRPO's iteration with `kl.exact_accounting=true` (the default) over the same "
              "iteration without it (two runs alternating iterations, the median of the paired ratios): " + ", ".join(f"{'all layers' if k == '0' else f'top {k}'} {v:.3f}x" for k, v in exact_cost.items())
              + ".", ""]
    lines += ["## The reference of a full fine-tuning", "",
              "A full fine-tuning of the top K layers keeps as its reference the policy's frozen trunk (shared) and a frozen "
              "copy of only the top K layers (`FrozenTop`), where a whole-depth run keeps a second copy of the whole model. "
              "Weights held by the reference (float32, counted on the built modules):", "",
              "| trained layers | reference's own weights | a whole copy | saved |", "|---|---|---|---|"]
    whole = reference_mb["whole copy"]
    for k, mb in reference_mb.items():
        if k != "whole copy":
            lines.append(f"| top {k} | {mb:.1f} MB | {whole:.1f} MB | {whole - mb:.1f} MB ({1 - mb / whole:.0%}) |")
    lines.append("")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput_trunk.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "throughput_trunk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- --decode: the levers of one decode step ---------------------------------------------------------
DECODE_STEPS = 24
"""Tokens decoded per timing (greedy, every row runs all of them)."""


def decode_steps(policy: Policy, batch: int, levers: dict) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Median seconds of one decode step over `DECODE_STEPS` greedy steps (after 2 warm-up steps),
    the greedy tokens [B, steps] and their log-probs, with `levers` (preallocated cache, grouped heads)
    on or off."""
    from cory.attention import GROUPED
    from cory.generation import native

    lm = policy.model
    lm.set_attn_implementation(GROUPED if levers["grouped attention"] else "sdpa")
    prompts = [f"Continue this movie review in one sentence: The film number {i} was" for i in range(batch)]
    q, m = policy.encode_prompts(prompts, SamplingParams(chat=True))
    keep = native.preallocated_cache
    if not levers["preallocated cache"]:
        native.preallocated_cache = lambda lm, length, start=None: start
    try:
        with torch.no_grad():
            stepper = native.KVStepper(lm, capacity=DECODE_STEPS + 4)
            logits = stepper.prefill(q, m)
            times, tokens, logprobs = [], [], []
            for _ in range(DECODE_STEPS + 2):
                token = logits.argmax(-1)
                tokens.append(token)
                logprobs.append(torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0])
                t0 = time.perf_counter()
                logits = stepper.advance(token)
                times.append(time.perf_counter() - t0)
    finally:
        native.preallocated_cache = keep
    return statistics.median(times[2:]), torch.stack(tokens, 1), torch.stack(logprobs, 1)


def decode_main(args) -> None:
    from cory import zoo

    torch.manual_seed(0)
    policy = Policy.from_pretrained(str(zoo.build(args.model, progress=False)))
    policy.model.eval()
    off = {"preallocated cache": False, "grouped attention": False}
    settings = {"no lever (dynamic cache, heads copied for sdpa)": off,
                "+ preallocated KV cache": {**off, "preallocated cache": True},
                "+ grouped heads handed to the kernel (cory's loop)": {"preallocated cache": True, "grouped attention": True}}
    result = {"model": args.model, "threads": torch.get_num_threads(), "steps": DECODE_STEPS, "batches": {}}
    for batch in (16, 64):
        rows, reference, floors = {}, None, []
        for _ in range(args.iterations):  # interleaved repeats: each setting's and the floor's median of medians
            floors.append(decode_gemm_floor(policy.model.config, batch, repeats=5))
            for name, levers in settings.items():
                seconds, tokens, logprobs = decode_steps(policy, batch, levers)
                if reference is None:
                    reference = (tokens, logprobs)
                r = rows.setdefault(name, {"step_ms": [], "greedy_identical": True, "max_logprob_diff": 0.0})
                r["step_ms"].append(seconds * 1e3)
                r["greedy_identical"] &= bool(torch.equal(tokens, reference[0]))
                r["max_logprob_diff"] = max(r["max_logprob_diff"], (logprobs - reference[1]).abs().max().item())
        floor = statistics.median(floors)
        for r in rows.values():
            r["median_step_ms"] = statistics.median(r["step_ms"])
            r["vs_floor"] = r["median_step_ms"] / (floor * 1e3)
        result["batches"][str(batch)] = {"gemm_floor_ms": floor * 1e3, "gemm_floor_repeats_ms": [f * 1e3 for f in floors],
                                         "settings": rows}
    result["load_average_end"] = os.getloadavg()[0]
    lines = [f"# One decode step of the native loop on {args.model} (float32, {result['threads']} threads)", "",
             f"Greedy decoding of {DECODE_STEPS} tokens from chat prompts; the step's median over them, then the median of "
             f"{args.iterations} interleaved repeats. The GEMM floor is the step's matrix products alone at their real shapes "
             "(every layer's q, k, v, o, gate, up, down and the LM head), timed in each repeat, its median. Tokens and "
             f"log-probs are compared with the loop without the levers. Load average at the end: {result['load_average_end']:.1f}.", "",
             "| batch | loop | step | GEMM floor | step / floor | greedy identical | max log-prob difference |",
             "|---|---|---|---|---|---|---|"]
    for batch, b in result["batches"].items():
        for name, r in b["settings"].items():
            lines.append(f"| {batch} | {name} | {r['median_step_ms']:.1f} ms | {b['gemm_floor_ms']:.1f} ms "
                         f"| {r['vs_floor']:.2f}x | {'yes' if r['greedy_identical'] else 'NO'} | "
                         f"{r['max_logprob_diff']:.1e} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput_decode.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "throughput_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
