#!/usr/bin/env bash
# One GPU session, under 10 minutes (the parts' timeouts add up to 560 s; one device call
# may run 600 s): is the compiled meta-step (engine.compile) faster than eager
# vmap, and how far is each from the arithmetic lower bound? Omniglot 5-way 1-shot, Conv4-64,
# B=32, 5 inner steps, second order. Writes to $OUT (default: ./gpu-session-out):
#   time.json / time.log      ms/step of vmap, vmap:compile (inductor), vmap:cudagraph
#                             (mode=reduce-overhead: CUDA graph), FLOPs per step and the lower
#                             bound FLOPs / PEAK_TFLOPS (default 495: H100/H200 dense TF32,
#                             which cuDNN's convolutions use by default; 67 for plain FP32)
#   memory_vmap.json, memory_compile.json   peak memory for 1/5/10/20 inner steps
#   overhead.json             Lightning step / bare step for the CUDA-graph step (<= 1.05)
# Each part has its own timeout, so a slow compile loses that part only. Needs the project's
# Python environment (torch with CUDA, the repo's requirements); real episodes if
# $METALEARN_DATA_DIR/omniglot exists, otherwise random ones (--synthetic: same shapes).
# The device tool copies the working tree only: for real episodes (and for part 3, which runs
# the Lightning loop on them) copy the Omniglot files there first, about 12 MB:
#   mkdir -p gpu-data && cp -r ../shared/data/omniglot gpu-data/   # gpu-data/ is git-ignored
# then run with carry=["gpu-data"] and METALEARN_DATA_DIR=gpu-data.
# Written on a CPU-only machine: not run yet (the compiled CUDA-graph path is untested).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
PEAK=${PEAK_TFLOPS:-495}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DATA=""
[ -d "${METALEARN_DATA_DIR:-/nonexistent}/omniglot" ] || DATA="--synthetic"
COMMON="--device cuda --settings omniglot --meta-batch 0 --orders second --overhead-engines ''"
COMMON="$COMMON --no-data $DATA --json"
{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
} > "$OUT/machine.txt" 2>&1

# 1. ms/step, FLOPs and the lower bound (compiling takes the warm-up steps)
eval timeout 220 python bench/meta_step.py $COMMON --steps 10 --warmup 2 \
    --engines vmap,vmap:compile,vmap:cudagraph --memory-engines "''" \
    --flops --peak-tflops "$PEAK" > "$OUT/time.json" 2> "$OUT/time.log"
echo "time: exit $?" >> "$OUT/status.txt"

# 2. peak memory of one meta-step (max_memory_allocated after a warm-up step)
eval timeout 40 python bench/meta_step.py $COMMON --engines "''" --memory-engines vmap \
    --memory-steps 1,5,10,20 > "$OUT/memory_vmap.json" 2> "$OUT/memory_vmap.log"
echo "memory vmap: exit $?" >> "$OUT/status.txt"
eval timeout 100 python bench/meta_step.py $COMMON --engines "''" \
    --memory-engines vmap:compile --memory-steps 1,5,10,20 \
    > "$OUT/memory_compile.json" 2> "$OUT/memory_compile.log"
echo "memory compile: exit $?" >> "$OUT/status.txt"
# 3. framework overhead of the compiled step: Lightning step / bare step (target <= 1.05)
eval timeout 140 python bench/meta_step.py --device cuda --settings omniglot --meta-batch 0 \
    --no-data $DATA --json --engines "''" --memory-engines "''" --overhead-orders second \
    --overhead-engines vmap:cudagraph --steps 10 --warmup 2 \
    > "$OUT/overhead.json" 2> "$OUT/overhead.log"
echo "overhead: exit $?" >> "$OUT/status.txt"
# 4. episodes/s the data modules produce against a real fit's consumption, on the GPU
if [ -z "$DATA" ]; then
    timeout 60 python bench/data_rate.py --device cuda --datasets omniglot,miniimagenet \
        --batches 30 --steps 5 --json "$OUT/data_rate.json" > "$OUT/data_rate.log" 2>&1
    echo "data rate: exit $?" >> "$OUT/status.txt"
fi
tail -n 30 "$OUT"/*.log
