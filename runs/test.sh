#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite (hermetic, CPU, no network).
set -e
cd "$(dirname "$0")/.."
source runs/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest -q "$@"
