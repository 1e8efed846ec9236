#!/usr/bin/env bash
# The two-GPU runs (issue 14, blocked: no machine with 2 GPUs has been lent): EP = 2 over
# NCCL, bf16, the anchor layer (8192 tokens per rank, 64 experts, top-8, hidden 4096 / 3072).
# Each part prints its lines and writes JSON to ${OUT:-.}/; parts fit one device call each
# (about 3-6 minutes), "all" runs them in order.
#
#   bash launch/gpu_ep2.sh layer       # moe-ep (send once per rank + own rows during the exchange,
#                                      #   exchange then compute, one row per copy) vs DeepSpeed-MoE,
#                                      #   random and Zipf 1.2 gates; the same layer on one GPU
#   bash launch/gpu_ep2.sh skew        # Zipf 1.2: no redundant slots / 8 redundant, no rebalancing /
#                                      #   online rebalancing; the uniform gate beside it
#   bash launch/gpu_ep2.sh migration   # sync vs async moves of 75 MB experts: P2P rate, stall
#   bash launch/gpu_ep2.sh step        # hunyuan_like step at EP = 2 vs EP = 1 on one GPU
#   bash launch/gpu_ep2.sh diffusers   # HiDream-I1 / NucleusMoE layers at EP = 2 vs diffusers on one GPU
#   bash launch/gpu_ep2.sh simulate    # the simulator's 1- and 2-GPU check (no GPU needed)
#
# REHEARSE=1 runs every part on 2 CPU ranks (gloo) at tiny sizes: the same scripts and flags, so
# the plumbing is known to work before a GPU machine is held (about 2 minutes on 2 cores).
set -u
part=${1:-all}
mkdir -p "${OUT:-.}" && out=$(realpath "${OUT:-.}")
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
venv=$([ -x .venv/bin/python ] && echo .venv/bin/ || true)     # the README's venv when there is one
PY=${PYTHON:-${venv}python}; DS=${DEEPSPEED:-${venv}deepspeed}
if [ "${REHEARSE:-0}" = 1 ]; then
  DEV="--device cpu"; DT="--dtype float32"
  SHAPE="--tokens 256 --hidden 128 --expert-hidden 96 --experts 16 --top-k 4"
  RB_SHAPE="--layers 2 --experts 16 --top-k 4 --hidden 64 --expert-hidden 64 --tokens 128 --forwards 4 --window 2"
  MIG="--layers 2 --experts 8 --hidden 128 --expert-hidden 128 --tokens 64 --forwards 8 --interval 3"
  STEP_SET="--config configs/quickstart.json --set model.num_layers=2 --set sampling.batch_size=1"
  DIFF="--device cpu --dtype float32 --small --reps 2"; ITERS=3; GPU1=""
else
  DEV="--device cuda"; DT="--dtype bfloat16"
  SHAPE="--tokens 8192 --hidden 4096 --expert-hidden 3072 --experts 64 --top-k 8"
  RB_SHAPE="--layers 2 --experts 64 --top-k 8 --hidden 4096 --expert-hidden 3072 --tokens 8192 --forwards 16 --window 4"
  MIG="--layers 4 --experts 32 --hidden 4096 --expert-hidden 3072 --tokens 8192 --forwards 20 --interval 5"
  STEP_SET="--config configs/hunyuan_like.json --set sampling.batch_size=4"
  DIFF="--device cuda --dtype bfloat16 --reps 20"; ITERS=20; GPU1="CUDA_VISIBLE_DEVICES=0"
fi
two() { $DS --num_gpus 2 --master_port $((29500 + RANDOM % 1000)) "$@"; }
one() { env $GPU1 $PY "$@"; }
show() { grep -E "$2" "$1" | cut -c1-400; }
run_part() {
  case $1 in
  layer)
    for skew in 0 1.2; do
      two launch/bench.py layer $DEV $DT $SHAPE --iters $ITERS --skew $skew --json "$out/ep2_layer_skew$skew.json" \
        > "$out/ep2_layer_skew$skew.log" 2>&1; echo "ep2 layer skew=$skew rc=$?"; show "$out/ep2_layer_skew$skew.log" "^(system|moe-ep|DeepSpeed)"
      one launch/bench.py layer $DEV $DT $SHAPE --iters $ITERS --skew $skew --skip-deepspeed \
        --json "$out/ep1_layer_skew$skew.json" > "$out/ep1_layer_skew$skew.log" 2>&1
      echo "ep1 layer skew=$skew rc=$?"; show "$out/ep1_layer_skew$skew.log" "^(system|moe-ep|DeepSpeed)"
    done;;
  skew)
    two launch/bench_rebalance.py $DEV $DT $RB_SHAPE --redundant 8 --skew 1.2 --modes none-R=E,none-R=E+r,online \
      --json "$out/ep2_skew.json" > "$out/ep2_skew.log" 2>&1; echo "ep2 skew rc=$?"; show "$out/ep2_skew.log" "^\{"
    two launch/bench_rebalance.py $DEV $DT $RB_SHAPE --redundant 8 --skew 0 --modes none-R=E \
      --json "$out/ep2_uniform.json" > "$out/ep2_uniform.log" 2>&1; echo "ep2 uniform rc=$?"; show "$out/ep2_uniform.log" "^\{";;
  migration)
    two launch/bench_migration.py $DEV $DT $MIG --json "$out/ep2_migration.json" > "$out/ep2_migration.log" 2>&1
    echo "ep2 migration rc=$?"; show "$out/ep2_migration.log" "^\{";;
  step)
    two launch/bench.py step $STEP_SET --set telemetry.wandb=false --steps 5 --json "$out/ep2_step.json" \
      > "$out/ep2_step.log" 2>&1; echo "ep2 step rc=$?"; show "$out/ep2_step.log" "step_ms_median"
    one launch/bench.py step $STEP_SET --set telemetry.wandb=false --steps 5 --json "$out/ep1_step.json" \
      > "$out/ep1_step.log" 2>&1; echo "ep1 step rc=$?"; show "$out/ep1_step.log" "step_ms_median";;
  diffusers)
    two launch/bench_diffusers.py $DIFF --out "$out/ep2_diffusers.json" > "$out/ep2_diffusers.log" 2>&1
    echo "ep2 diffusers rc=$?"; tail -12 "$out/ep2_diffusers.log" | cut -c1-300;;
  simulate)
    $PY -m eplb simulate --check > "$out/simulate_check.log" 2>&1; echo "simulate rc=$?"; show "$out/simulate_check.log" "^check";;
  *) echo "unknown part $1 (layer, skew, migration, step, diffusers, simulate, all)"; return 2;;
  esac
}
if [ "$part" = all ]; then
  for p in layer skew migration step diffusers simulate; do run_part $p; done
else
  run_part "$part"
fi
