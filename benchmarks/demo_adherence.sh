#!/usr/bin/env bash
# The prompt-adherence table of docs/quickstart.md: the 64 evaluation prompts sampled at EP = 1 and 2,
# with and without rebalancing, each run scored by moe_ep/demo/classify.py. CPU (gloo) by default.
# Usage: bash benchmarks/demo_adherence.sh [OUT_DIR] [extra --set overrides...]
set -eu
out=${1:-outputs/adherence}; shift || true
py=${PYTHON:-.venv/bin/python}; ds=${DEEPSPEED:-.venv/bin/deepspeed}
prompts=$($py -c 'import json; from moe_ep.demo.adherence import eval_prompts; print(json.dumps(eval_prompts(64)))')
common=(--config configs/quickstart.json --set telemetry.wandb=false "sampling.prompts=$prompts" sampling.batch_size=8 "$@")
run() {  # name, ranks, overrides...
  local name=$1 ranks=$2; shift 2
  if [ "$ranks" = 1 ]; then $py launch/infer.py "${common[@]}" "$@" output_dir="$out/$name" > "$out/$name.log" 2>&1
  else $ds --num_gpus "$ranks" launch/infer.py "${common[@]}" "$@" output_dir="$out/$name" > "$out/$name.log" 2>&1; fi
  echo "$name: $($py -m moe_ep.demo.adherence --run-dir "$out/$name") $(grep -o 'balancedness.*' "$out/$name.log" | tail -1)"
}
mkdir -p "$out"
run ep1_none 1 eplb.enabled=false
run ep1_rebalance 1 eplb.min_gain=-1   # at EP = 1 every placement is balanced: force the moves (local copies)
run ep2_none 2 eplb.enabled=false
run ep2_rebalance 2
run ep2_timestep_aware 2 eplb.timestep_buckets=12 eplb.timestep_aware=true
$py - "$out" <<'PY'
import os, sys
from moe_ep.demo.adherence import run_images
out = sys.argv[1]
ref = run_images(os.path.join(out, "ep1_none"))[0].astype(int)
for name in ("ep1_rebalance", "ep2_none", "ep2_rebalance", "ep2_timestep_aware"):
    diff = abs(run_images(os.path.join(out, name))[0].astype(int) - ref)
    print(f"{name} vs ep1_none: {int((diff.reshape(len(ref), -1).max(1) > 0).sum())} of {len(ref)} images differ, "
          f"{int((diff > 1).sum())} of {diff.size} channel values by > 1 level, max {int(diff.max())}")
PY
