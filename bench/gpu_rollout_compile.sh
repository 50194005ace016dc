#!/usr/bin/env bash
# Rollout throughput on the H200 with the compiled decode step and prefill forward, and with CUDA
# graphs (device tool):
#   OUT=... bash bench/gpu_rollout_compile.sh
set -u
OUT=${OUT:-bench/results/raw}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 bench/rollout_throughput.py --config tiny --device cuda --dtype float32 --compile --cuda-graphs > "$OUT/rollout_tiny_cuda_compile.json" 2> "$OUT/rollout_tiny_cuda_compile.err"; tail -c 900 "$OUT/rollout_tiny_cuda_compile.json"; tail -3 "$OUT/rollout_tiny_cuda_compile.err"
python3 bench/rollout_throughput.py --config large --device cuda --dtype bfloat16 --new-tokens 64 --repeats 2 --batches 64,256 --compile --cuda-graphs > "$OUT/rollout_large_cuda_compile.json" 2> "$OUT/rollout_large_cuda_compile.err"; tail -c 900 "$OUT/rollout_large_cuda_compile.json"; tail -3 "$OUT/rollout_large_cuda_compile.err"
