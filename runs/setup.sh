#!/usr/bin/env bash
# Installs what the project needs, only if it is missing. Every entry command (runs/*.sh, .ci/run) sources this.
# CPU-only machines get torch==2.13.0, the CPU build (an unpinned `torch` would pull GBs of CUDA wheels).
# GPU users: install the torch build for your CUDA first (see README); this script then leaves it alone.
set -e
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] installing torch (CUDA build)"; $PY -m pip install -q torch
  else
    echo "[setup] installing torch==2.13.0 (CPU build)"; $PY -m pip install -q torch==2.13.0
  fi
fi
if ! $PY -c "import transformers, datasets, tqdm, numpy, pytest, safetensors, huggingface_hub, tokenizers" 2>/dev/null; then
  echo "[setup] installing requirements.txt"
  $PY -m pip install -q -r "$(dirname "${BASH_SOURCE[0]}")/../requirements.txt"
fi
