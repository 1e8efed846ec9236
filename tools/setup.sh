#!/usr/bin/env bash
# Creates ./.venv with moe-ep and its dependencies, once; later calls return at once.
# torch is pinned to the CPU build (2.13.0) for this set-up path so that a fresh machine
# never downloads a multi-GB CUDA build. On a GPU machine install your own CUDA torch
# first and then `pip install -e .` (setup.cfg does not pin torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import moe_ep, eplb, torch, deepspeed, pytest, hypothesis, diffusers, transformers" >/dev/null 2>&1; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev]"
.venv/bin/python -c "import torch, deepspeed; print('moe-ep set up: torch', torch.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING
