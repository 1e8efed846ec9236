#!/usr/bin/env bash
# Stage 3 of the demo recipe, several variants at once on one GPU (each run is launch-bound, so
# they share it well): fine-tune the stage-2 checkpoint at a lower learning rate.
# Usage: OUT=runs/demo bash launch/gpu_demo_stage3.sh BUDGET_S INIT "name|train args" [...]
set -u
out=${OUT:-.}
budget=$1; init=$2; shift 2
export PYTHONUNBUFFERED=1
for spec in "$@"; do
  name=${spec%%|*}; args=${spec#*|}
  mkdir -p "$out/$name"
  python3 launch/train.py --config configs/quickstart.json --out "$out/$name" --time-budget-s "$budget" \
    --log-every 1000 --set model.qk_norm=true --init-from "$init" $args > "$out/$name/train.log" 2>&1 &
done
wait
for spec in "$@"; do name=${spec%%|*}; echo "== $name"; tail -3 "$out/$name/train.log" | cut -c1-400; done
