#!/usr/bin/env bash
# Everything that needs the H200, in one call (device tool):
#   bash bench/gpu_suite.sh        -> JSON/text results under $OUT (default bench/results/raw)
# Uses the machine's own python3 (torch 2.11, transformers); no install step.
set -u
OUT=${OUT:-bench/results/raw}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
# GPU tests (files that need only torch/transformers)
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py $(ls tests/test_precision_*.py tests/test_algorithms_cuda.py 2>/dev/null) 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
if [ "${SKIP_FP8:-0}" != 1 ]; then
  python3 bench/fp8_gemm.py --device cuda > "$OUT/fp8_gemm.json" 2> "$OUT/fp8_gemm.err"; tail -c 3000 "$OUT/fp8_gemm.json"; tail -5 "$OUT/fp8_gemm.err"
  python3 bench/fp8_trace.py > "$OUT/fp8_trace.json" 2> "$OUT/fp8_trace.err"; tail -c 300 "$OUT/fp8_trace.json"
  python3 bench/fp8_alignment.py --device cuda --dtype bfloat16 > "$OUT/fp8_alignment_cuda.json" 2> "$OUT/fp8_alignment_cuda.err"; cat "$OUT/fp8_alignment_cuda.json"; tail -5 "$OUT/fp8_alignment_cuda.err"
fi
if [ "${SKIP_ROLLOUT:-0}" != 1 ]; then
  python3 bench/rollout_throughput.py --config tiny --device cuda --dtype float32 > "$OUT/rollout_tiny_cuda.json" 2> "$OUT/rollout_tiny_cuda.err"; tail -c 600 "$OUT/rollout_tiny_cuda.json"
  python3 bench/rollout_throughput.py --config large --device cuda --dtype bfloat16 --new-tokens 64 --repeats 2 > "$OUT/rollout_large_cuda.json" 2> "$OUT/rollout_large_cuda.err"; tail -c 600 "$OUT/rollout_large_cuda.json"
  python3 bench/rollout_throughput.py --config large --device cuda --dtype bfloat16 --new-tokens 64 --repeats 2 --batches 256 > "$OUT/rollout_large_cuda_b256.json" 2> "$OUT/rollout_large_cuda_b256.err"; tail -c 600 "$OUT/rollout_large_cuda_b256.json"
fi
