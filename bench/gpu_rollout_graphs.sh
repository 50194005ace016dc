#!/usr/bin/env bash
# Rollout engine on the H200 with CUDA-graph decode (device tool):
#   OUT=... bash bench/gpu_rollout_graphs.sh
set -u
OUT=${OUT:-bench/results/raw}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests_graphs.txt"
python3 bench/rollout_throughput.py --config tiny --device cuda --dtype float32 --cuda-graphs > "$OUT/rollout_tiny_cuda_graphs.json" 2> "$OUT/rollout_tiny_cuda_graphs.err"; tail -c 900 "$OUT/rollout_tiny_cuda_graphs.json"; tail -3 "$OUT/rollout_tiny_cuda_graphs.err"
python3 bench/rollout_throughput.py --config large --device cuda --dtype bfloat16 --new-tokens 64 --repeats 3 --batches 64,256 --cuda-graphs > "$OUT/rollout_large_cuda_graphs.json" 2> "$OUT/rollout_large_cuda_graphs.err"; tail -c 900 "$OUT/rollout_large_cuda_graphs.json"; tail -3 "$OUT/rollout_large_cuda_graphs.err"
