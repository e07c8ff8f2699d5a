"""Peak memory of CORY's two modes against single-agent PPO on the same model.

Each configuration runs in a fresh process for a few iterations of the sentiment task on a model
large enough that its weights dominate the runtime's own memory (a randomly initialised
Llama-architecture LM, ~25M parameters by default, with the embedded reviews tokenizer). The figure
is the process's peak resident memory (on a GPU: peak allocated device memory), also shown above a
baseline process that loads the same libraries, task and reward but no policy.

    python benchmarks/cory_memory.py [--hidden 512 --layers 8 --iterations 2 --repeats 1]
Writes benchmarks/results/cory_memory.{json,md}.
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
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cory import zoo

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys, torch
from cory.coevolve import CoryRun
from cory.config import load_config
from cory.tasks import make_task
from cory.train import TrainingRun
mode, model, out, iters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
common = [f"model.name={model}", "task.reward=cory:tiny-sentiment", "train.batch_size=8", "generation.max_new_tokens=16",
          "train.log_with=[]", "train.progress=false", "algo.name=ppo", "task.num_eval_prompts=8"]
extra = {"ppo": [], "cory-full": ["cory.enabled=true"], "cory-shared": ["cory.enabled=true", "model.lora.r=16"],
         "baseline": []}[mode]
cfg = load_config(None, common + extra)
if mode == "baseline":
    task = make_task(cfg.task)
    task.score(["The film"] * 8, [" was good"] * 8)
else:
    run = (CoryRun if cfg.cory.enabled else TrainingRun)(cfg, out)
    run._start(resume=False)
    for _ in range(iters):
        run.iterate()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
peak_cpu = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"peak_rss": peak_cpu, "peak_gpu": peak_gpu}))
"""


def make_model(folder: Path, hidden: int, layers: int) -> int:
    tok = AutoTokenizer.from_pretrained(zoo.resolve("cory:tiny-reviews"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def measure(mode: str, model: Path, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(model), out, str(iterations)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        n_params = make_model(model, args.hidden, args.layers)
        key = "peak_gpu" if torch.cuda.is_available() else "peak_rss"
        modes = ["baseline", "ppo", "cory-full", "cory-shared"]
        peaks = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                peaks[m].append(measure(m, model, args.iterations)[key])
    med = {m: statistics.median(v) for m, v in peaks.items()}
    base = med["baseline"] if key == "peak_rss" else 0
    mib = 1024**2
    rows = []
    for m in ["ppo", "cory-full", "cory-shared"]:
        rows.append({"mode": m, "peak_mib": med[m] / mib, "above_baseline_mib": (med[m] - base) / mib,
                     "ratio_vs_ppo": med[m] / med["ppo"], "ratio_above_baseline_vs_ppo": (med[m] - base) / (med["ppo"] - base)})
    result = {"params": n_params, "measure": key, "baseline_mib": base / mib, "iterations": args.iterations,
              "repeats": args.repeats, "rows": rows}
    names = {"ppo": "single-agent PPO", "cory-full": "CORY-PPO, full copies", "cory-shared": "CORY-PPO, shared base (LoRA)"}
    lines = [f"# Peak memory: CORY vs single-agent PPO ({n_params / 1e6:.1f}M-parameter model, {key.replace('_', ' ')}, "
             f"median of {args.repeats})", "",
             f"Baseline process (libraries, task, reward model, no policy): {base / mib:,.0f} MiB.", "",
             "| run | peak MiB | above baseline MiB | ratio vs PPO | ratio vs PPO above baseline |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {names[r['mode']]} | {r['peak_mib']:,.0f} | {r['above_baseline_mib']:,.0f} | {r['ratio_vs_ppo']:.2f}x | "
                     f"{r['ratio_above_baseline_vs_ppo']:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cory_memory.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "cory_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
