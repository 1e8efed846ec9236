#!/usr/bin/env bash
# The recipe of the shipped demo model (checkpoints/shapes_demo.safetensors), on one GPU:
#   stage 1: from the seed, lr 1e-3, 2400 steps (qk_norm keeps attention logits bounded at this lr;
#            runs without it diverged);
#   stage 2: from stage 1's EMA weights, lr 7e-4 with a fresh warm-up and cosine decay;
#   stage 3: from stage 2, lr 3e-4, batch 512 (fine-tuning at a lower rate and less gradient noise).
# Usage: OUT=runs/demo bash benchmarks/train_demo.sh [STAGE2_BUDGET_S] [STAGE3_BUDGET_S]
# The shipped weights: `bash benchmarks/train_demo.sh 340 420` (stage 3 shared the GPU with two other
# variants, `bash benchmarks/gpu_runs.sh demo-sweep`; alone it runs faster).
set -eu
out=${OUT:-runs/demo}
budget2=${1:-400}
budget3=${2:-420}
export PYTHONUNBUFFERED=1
mkdir -p "$out/stage1" "$out/stage2" "$out/stage3"
python3 launch/train.py --config configs/quickstart.json --out "$out/stage1" --steps 2400 --lr 1e-3 \
  --log-every 400 --set model.qk_norm=true 2>&1 | tee "$out/stage1/train.log"
python3 launch/train.py --config configs/quickstart.json --out "$out/stage2" --steps 8000 --lr 7e-4 \
  --warmup 300 --time-budget-s "$budget2" --log-every 500 --set model.qk_norm=true \
  --init-from "$out/stage1/shapes_demo.safetensors" 2>&1 | tee "$out/stage2/train.log"
python3 launch/train.py --config configs/quickstart.json --out "$out/stage3" --steps 7000 --lr 3e-4 \
  --warmup 200 --batch 512 --time-budget-s "$budget3" --log-every 1000 --set model.qk_norm=true \
  --init-from "$out/stage2/shapes_demo.safetensors" 2>&1 | tee "$out/stage3/train.log"
