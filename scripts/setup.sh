#!/usr/bin/env bash
# Create .venv and install fdpo with its test tools. The pinned CPU torch goes in FIRST: an unpinned
# torch (or a range that admits a newer release) pulls several GB of CUDA packages.
# On a GPU machine, install the torch build for your CUDA instead (see README, "On GPUs").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "fdpo installed in .venv ($(.venv/bin/python -c 'import torch, trl, transformers; print("torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__)'))"
