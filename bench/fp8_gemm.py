"""FP8 (block-scaled e4m3) vs bf16 on MoE-like linear shapes: GEMM alone and linear fwd+bwd.

Prints ONE JSON object. Per shape (tokens x hidden x ffn): bf16 `F.linear` forward+backward vs
`fp8_linear` forward+backward (quantization included), and the forward GEMM alone
(cuBLAS block-scaled `_scaled_mm` on pre-quantized operands vs bf16 mm), as ms, TFLOP/s and ratios.

    python bench/fp8_gemm.py --device cuda
    python bench/fp8_gemm.py --device cpu --quick      # tiny shapes, emulation (correctness only)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from miles_lib.precision import fp8

SHAPES = [(8192, 2048, 768), (16384, 4096, 1536), (32768, 7168, 2048)]
QUICK = [(256, 256, 128)]


def timeit(fn, device, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = args.device
    out = {"bench": "fp8_gemm", "device": dev, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
           "cublas_blockwise": fp8.gpu_blockwise_available(dev) if dev == "cuda" else False, "shapes": []}
    for M, K, N in (QUICK if args.quick else SHAPES):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16).requires_grad_()
        w = (torch.randn(N, K, generator=g) * 0.02).to(dev, torch.bfloat16).requires_grad_()
        dy = torch.randn(M, N, generator=g).to(dev, torch.bfloat16)
        flops_fb = 3 * 2 * M * N * K

        def bf16_fb():
            F.linear(x, w).backward(dy)

        def fp8_fb():
            fp8.fp8_linear(x, w).backward(dy)

        t_bf16 = timeit(bf16_fb, dev)
        t_fp8 = timeit(fp8_fb, dev)
        qx, sx = fp8.quantize_act_1x128(x.detach())
        qw, sw = fp8.quantize_weight_128x128(w.detach())
        t_mm_bf16 = timeit(lambda: x.detach() @ w.detach().T, dev)
        t_mm_fp8 = timeit(lambda: fp8.fp8_gemm(qx, sx, qw, sw, out_dtype=torch.bfloat16), dev)
        t_quant = timeit(lambda: fp8.quantize_act_1x128(x.detach()), dev)
        ref = fp8.fp8_matmul_reference(qx, sx, qw, sw)
        err = ((fp8.fp8_gemm(qx, sx, qw, sw).float() - ref).norm() / ref.norm()).item()
        out["shapes"].append({
            "tokens": M, "hidden": K, "ffn": N,
            "fwd_bwd_ms": {"bf16": round(t_bf16, 3), "fp8": round(t_fp8, 3)},
            "fwd_bwd_ratio_fp8_over_bf16_speed": round(t_bf16 / t_fp8, 3),
            "gemm_ms": {"bf16": round(t_mm_bf16, 3), "fp8_scaled_mm": round(t_mm_fp8, 3)},
            "gemm_tflops": {"bf16": round(2 * M * N * K / t_mm_bf16 / 1e9, 1),
                            "fp8": round(2 * M * N * K / t_mm_fp8 / 1e9, 1)},
            "gemm_ratio_fp8_over_bf16_speed": round(t_mm_bf16 / t_mm_fp8, 3),
            "act_quantize_ms": round(t_quant, 3),
            "fwd_bwd_tflops_bf16": round(flops_fb / t_bf16 / 1e9, 1),
            "gemm_rel_err_vs_dequant_reference": err,
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
