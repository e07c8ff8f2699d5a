#!/usr/bin/env bash
# Prepares, on a machine that reaches the package registry, the folder of wheels that the offline GPU
# check (scripts/gpu_check.sh --offline) installs with `pip --no-index`: what cory, its tests and the
# check need beyond what the lent GPU machines already have (Python 3.12 with a CUDA torch 2.11,
# transformers 5.17, accelerate, peft, tensorboard, matplotlib, safetensors, pyyaml, pyarrow, tqdm,
# and what those require: numpy, typing-extensions, packaging, tokenizers, huggingface-hub).
# docs/gpu-check.md says how it is used.
#
#   scripts/gpu_wheels.sh [--python 3.12,3.11] [--qlora] [--dest .gpu-wheels]
#
# --python   the Python versions to serve (default: 3.12, the GPU machines', plus this machine's
#            python3, so that the same folder passes the dry run here). Every wheel is pure Python
#            except charset-normalizer's, fetched as a manylinux x86-64 build for each version.
# --qlora    adds bitsandbytes (43 MB: QLoRA and the memory table's 4-bit row on the GPU).
# --dest     the folder (default .gpu-wheels, ignored by git, carried beside the project).
# The versions are pinned (each satisfies pyproject.toml), one of each, with their sha256 in
# SHA256SUMS; the script ends with the size of the folder plus the project against the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.gpu-wheels
PYVERS=""
QLORA=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVERS=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    --qlora) QLORA=1; shift ;;
    *) echo "usage: scripts/gpu_wheels.sh [--python 3.12,3.11] [--qlora] [--dest DIR]" >&2; exit 2 ;;
  esac
done
HERE_PY=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ -n "$PYVERS" ] || PYVERS="3.12${HERE_PY:+,$HERE_PY}"

PACKAGES=(
  # cory's own dependencies (pyproject.toml) that the machines lack, and what they require
  omegaconf==2.4.0                 # requires PyYAML (there)
  gymnasium==1.4.0                 # numpy, typing-extensions (there), cloudpickle, farama-notifications
  cloudpickle==3.1.3
  farama-notifications==0.0.6
  vaderSentiment==3.3.2            # requests
  gguf==0.19.0                     # numpy, pyyaml, tqdm (there), requests
  requests==2.34.2
  charset-normalizer==3.5.3        # the one compiled wheel: one per Python version
  idna==3.21
  urllib3==2.8.0
  certifi==2026.10.19.post1
  # the `dev` extra: the suite and its runner on every core
  pytest==9.2.0                    # iniconfig, pluggy, pygments, packaging
  iniconfig==2.3.1
  pluggy==1.7.0
  pygments==2.21.0
  pytest-timeout==2.4.0
  pytest-xdist==3.8.0              # execnet
  execnet==2.1.2
  # the build backend of `pip install -e .` under --no-index, and pip itself for a venv made
  # without it (the machine's venv module may lack ensurepip)
  setuptools==84.2.1
  wheel==0.48.0
  packaging==26.4                  # wheel's; there, but not inside pip's isolated build env
  pip==26.3
)
[ "$QLORA" = 0 ] || PACKAGES+=(bitsandbytes==0.50.2)  # torch, numpy, packaging (there)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
for v in ${PYVERS//,/ }; do
  echo "gpu_wheels: downloading for Python $v"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$v" --implementation cp --abi "cp${v/./}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$tmp" "${PACKAGES[@]}" 2> >(grep -v "^WARNING: Location" >&2)
done
(cd "$tmp" && sha256sum -- *.whl > SHA256SUMS)
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$tmp" "$DEST"
trap - EXIT
chmod 755 "$DEST"

python3 - "$DEST" <<'EOF'
import os, subprocess, sys
dest = sys.argv[1]
wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
names = {}
for w in wheels:
    names.setdefault(w.split("-")[0].lower().replace("_", "-"), set()).add(w.split("-")[1])
twice = {n: v for n, v in names.items() if len(v) > 1}
if twice:
    sys.exit(f"gpu_wheels: more than one version of {twice}")
# Every dependency in pyproject.toml is on the machines or in the folder (a new one needs a line above).
machine = {"torch", "transformers", "tokenizers", "accelerate", "peft", "safetensors", "numpy", "tqdm",
           "tensorboard", "matplotlib", "pyyaml", "pyarrow"}
try:
    import re, tomllib
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
    needed = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    missing = sorted(needed - machine - set(names))
    if missing:
        sys.exit(f"gpu_wheels: pyproject.toml needs {', '.join(missing)}: neither on the GPU machines nor in the list")
except ImportError:  # Python < 3.11: no tomllib
    pass
size = lambda paths: sum(os.path.getsize(p) for p in paths if os.path.isfile(p) and not os.path.islink(p))
folder = size(os.path.join(dest, f) for f in os.listdir(dest))
try:  # what travels with the work tree: tracked files and untracked files that git does not ignore
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    project = size(p for p in listed if p)
except (OSError, subprocess.CalledProcessError):
    project = 0
mib = 2**20
print(f"gpu_wheels: {len(wheels)} wheels of {len(names)} packages in {dest}: {folder / mib:.1f} MiB; "
      f"project {project / mib:.1f} MiB; together {(folder + project) / mib:.1f} MiB of the 64 MiB that can travel")
if folder + project > 64 * mib:
    sys.exit("gpu_wheels: over 64 MiB together")
EOF
