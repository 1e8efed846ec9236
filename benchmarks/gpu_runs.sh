#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md, one named part per call. Each part prints its lines and
# writes its logs and JSON to ${OUT:-.}/; a part fits one device call (about 3-6 minutes).
#
# One GPU (EP = 1; the anchor layer: 8192 tokens, 64 experts, top-8, hidden 4096 / 3072, bf16):
#   bash benchmarks/gpu_runs.sh checks      # benchmarks/gpu_check.py: every experts backend in bf16 vs
#                                           #   float64, phase times, the layer in a CUDA graph (section 1d)
#   bash benchmarks/gpu_runs.sh layer       # moe-ep vs DeepSpeed-MoE, random and Zipf 1.2 gates (1b, 1d)
#   bash benchmarks/gpu_runs.sh shapes      # the layer at the anchor and HiDream-I1 shapes: eager / queued /
#                                           #   CUDA graph, DeepSpeed-MoE, a dense mm of the same FLOPs (issue 31)
#   bash benchmarks/gpu_runs.sh gemm-variants  # gate/up and down GEMM configurations at those shapes, torch._grouped_mm,
#                                           #   the row copy, the layer eager / queued / graph (issue 31 part 4)
#   bash benchmarks/gpu_runs.sh gemm-sweep  # every tile configuration of the two grouped GEMMs per (K, N) at those
#                                           #   shapes, with the row copy or gather as the layer pays it (<= 10 min)
#   bash benchmarks/gpu_runs.sh step        # hunyuan_like step, batch 4, eager vs CUDA graph,
#                                           #   model.compile off and on (1c, 1d)
#   bash benchmarks/gpu_runs.sh rebalance   # benchmarks/gpu_rebalance_check.py: forced rebalances,
#                                           #   injected faults, outputs bit-identical (1b)
#   bash benchmarks/gpu_runs.sh diffusers   # HiDream-I1 / NucleusMoE blocks, moe-ep vs diffusers (docs/diffusers.md)
#   bash benchmarks/gpu_runs.sh ep1         # checks, layer and step in order
#   bash benchmarks/gpu_runs.sh graph-stats # benchmarks/gpu_graph_check.py: the CUDA-graph forward with expert-load
#                                           #   statistics and forced rebalancing vs eager on tiny NucleusMoE, HiDream
#                                           #   (expert_parallel(pipe, cuda_graph=True)) and the built-in model
#                                           #   (model.cuda_graph): outputs and statistics identical, recapture (< 2 min)
#   bash benchmarks/gpu_runs.sh whole       # issue 31: the anchor layer with model.moe.batch_invariant off / on
#                                           #   (1h); NucleusMoE-Image and HiDream-I1 whole transformers,
#                                           #   diffusers vs moe-ep eager / compiled / batch-invariant (1g)
#   bash benchmarks/gpu_runs.sh demo-sweep BUDGET_S "name|train args" ["name|train args" ...]
#                                           # train several demo-model recipes at once on one GPU (each
#                                           #   run is launch-bound, so they share it well), then score each
#                                           #   one's prompt adherence (moe_ep/demo/adherence.py, 64 prompts);
#                                           #   logs, checkpoints, grids in ${OUT}/<name>/ (docs/quickstart.md;
#                                           #   fine-tuning variants: put --init-from CHECKPOINT in the train args)
# Two GPUs (EP = 2 over NCCL, issue 14; section 1e):
#   bash benchmarks/gpu_runs.sh ep2-layer       # moe-ep (send once per rank + own rows during the exchange,
#                                               #   exchange then compute, one row per copy) vs DeepSpeed-MoE,
#                                               #   random and Zipf 1.2 gates; the same layer on one GPU
#   bash benchmarks/gpu_runs.sh ep2-skew        # Zipf 1.2: no redundant slots / 8 redundant, no rebalancing /
#                                               #   online rebalancing; the uniform gate beside it
#   bash benchmarks/gpu_runs.sh ep2-migration   # sync vs async moves of 75 MB experts: P2P rate, stall
#   bash benchmarks/gpu_runs.sh ep2-step        # hunyuan_like step at EP = 2 vs EP = 1 on one GPU
#   bash benchmarks/gpu_runs.sh ep2-diffusers   # HiDream-I1 / NucleusMoE layers at EP = 2 vs diffusers on one GPU
#   bash benchmarks/gpu_runs.sh simulate        # the simulator's 1- and 2-GPU check (no GPU needed)
#   bash benchmarks/gpu_runs.sh ep2             # the six above in order
# One image over several GPUs (issue 30; benchmarks/bench_layout.py, one forward of one prompt with
# guidance, interleaved with the same forward on one GPU; docs/benchmarks.md):
#   bash benchmarks/gpu_runs.sh sp2             # 2 GPUs: Ulysses 2 and ring 2 vs 1 GPU
#   bash benchmarks/gpu_runs.sh cfg2            # 2 GPUs: cfg 2 vs 1 GPU
#   bash benchmarks/gpu_runs.sh usp4            # 4 GPUs: Ulysses 4, Ulysses 2 x ring 2, cfg 2 x Ulysses 2 vs 1 GPU
#
# REHEARSE=1 runs the ep2-* parts and simulate (and layer, and graph-stats with a stand-in graph
# backend) on CPU ranks (gloo) at tiny sizes: the
# same scripts and flags, so the plumbing is known to work before a GPU machine is held (ep2: about
# 2 minutes on 2 cores).
# The kernel probes of issue 13 (kernel variants, power, QuACK, profile) were one-off scripts; their
# figures and the commits that hold them are in docs/benchmarks.md.
set -u
part=${1:-}; shift || true
mkdir -p "${OUT:-.}" && out=$(realpath "${OUT:-.}")
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
venv=$([ -x .venv/bin/python ] && echo .venv/bin/ || true)     # the README's venv when there is one
PY=${PYTHON:-${venv}python3}; DS=${DEEPSPEED:-${venv}deepspeed}
if [ "${REHEARSE:-0}" = 1 ]; then
  DEV="--device cpu"; DT="--dtype float32"
  SHAPE="--tokens 256 --hidden 128 --expert-hidden 96 --experts 16 --top-k 4"
  RB_SHAPE="--layers 2 --experts 16 --top-k 4 --hidden 64 --expert-hidden 64 --tokens 128 --forwards 4 --window 2"
  MIG="--layers 2 --experts 8 --hidden 128 --expert-hidden 128 --tokens 64 --forwards 8 --interval 3"
  STEP_SET="--config configs/quickstart.json --set model.num_layers=2 --set sampling.batch_size=1"
  DIFF="--device cpu --dtype float32 --small --reps 2"; ITERS=3; GPU1=""
  LAYOUT="--device cpu --dtype float32 --threads 1 --latent 16 --hidden 64 --heads 4 --layers 2 --reps 3"
  WHOLE="--device cpu --small --reps 2 --warmup 1"
else
  DEV="--device cuda"; DT="--dtype bfloat16"
  SHAPE="--tokens 8192 --hidden 4096 --expert-hidden 3072 --experts 64 --top-k 8"
  RB_SHAPE="--layers 2 --experts 64 --top-k 8 --hidden 4096 --expert-hidden 3072 --tokens 8192 --forwards 16 --window 4"
  MIG="--layers 4 --experts 32 --hidden 4096 --expert-hidden 3072 --tokens 8192 --forwards 20 --interval 5"
  STEP_SET="--config configs/hunyuan_like.json --set sampling.batch_size=4"
  DIFF="--device cuda --dtype bfloat16 --reps 20"; ITERS=20; GPU1="CUDA_VISIBLE_DEVICES=0"
  # 128 x 128 latents (4096 tokens, a 1024 px image at VAE factor 8), hidden 2048, 16 heads, 64 experts top-8
  LAYOUT="--device cuda --dtype bfloat16 --latent 128 --hidden 2048 --heads 16 --layers 8 --experts 64 --top-k 8 \
    --expert-hidden 1024 --text-tokens 128 --reps 20 --warmup 3"
  WHOLE="--device cuda"
fi
PARTS="checks, layer, shapes, gemm-variants, gemm-sweep, step, graph-stats, rebalance, diffusers, ep1, whole, demo-sweep, ep2-layer, ep2-skew, ep2-migration, ep2-step, ep2-diffusers, simulate, ep2, sp2, cfg2, usp4"
two() { $DS --num_gpus 2 --master_port $((29500 + RANDOM % 1000)) "$@"; }
one() { env $GPU1 $PY "$@"; }
show() { grep -E "$2" "$1" | cut -c1-400; }

demo_sweep() {  # BUDGET_S "name|train args" ...
  local budget=$1; shift
  for spec in "$@"; do
    local name=${spec%%|*} args=${spec#*|}
    mkdir -p "$out/$name"
    $PY launch/train.py --config configs/quickstart.json --out "$out/$name" --time-budget-s "$budget" \
      --log-every 500 $args > "$out/$name/train.log" 2>&1 &
  done
  wait
  # Scoring samples through diffusers' scheduler; where the GPU image lacks diffusers, score the
  # checkpoints on the CPU instead (python -m moe_ep.demo.adherence --set model.checkpoint=...).
  local score=1
  $PY -c "import diffusers" 2>/dev/null || { echo "no diffusers here: not scoring"; score=0; }
  for spec in "$@"; do
    local name=${spec%%|*} args=${spec#*|}
    [ "$score" = 0 ] && { tail -2 "$out/$name/train.log" | cut -c1-300; continue; }
    local qk
    qk=$(echo "$args" | grep -o 'model.qk_norm=[a-z]*' || echo model.qk_norm=false)
    tail -2 "$out/$name/train.log" | cut -c1-300
    for steps in 12 24; do
      echo "$name steps=$steps $($PY -m moe_ep.demo.adherence --device cuda --prompts 64 \
        --set model.checkpoint="$out/$name/shapes_demo.safetensors" $qk sampling.num_inference_steps=$steps \
        --grid "$out/$name/grid_$steps.png" 2>&1 | tail -1)"
    done
  done
}

run_part() {
  case $1 in
  checks)
    timeout 200 $PY benchmarks/gpu_check.py > "$out/check.log" 2>&1
    echo "check rc=$?"; grep -vE '^ |^\{|^\}' "$out/check.log" | tail -24 | cut -c1-200;;
  layer)
    for skew in 0 1.2; do
      timeout 200 $PY benchmarks/bench.py layer $DEV $DT $SHAPE --iters $ITERS --skew $skew \
        --json "$out/layer_skew$skew.json" > "$out/layer_skew$skew.log" 2>&1
      echo "layer skew=$skew rc=$?"; tail -6 "$out/layer_skew$skew.log" | cut -c1-200
    done;;
  shapes)
    # issue 31 part 4: the layer at the anchor shape (random and Zipf 1.2 gates) and at HiDream-I1's
    # routed experts (4 experts, top-2, 2560 / 6912, no renormalisation) at 4096 / 8192 / 16384 tokens;
    # eager, queued and CUDA-graph rows, DeepSpeed-MoE, and a dense mm of the same FLOPs in the same run
    # (DeepSpeed-MoE's top-2 gate always renormalises: at HiDream's shapes its row has the same FLOPs,
    # not the same output)
    HD="--hidden 2560 --expert-hidden 6912 --experts 4 --top-k 2 --no-renormalize"; T="4096 8192 16384"
    [ "${REHEARSE:-0}" = 1 ] && HD="--hidden 64 --expert-hidden 96 --experts 4 --top-k 2 --no-renormalize" T="128 256 512"
    set -- $T
    for spec in "anchor|$SHAPE|0" "anchor-zipf|$SHAPE|1.2" "hidream-4k|$HD --tokens $1|0" \
                "hidream-8k|$HD --tokens $2|0" "hidream-16k|$HD --tokens $3|0"; do
      IFS='|' read -r name shape skew <<< "$spec"
      timeout 150 $PY benchmarks/bench.py layer $DEV $DT $shape --iters $ITERS --skew $skew \
        --json "$out/shapes_$name.json" > "$out/shapes_$name.log" 2>&1
      echo "shapes $name rc=$?"; show "$out/shapes_$name.log" "^(system|moe-ep|DeepSpeed|dense)"
    done;;
  gemm-variants)   # grouped-GEMM configurations at the shapes above (benchmarks/gemm_variants.py; GPU only)
    OUT=$out timeout 300 $PY benchmarks/gemm_variants.py > "$out/gemm_variants.log" 2>&1
    echo "gemm-variants rc=$?"; cut -c1-600 "$out/gemm_variants.log" | tail -8;;
  gemm-sweep)      # every tile configuration per (K, N) at the anchor and HiDream-I1 shapes (benchmarks/gemm_sweep.py)
    for fam in anchor hidream; do
      OUT=$out timeout 280 $PY benchmarks/gemm_sweep.py $fam > "$out/gemm_sweep_$fam.log" 2>&1
      echo "gemm-sweep $fam rc=$?"; grep -vE "failed:" "$out/gemm_sweep_$fam.log" | cut -c1-200 | tail -40
    done;;
  step)
    for c in false true; do
      timeout 240 $PY benchmarks/bench.py step $STEP_SET --set telemetry.wandb=false --set model.compile=$c \
        --steps 5 --cuda-graph --json "$out/step_compile_$c.json" > "$out/step_compile_$c.log" 2>&1
      echo "step compile=$c rc=$?"; grep step_ms_median "$out/step_compile_$c.log" | cut -c1-900
    done;;
  graph-stats)
    timeout 150 $PY benchmarks/gpu_graph_check.py $DEV > "$out/graph_stats_check.log" 2>&1
    echo "graph-stats check rc=$?"; show "$out/graph_stats_check.log" "^(PASS|FAIL|Traceback|[A-Za-z]*Error)";;
  rebalance)
    timeout 300 $PY benchmarks/gpu_rebalance_check.py > "$out/rebalance_check.log" 2>&1
    echo "rebalance check rc=$?"; tail -12 "$out/rebalance_check.log" | cut -c1-300;;
  diffusers)
    one benchmarks/bench_diffusers.py $DIFF --out "$out/diffusers.json" > "$out/diffusers.log" 2>&1
    echo "diffusers rc=$?"; tail -12 "$out/diffusers.log" | cut -c1-300;;
  ep1)
    for p in checks layer step; do run_part $p; done;;
  whole)   # timeouts sum to 500 s: one device call; each JSON is written row by row (a cut run keeps its rows)
    timeout 100 $PY benchmarks/bench.py layer $DEV $DT $SHAPE --iters $ITERS --skip-deepspeed --batch-invariant-row yes \
      --json "$out/layer_batch_invariant.json" > "$out/layer_batch_invariant.log" 2>&1
    echo "layer batch-invariant rc=$?"; show "$out/layer_batch_invariant.log" "^(system|moe-ep)"
    timeout 260 $PY benchmarks/bench_diffusers.py --whole --model nucleus $WHOLE --accuracy-layers 8 \
      --options compile,batch_invariant --budget-s 200 --out "$out/whole_nucleus.json" > "$out/whole_nucleus.log" 2>&1
    echo "whole nucleus rc=$?"; show "$out/whole_nucleus.log" "^(variant|diffusers|moe-ep|accuracy|Traceback|[A-Za-z]*Error)"
    timeout 140 $PY benchmarks/bench_diffusers.py --whole --model hidream $WHOLE --no-accuracy \
      --options compile,batch_invariant --budget-s 110 --out "$out/whole_hidream.json" > "$out/whole_hidream.log" 2>&1
    echo "whole hidream rc=$?"; show "$out/whole_hidream.log" "^(variant|diffusers|moe-ep|Traceback|[A-Za-z]*Error)";;
  demo-sweep)
    shift; [ $# -ge 2 ] || { echo "demo-sweep needs BUDGET_S and at least one \"name|train args\""; return 2; }
    demo_sweep "$@";;
  ep2-layer)
    for skew in 0 1.2; do
      two benchmarks/bench.py layer $DEV $DT $SHAPE --iters $ITERS --skew $skew --json "$out/ep2_layer_skew$skew.json" \
        > "$out/ep2_layer_skew$skew.log" 2>&1; echo "ep2 layer skew=$skew rc=$?"; show "$out/ep2_layer_skew$skew.log" "^(system|moe-ep|DeepSpeed)"
      one benchmarks/bench.py layer $DEV $DT $SHAPE --iters $ITERS --skew $skew --skip-deepspeed \
        --json "$out/ep1_layer_skew$skew.json" > "$out/ep1_layer_skew$skew.log" 2>&1
      echo "ep1 layer skew=$skew rc=$?"; show "$out/ep1_layer_skew$skew.log" "^(system|moe-ep|DeepSpeed)"
    done;;
  ep2-skew)
    two benchmarks/bench_rebalance.py $DEV $DT $RB_SHAPE --redundant 8 --skew 1.2 --modes none-R=E,none-R=E+r,online \
      --json "$out/ep2_skew.json" > "$out/ep2_skew.log" 2>&1; echo "ep2 skew rc=$?"; show "$out/ep2_skew.log" "^\{"
    two benchmarks/bench_rebalance.py $DEV $DT $RB_SHAPE --redundant 8 --skew 0 --modes none-R=E \
      --json "$out/ep2_uniform.json" > "$out/ep2_uniform.log" 2>&1; echo "ep2 uniform rc=$?"; show "$out/ep2_uniform.log" "^\{";;
  ep2-migration)
    two benchmarks/bench_migration.py $DEV $DT $MIG --json "$out/ep2_migration.json" > "$out/ep2_migration.log" 2>&1
    echo "ep2 migration rc=$?"; show "$out/ep2_migration.log" "^\{";;
  ep2-step)
    two benchmarks/bench.py step $STEP_SET --set telemetry.wandb=false --steps 5 --json "$out/ep2_step.json" \
      > "$out/ep2_step.log" 2>&1; echo "ep2 step rc=$?"; show "$out/ep2_step.log" "step_ms_median"
    one benchmarks/bench.py step $STEP_SET --set telemetry.wandb=false --steps 5 --json "$out/ep1_step.json" \
      > "$out/ep1_step.log" 2>&1; echo "ep1 step rc=$?"; show "$out/ep1_step.log" "step_ms_median";;
  ep2-diffusers)
    two benchmarks/bench_diffusers.py $DIFF --out "$out/ep2_diffusers.json" > "$out/ep2_diffusers.log" 2>&1
    echo "ep2 diffusers rc=$?"; tail -12 "$out/ep2_diffusers.log" | cut -c1-300;;
  simulate)
    $PY -m eplb simulate --check > "$out/simulate_check.log" 2>&1; echo "simulate rc=$?"; show "$out/simulate_check.log" "^check";;
  ep2)
    for p in ep2-layer ep2-skew ep2-migration ep2-step ep2-diffusers simulate; do run_part $p; done;;
  sp2|cfg2|usp4)
    local n layouts
    case $1 in sp2) n=2 layouts=ulysses2,ring2;; cfg2) n=2 layouts=cfg2;; usp4) n=4 layouts=ulysses4,usp4,cfg2ulysses2;; esac
    $DS --num_gpus $n --master_port $((29500 + RANDOM % 1000)) benchmarks/bench_layout.py $LAYOUT --layouts $layouts \
      --json "$out/layout_$1.json" > "$out/layout_$1.log" 2>&1
    echo "layout $1 rc=$?"; show "$out/layout_$1.log" "^\{";;
  *) echo "unknown part ${1:-(none)} ($PARTS)"; return 2;;
  esac
}
run_part "$part" "$@"
