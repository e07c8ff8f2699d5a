"""Scoring and updating with the prompts' shared prefix run once (`train.shared_prefix`) against the
full passes, on SmolLM2-135M-Instruct with the arithmetic task's one-shot chat prompts.

A batch of the arithmetic task's chat prompts (system turn, the worked one-shot example, the problem)
shares its first ~66 tokens. For each mode (full, shared), the median over `--repeats` runs of:
- the reference's pass (LoRA adapters disabled, no gradient) with whole distributions, as the
  exact-KL scoring runs it;
- the policy's forward and backward (LoRA r 16 on every linear layer plus the value head) with
  log-probs, entropy and values, as each PPO minibatch runs it.
Both modes score the same prompts and the same responses (`--new-tokens` tokens each). The limits,
measured in the same run: each mode's matmul FLOPs (the tokens it runs through the blocks, the LM
head on the scored positions, attention; the backward of the frozen base computes input gradients
only) at the fp32 matmul peak of this machine (benchmarks/limits.py), so the
ideal speedup is the ratio of the tokens run. Log-probs of both modes are compared (largest gap).

    python benchmarks/shared_prefix.py [--batch-size 8] [--new-tokens 40] [--repeats 5] [--threads 2]
(about 2 minutes at 2 threads.) Writes benchmarks/results/shared_prefix.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from limits import attention_flops, llama_train_flops, matmul_flops, median_time

from cory.config import LoraConfig, load_config
from cory.generation.native import shared_prefix_length
from cory.generation.sampling import SamplingParams
from cory.lora import lora_policies
from cory.scoring import sequence_logprobs
from cory.tasks import make_task
from cory.tasks.registry import ARITHMETIC_CHAT_EXAMPLE

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "cory:smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "shared_prefix"), help="results path without suffix")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    policies, reference, _ = lora_policies(MODEL, LoraConfig(r=16, alpha=32), torch.float32, ["default"], value_head=True)
    policy = policies["default"]
    cfg = load_config(None, ["task.name=arithmetic", "task.chat_template=true"])
    prompts = make_task(cfg.task).train_prompts[: args.batch_size]
    query_ids, query_mask = policy.encode_prompts(prompts, SamplingParams(chat=True, chat_examples=(ARITHMETIC_CHAT_EXAMPLE,)))
    prefix = shared_prefix_length(query_ids, query_mask)
    vocab = policy.model.config.vocab_size
    response_ids = torch.randint(0, vocab, (args.batch_size, args.new_tokens), generator=torch.Generator().manual_seed(1))
    response_mask = torch.ones_like(response_ids)
    tensors = (query_ids, query_mask, response_ids, response_mask)
    config = policy.model.config

    def reference_pass(shared: bool):
        with torch.no_grad():
            return sequence_logprobs(reference, *tensors, with_full_logprobs=True, shared_prefix=shared).logprobs

    def update_pass(shared: bool):
        policy.module.zero_grad(set_to_none=True)
        out = sequence_logprobs(policy.module, *tensors, with_entropy=True, with_values=True, shared_prefix=shared)
        (out.logprobs.sum() + out.values.pow(2).sum() + 0.01 * out.entropy.sum()).backward()
        return out.logprobs.detach()

    peak = matmul_flops(torch.float32)
    rows, width = args.batch_size, query_ids.shape[1] + args.new_tokens
    results = {"model": MODEL, "batch_size": rows, "new_tokens": args.new_tokens, "prompt_columns": query_ids.shape[1],
               "shared_prefix_tokens": prefix, "threads": args.threads, "repeats": args.repeats, "fp32_matmul_peak": peak,
               "modes": {}}
    logprobs = {}
    for shared in (False, True):
        tokens = rows * width - (rows - 1) * prefix if shared else rows * width
        scored = rows * (args.new_tokens + 1)
        # forward + backward of a frozen base: the input gradients only (no weight gradients), 4 of the 6
        # FLOPs per weight and token that full fine-tuning needs; attention's backward is unchanged
        block_flops, attention = llama_train_flops(config, tokens, scored) / 6, attention_flops(config, rows, width) / 3
        ref_s, ref_lp = median_time(lambda: reference_pass(shared), args.repeats)
        upd_s, upd_lp = median_time(lambda: update_pass(shared), args.repeats)
        logprobs[shared] = (ref_lp, upd_lp)
        results["modes"]["shared" if shared else "full"] = {
            "tokens": tokens, "reference_s": ref_s, "update_s": upd_s,
            "reference_bound_s": (2 * block_flops + attention) / peak, "update_bound_s": (4 * block_flops + 3 * attention) / peak}
        print(f"{'shared' if shared else 'full':>6}: tokens {tokens}, reference pass {ref_s:.2f} s, forward+backward {upd_s:.2f} s", flush=True)
    results["largest_logprob_gap"] = max((a - b).abs().max().item() for a, b in zip(logprobs[False], logprobs[True]))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(results))
    print(report(results))


def report(r: dict) -> str:
    full, shared = r["modes"]["full"], r["modes"]["shared"]
    lines = [
        "# Scoring with the shared prompt prefix run once (`train.shared_prefix`)", "",
        f"Model {r['model']} (float32, LoRA r 16 + value head), the arithmetic task's one-shot chat prompts: batch "
        f"{r['batch_size']}, {r['prompt_columns']} prompt columns of which the first {r['shared_prefix_tokens']} tokens are "
        f"shared, {r['new_tokens']} response tokens. {r['threads']} threads; median of {r['repeats']} runs after a warm-up. "
        f"Bound: the pass's matmul FLOPs at the fp32 matmul peak measured in the same run ({r['fp32_matmul_peak'] / 1e9:.0f} GFLOP/s).",
        "",
        "| pass | full (s) | shared (s) | speedup | ideal speedup (tokens) | full / bound | shared / bound |",
        "|---|---|---|---|---|---|---|",
    ]
    ideal = full["tokens"] / shared["tokens"]
    for name, key in (("reference, whole distributions (no grad)", "reference"), ("policy forward + backward", "update")):
        f, s = full[f"{key}_s"], shared[f"{key}_s"]
        lines.append(f"| {name} | {f:.2f} | {s:.2f} | {f / s:.2f}x | {ideal:.2f}x | {f / full[f'{key}_bound_s']:.1f}x | "
                     f"{s / shared[f'{key}_bound_s']:.1f}x |")
    lines += ["", f"Tokens run through the blocks: {full['tokens']} (full) and {shared['tokens']} (shared). Largest gap between "
              f"the two modes' log-probs: {r['largest_logprob_gap']:.1e} (float rounding).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
