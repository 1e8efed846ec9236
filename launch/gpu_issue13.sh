#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md section 1d (one H200): kernel variants, bf16-vs-fp64
# checks and phases, the layer vs DeepSpeed-MoE (random and Zipf 1.2 gates), and the
# hunyuan_like step eager vs CUDA graph, with model.compile off and on; the kernel profile and
# the burst vs sustained clocks (launch/gpu_profile.py). Logs go to ${OUT:-.}/.
# Usage: bash launch/gpu_issue13.sh [round2|round3|round4|round5|round6|quick|skip]   (skip: no kernel variants;
# round5: launch/gpu_power_probe.py, the GEMMs in a burst vs sustained, the persistent GEMMs, the projections;
# round6: launch/gpu_quack_probe.py --in-place (Triton vs QuACK down GEMM, quack-kernels installed), then
# the checks, the layer and the compiled step only; round7: the same with --gate-up-in-place (QuACK down
# vs QuACK for both GEMMs) and both steps). A second argument splits a run over two device calls:
# "checks" stops after the kernel probe and launch/gpu_check.py, "bench" starts at the layer.
set -u
part=${2:-all}
steps="false true"; profile=1
case "${1:-}" in round6) steps=true; profile=0;; round7) profile=0;; esac
out=$(realpath "${OUT:-.}")
export PYTHONUNBUFFERED=1
L="--device cuda --dtype bfloat16 --tokens 8192 --hidden 4096 --expert-hidden 3072 --experts 64 --top-k 8 --iters 20"
if [ $part = bench ]; then
  :
elif [ "${1:-}" = round5 ]; then
  for mode in layouts persistent projections; do
    flag=$([ $mode = layouts ] || echo --$mode)
    (cd launch && timeout 300 python3 gpu_power_probe.py $flag --json "$out/power_$mode.json" > "$out/power_$mode.log" 2>&1)
    echo "power probe $mode rc=$?"; grep -v -i warn "$out/power_$mode.log" | tail -14 | cut -c1-220
  done
elif [ "${1:-}" = round6 ] || [ "${1:-}" = round7 ]; then
  [ "$1" = round6 ] && mode=--in-place || mode=--gate-up-in-place
  timeout 240 python3 launch/gpu_quack_probe.py $mode --json "$out/quack_in_place.json" > "$out/quack_in_place.log" 2>&1
  echo "quack in place rc=$?"; grep -v -i warn "$out/quack_in_place.log" | tail -6 | cut -c1-300
elif [ "${1:-}" != skip ]; then
  timeout 200 python3 launch/gpu_kernel_variants.py ${1:+--$1} --json "$out/variants.json" > "$out/variants.log" 2>&1
  echo "variants rc=$?"; grep -E "^(gate_up|down|router_ms|index_ms)" "$out/variants.log" | cut -c1-60,118-
fi
if [ $part != bench ]; then
  timeout 200 python3 launch/gpu_check.py > "$out/check.log" 2>&1
  echo "check rc=$?"; grep -vE '^ |^\{|^\}' "$out/check.log" | tail -24 | cut -c1-200
fi
[ $part = checks ] && exit 0
for skew in 0 1.2; do
  timeout 200 python3 launch/bench.py layer $L --skew $skew --json "$out/layer_skew$skew.json" > "$out/layer_skew$skew.log" 2>&1
  echo "layer skew=$skew rc=$?"; tail -6 "$out/layer_skew$skew.log" | cut -c1-200
done
for c in $steps; do
  timeout 240 python3 launch/bench.py step --config configs/hunyuan_like.json --set sampling.batch_size=4 \
    --set telemetry.wandb=false --set model.compile=$c --steps 5 --cuda-graph --json "$out/step_compile_$c.json" \
    > "$out/step_compile_$c.log" 2>&1
  echo "step compile=$c rc=$?"; grep step_ms_median "$out/step_compile_$c.log" | cut -c1-900
done
[ $profile = 1 ] || exit 0
(cd launch && timeout 240 python3 gpu_profile.py --compile --json "$out/profile.json" > "$out/profile.log" 2>&1)
echo "profile rc=$?"; grep -v "^  " "$out/profile.log" | tail -12 | cut -c1-400
