#!/usr/bin/env bash
# Train several demo-model recipes at once on one GPU (each run is launch-bound, so they share
# the GPU well), then score each one's prompt adherence (moe_ep/demo/adherence.py, 64 prompts).
# Logs, checkpoints and sample grids go to ${OUT:-.}/<recipe>/.
# Usage: bash launch/gpu_demo_sweep.sh BUDGET_S "name|train args" ["name|train args" ...]
# (fine-tuning variants: put --init-from CHECKPOINT in the train args)
set -u
out=${OUT:-.}
budget=$1; shift
export PYTHONUNBUFFERED=1
names=()
for spec in "$@"; do
  name=${spec%%|*}; args=${spec#*|}; names+=("$name")
  mkdir -p "$out/$name"
  python3 launch/train.py --config configs/quickstart.json --out "$out/$name" --time-budget-s "$budget" \
    --log-every 500 $args > "$out/$name/train.log" 2>&1 &
done
wait
# Scoring samples through diffusers' scheduler; where the GPU image lacks diffusers, score the
# checkpoints on the CPU instead (python -m moe_ep.demo.adherence --set model.checkpoint=...).
python3 -c "import diffusers" 2>/dev/null || { echo "no diffusers here: not scoring"; score=0; }
for spec in "$@"; do
  name=${spec%%|*}; args=${spec#*|}
  [ "${score:-1}" = 0 ] && { tail -2 "$out/$name/train.log" | cut -c1-300; continue; }
  qk=$(echo "$args" | grep -o 'model.qk_norm=[a-z]*' || echo model.qk_norm=false)
  tail -2 "$out/$name/train.log" | cut -c1-300
  for steps in 12 24; do
    echo "$name steps=$steps $(python3 -m moe_ep.demo.adherence --device cuda --prompts 64 \
      --set model.checkpoint="$out/$name/shapes_demo.safetensors" $qk sampling.num_inference_steps=$steps \
      --grid "$out/$name/grid_$steps.png" 2>&1 | tail -1)"
  done
done
