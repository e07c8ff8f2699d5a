#!/usr/bin/env bash
# The GPU check: one script to run when a machine with an NVIDIA GPU is available (< 10 minutes on
# one GPU: each step has a time cap, 240 + 120 + 100 + 3 x 50 s). It runs, in order, printing each
# step's wall time:
#   1. the test suite on CUDA (CORY_TEST_DEVICE=cuda), stopping at the first failure;
#   2. the vLLM tests (tests/test_vllm.py: generation, log-probs, weight sync, LoRA sync), when vllm
#      is importable (by CORY_VLLM_PYTHON, default the project's venv);
#   3. peak GPU memory of one learner iteration per mode: full fp32, full bf16, LoRA, LoRA + gradient
#      checkpointing, QLoRA (benchmarks/memory.py);
#   4. short runs on SmolLM2-135M-Instruct printing generation tokens/s, iteration time and peak GPU
#      memory: single-agent LoRA in bf16, QLoRA, and CORY (shared base, bf16), each on vLLM when
#      the generation.backend key and vllm are both there.
# Results go to runs/gpu_check/ (summary.txt collects the figures).
#
#   scripts/gpu_check.sh               on a GPU machine
#   scripts/gpu_check.sh --cpu-dry-run the same steps on the CPU with the micro models and tiny sizes,
#                                      to check the script itself (QLoRA is then expected to be refused)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac

OUT=runs/gpu_check
PY=.venv/bin/python
VLLM_PY=${CORY_VLLM_PYTHON:-$PY}
T0=$(date +%s)
step() { echo; echo "== $1  (at $(( $(date +%s) - T0 )) s)"; }

if [ "$DRY" = 0 ]; then
  if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1); then
    echo "gpu_check: no NVIDIA GPU visible (use --cpu-dry-run to check the script on a CPU)" >&2
    exit 2
  fi
  nvidia-smi -L
fi
if [ -e "$OUT" ]; then
  echo "gpu_check: $OUT exists; move it away first (a check never overwrites an earlier one)" >&2
  exit 2
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

step "setup"
make setup
if [ "$DRY" = 0 ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check -e ".[qlora]"
fi
"$PY" - <<'EOF' | tee -a "$SUMMARY"
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPU: {gpu}")
EOF

if [ "$DRY" = 0 ]; then
  MODEL=cory:smollm2-135m-instruct; REWARD=cory:tiny-sentiment; ITERS=8; BATCH=16; TOKENS=32; DEVICE=cuda
  MEM_ARGS=(--device cuda --batch 16 --prompt-len 64 --response-len 64 --model "$MODEL")
  TESTS=(tests)
else
  MODEL=cory:micro-reviews; REWARD=cory:micro-sentiment; ITERS=2; BATCH=4; TOKENS=8; DEVICE=cpu
  MEM_ARGS=(--device cpu --batch 2 --prompt-len 8 --response-len 8 --model "$MODEL" --modes full-fp32,lora-bf16-ckpt)
  TESTS=(tests/test_lean.py)
fi

step "1. test suite on $DEVICE"
# Each step records its outcome and the check goes on, so that one failure still leaves every figure.
(CORY_TEST_DEVICE=$DEVICE timeout 240 "$PY" -m pytest -q -x "${TESTS[@]}" 2>&1 || true) | tail -n 15 | tee "$OUT/tests.txt"
echo "suite ($DEVICE): $(tail -n 1 "$OUT/tests.txt")" >> "$SUMMARY"

step "2. vLLM tests"
if "$VLLM_PY" -c "import vllm" 2>/dev/null && [ -f tests/test_vllm.py ]; then
  (CORY_TEST_DEVICE=$DEVICE timeout 120 "$VLLM_PY" -m pytest -q -x tests/test_vllm.py 2>&1 || true) | tail -n 15 | tee "$OUT/vllm_tests.txt"
  echo "vllm tests: $(tail -n 1 "$OUT/vllm_tests.txt")" >> "$SUMMARY"
else
  echo "vllm is not importable by $VLLM_PY (or tests/test_vllm.py is missing): vLLM tests NOT run" | tee -a "$SUMMARY"
fi

step "3. peak memory per mode (benchmarks/memory.py)"
(timeout 100 "$PY" benchmarks/memory.py "${MEM_ARGS[@]}" --out "$OUT/memory" 2>&1 || true) | tail -n 20 | tee "$OUT/memory.txt"
cat "$OUT/memory.md" >> "$SUMMARY" 2>/dev/null || echo "memory benchmark FAILED (see $OUT/memory.txt)" >> "$SUMMARY"

BACKEND=()
if "$PY" -c "from cory.config import valid_keys; assert 'generation.backend' in valid_keys()" 2>/dev/null \
   && "$PY" -c "import vllm" 2>/dev/null; then
  BACKEND=(generation.backend=vllm)
fi

# One training run in this process; prints generation tokens/s, iteration time and peak GPU memory.
measure() {
  local name=$1; shift
  (timeout 50 "$PY" - "$OUT/$name" "$@" <<'EOF' 2>&1 || echo "$name: FAILED or over 50 s") | tail -n 3 | tee -a "$SUMMARY"
import json, statistics, sys, time
import torch
from cory.config import load_config
from cory.errors import UsageError
from cory.api import train
out, overrides = sys.argv[1], sys.argv[2:]
name = out.rsplit("/", 1)[-1]
try:
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    train(cfg, out)
except UsageError as e:
    print(f"{name}: refused: {e}")
    sys.exit(0)
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
rate = [r["tokens_per_s/generate"] for r in rows if "tokens_per_s/generate" in r]
if torch.cuda.is_available():
    peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
else:
    peak = "peak RSS " + next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")) + " kB"
print(f"{name}: {len(rows)} iterations in {time.perf_counter() - t0:.1f} s; median iteration {statistics.median(r['time/iteration'] for r in rows):.2f} s;"
      f" generation {statistics.median(rate) if rate else float('nan'):.0f} tokens/s; {peak}; reward {rows[0]['reward_mean']:.3f} -> {rows[-1]['reward_mean']:.3f}")
EOF
}

COMMON=(model.name=$MODEL task.reward=$REWARD train.iterations=$ITERS train.batch_size=$BATCH
        generation.max_new_tokens=$TOKENS train.log_with=[] train.progress=false task.num_eval_prompts=16
        eval.samples_per_prompt=1 "${BACKEND[@]}")

step "4a. single-agent LoRA, bf16, gradient checkpointing"
measure lora_bf16 "${COMMON[@]}" model.dtype=bfloat16 model.lora.r=16 train.gradient_checkpointing=true algo.name=ppo

step "4b. QLoRA (4-bit base)"
measure qlora "${COMMON[@]}" model.dtype=bfloat16 model.lora.r=16 model.lora.quantize=4bit algo.name=ppo

step "4c. CORY on a shared base, bf16"
measure cory_shared "${COMMON[@]}" model.dtype=bfloat16 cory.enabled=true cory.shared_base=true algo.name=ppo

step "done in $(( $(date +%s) - T0 )) s; figures in $SUMMARY"
cat "$SUMMARY"
