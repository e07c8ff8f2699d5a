"""Peak memory of one learner iteration per memory mode: full fine-tuning in fp32 and bf16, LoRA
(frozen base = reference), gradient checkpointing, and QLoRA on a GPU.

Each mode runs in a fresh process: it builds the policy, the reference and the Learner exactly as
`cory train` does, makes a fixed-length rollout (random prompt and response tokens, behaviour
log-probs from the policy itself), and runs one `Learner.step` (scoring, PPO loss, backward, AdamW
step). Reported per mode: the peak resident memory during the step (VmHWM, reset just before it
through /proc/self/clear_refs; loading a model can peak higher, so the process's peak is shown too)
or the peak allocated device memory during the step (`torch.cuda.max_memory_allocated`, GPU), the
memory held once the models are loaded, and the step's peak above a baseline process that imports
the same libraries and loads no model, all measured in the same invocation. Peak memory hardly varies between repeats; the median is reported.

Without `--model`, the model is a randomly initialised LlamaForCausalLM with SmolLM2-135M's exact
shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocabulary 49152, tied
embeddings): memory does not depend on the weights' values, and the rollout has a fixed length.

    python benchmarks/memory.py [--model cory:smollm2-135m-instruct] [--batch 8 --prompt-len 32 --response-len 32]
                                [--modes full-fp32,lora-bf16,...] [--repeats 1] [--device cpu|cuda]
Writes benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

RESULTS = Path(__file__).parent / "results"

MODES = {
    # name: (model.dtype, model.lora.r, train.gradient_checkpointing, model.lora.quantize)
    "full-fp32": ("float32", 0, False, "none"),
    "full-bf16": ("bfloat16", 0, False, "none"),
    "full-fp32-ckpt": ("float32", 0, True, "none"),
    "lora-fp32": ("float32", 16, False, "none"),
    "lora-bf16": ("bfloat16", 16, False, "none"),
    "lora-bf16-ckpt": ("bfloat16", 16, True, "none"),
    "qlora-4bit-ckpt": ("bfloat16", 16, True, "4bit"),
}
GPU_ONLY = {"qlora-4bit-ckpt"}

CHILD = r"""
import json, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from cory.algorithms import make_algorithm
from cory.build import build_agents, make_accelerator
from cory.config import load_config
from cory.learner import Learner
from cory.rollout import Rollout
from cory.scoring import sequence_logprobs

def status(key):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

def rss_now():
    return status("VmRSS")

cuda = spec["device"] == "cuda"
out = {"rss_imports": rss_now()}
if spec["mode"] != "baseline":
    dtype, r, ckpt, quantize = spec["settings"]
    cfg = load_config(None, [f"model.name={spec['model']}", f"model.dtype={dtype}", f"model.lora.r={r}",
                             f"model.lora.quantize={quantize}", f"train.gradient_checkpointing={ckpt}", "algo.name=ppo",
                             "train.log_with=[]", f"train.batch_size={spec['batch']}"])
    acc = make_accelerator(cfg, spec["out"])
    algorithm = make_algorithm(cfg)
    # LoRA: an adapter on a frozen base, which is the reference; else a full copy and a loaded reference.
    agents = build_agents(cfg, ["policy"], algorithm.needs_values)
    policy = agents.policies["policy"]
    learner = Learner(policy, agents.reference, algorithm, cfg, acc, agents.parameters["policy"])
    device = acc.device
    b, lq, lr = spec["batch"], spec["prompt_len"], spec["response_len"]
    g = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vocab_size
    q = torch.randint(3, vocab, (b, lq), generator=g).to(device)
    resp = torch.randint(3, vocab, (b, lr), generator=g).to(device)
    ones_q, ones_r = torch.ones_like(q), torch.ones_like(resp)
    with torch.no_grad():
        logprobs = sequence_logprobs(learner.module, q, ones_q, resp, ones_r).logprobs
    rollout = Rollout(query_ids=q, query_mask=ones_q, response_ids=resp, response_mask=ones_r, logprobs=logprobs,
                      scores=torch.randn(b, generator=g).to(device), finished=torch.ones(b, dtype=torch.bool, device=device),
                      episode_ids=torch.arange(b, device=device), turn_index=torch.zeros(b, dtype=torch.long, device=device),
                      done=torch.ones(b, dtype=torch.bool, device=device), group_ids=torch.arange(b, device=device))
    out["rss_loaded"] = rss_now()
    out["trainable_params"] = sum(p.numel() for p in policy.module.parameters() if p.requires_grad)
    out["total_params"] = sum(p.numel() for p in policy.module.parameters())
    if cuda:
        torch.cuda.synchronize()
        out["gpu_loaded"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    out["rss_peak_load"] = status("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS (Linux >= 4.0)
        fh.write("5")
    t0 = time.perf_counter()
    learner.step(rollout, 0, torch.Generator().manual_seed(0))
    out["rss_peak_step"] = status("VmHWM")
    if cuda:
        torch.cuda.synchronize()
        out["gpu_peak"] = torch.cuda.max_memory_allocated()
    out["step_s"] = time.perf_counter() - t0
out["rss_peak"] = max(status("VmHWM"), out.get("rss_peak_load", 0))
print("RESULT " + json.dumps(out))
"""


def smollm2_shaped(folder: Path) -> Path:
    """A randomly initialised LlamaForCausalLM with SmolLM2-135M's shape, and a small word-level
    tokenizer (the rollout is made of token ids; no text is decoded)."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)
    return folder


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"mode {spec['mode']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="a cory: name or HF folder (default: SmolLM2-135M-shaped random model)")
    ap.add_argument("--modes", default="", help="comma-separated subset of: " + ", ".join(MODES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="")
    ap.add_argument("--out", default=str(RESULTS / "memory"), help="results path without extension")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in (args.modes.split(",") if args.modes else MODES) if device == "cuda" or m not in GPU_ONLY]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown modes: {', '.join(unknown)}; choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(smollm2_shaped(Path(tmp) / "smollm2-135m-shaped"))
        common = {"model": model, "batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len,
                  "threads": args.threads, "device": device, "out": str(Path(tmp) / "run")}
        baseline = statistics.median(run_child({**common, "mode": "baseline"})["rss_peak"] for _ in range(args.repeats))
        rows = []
        for mode in modes:
            runs = [run_child({**common, "mode": mode, "settings": MODES[mode]}) for _ in range(args.repeats)]
            med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
            row = {"mode": mode, "dtype": MODES[mode][0], "lora_r": MODES[mode][1], "gradient_checkpointing": MODES[mode][2],
                   "quantize": MODES[mode][3], "trainable_params": runs[0]["trainable_params"], "total_params": runs[0]["total_params"],
                   "peak_rss_mb": med("rss_peak") / 2**20, "peak_rss_above_baseline_mb": (med("rss_peak") - baseline) / 2**20,
                   "loaded_rss_mb": med("rss_loaded") / 2**20, "step_peak_rss_mb": med("rss_peak_step") / 2**20,
                   "step_peak_above_baseline_mb": (med("rss_peak_step") - baseline) / 2**20, "step_s": med("step_s")}
            if device == "cuda":
                row["gpu_peak_mb"] = med("gpu_peak") / 2**20
                row["gpu_loaded_mb"] = med("gpu_loaded") / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"model": args.model or "random LlamaForCausalLM with SmolLM2-135M's shape (134.5M parameters)", "device": device,
            "batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len, "repeats": args.repeats,
            "threads": args.threads, "algorithm": "ppo (value head), one Learner.step", "baseline_rss_mb": baseline / 2**20}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    gpu = meta["device"] == "cuda"
    ref = rows[0]["step_peak_above_baseline_mb"] if rows and not gpu else (rows[0].get("gpu_peak_mb") if rows else None)
    lines = [
        f"# Peak memory of one learner iteration ({meta['device']})",
        "",
        f"Model: {meta['model']}. Rollout: {meta['batch']} sequences of {meta['prompt_len']} prompt + "
        f"{meta['response_len']} response tokens; {meta['algorithm']}; {meta['threads']} thread(s); median of "
        f"{meta['repeats']} run(s), each in a fresh process. Baseline process (libraries only): "
        f"{meta['baseline_rss_mb']:.0f} MB RSS.",
        "",
        "| mode | trainable params | " + ("peak GPU MB (step) | GPU MB after load | " if gpu else "")
        + "peak RSS MB (step) | step peak above baseline MB | vs first row | RSS after load MB | process peak RSS MB | step s |",
        "|---|---|" + ("---|---|" if gpu else "") + "---|---|---|---|---|---|",
    ]
    for r in rows:
        figure = r["gpu_peak_mb"] if gpu else r["step_peak_above_baseline_mb"]
        lines.append(f"| {r['mode']} | {r['trainable_params'] / 1e6:.2f}M | "
                     + (f"{r['gpu_peak_mb']:.0f} | {r['gpu_loaded_mb']:.0f} | " if gpu else "")
                     + f"{r['step_peak_rss_mb']:.0f} | {r['step_peak_above_baseline_mb']:.0f} | {figure / ref:.2f}x | "
                     + f"{r['loaded_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['step_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
