"""Where the time of one FP8 linear training step goes (CUDA only); prints ONE JSON object.

    python3 bench/fp8_trace.py [--shapes 32768x7168x2048,16384x4096x1536] [--grouped 128x256x4096x1536,...]

Per (tokens x hidden x ffn) shape and per path (bf16 ``F.linear``, ``fp8_linear`` in each recipe of
bench/fp8_gemm.py RECIPES): one
forward+backward step (the weight touched in place first, as an optimizer step does) traced with
torch.profiler over 5 steps, after warm-up. Reported per step:
  kernels[]      every GPU kernel / memcpy / memset: name (truncated), calls, microseconds
  gpu_busy_us    sum of the kernel times
  gpu_span_us    first kernel start to last kernel end (busy + the gaps the host leaves)
  host_issue_us  wall time to issue one step while the GPU is held busy by a sleep kernel (the
                 Python + launch cost; when it exceeds gpu_busy_us the step is host-bound)
  wall_us        step time, synchronized, mean of 20
  gemm_host_us   host time of one fprop GEMM call per cuBLAS entry point that accepts the recipe
  host_top[]     (fp8) the Python functions with the most own time per step (cProfile over 20 steps
                 issued while the GPU is held busy): where the host time goes
``--grouped`` (E experts x T tokens each x hidden x ffn, uneven experts as in bench/fp8_gemm.py):
the same trace of the MoE expert projection's step, bf16 ``torch._grouped_mm`` vs
``fp8_grouped_linear`` (fp32 and power-of-two scales), with the expert weights touched every step
and with them cached (``*_weights_cached``: quantized once per optimizer step), each kernel
classified (``by_kind``: grouped GEMM, quantization, other).
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
import torch.nn.functional as F
from fp8_gemm import (  # bench/ sibling: the FP8 bench's micro-step and recipes
    RECIPES,
    bf16_grouped,
    fwd_bwd,
    own_copy,
    uneven_offsets,
)

from miles_lib.precision.fp8_linear import fp8_grouped_linear, fp8_linear


def make_step(path: str, M: int, K: int, N: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = (lambda: F.linear(x, w)) if path == "bf16" else (lambda: fp8_linear(x, w, **RECIPES[path]))
    return fwd_bwd(fn, (x, w), dy, w)


def make_grouped_step(path: str, E: int, T: int, K: int, N: int, touch: bool):
    """The expert projection's training micro-step (bench/fp8_gemm.py's uneven experts)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    offs = uneven_offsets(E, T, "cuda")
    x = torch.randn(E * T, K, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.nn.Parameter(torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
    w = w if touch else own_copy(w)
    dy = torch.randn(E * T, N, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = ((lambda: bf16_grouped(x, w, offs)) if path == "bf16" else
          (lambda: fp8_grouped_linear(x, w, offs, pow2_scales=path == "fp8_pow2")))
    return fwd_bwd(fn, (x, w), dy, w, touch)


def kernel_kind(name: str) -> str:
    """A kernel's role in the step, from its name."""
    n = name.lower()
    if "quant" in n:
        return "quantization"
    if "grouped" in n or "gemm" in n or "wgrad" in n or "_mm" in n or "cutlass" in n or "sm90" in n:
        return "gemm"
    return "other"


def by_kind(kernels: list[dict]) -> dict:
    out = collections.Counter()
    for k in kernels:
        out[kernel_kind(k["name"])] += k["us"]
    return {k: round(v, 1) for k, v in out.items()}


def trace(step, steps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])
    spans = []
    for ev in p.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        per[ev.name[:90]][0] += 1
        per[ev.name[:90]][1] += ev.device_time_total
        spans.append((ev.time_range.start, ev.time_range.end))
    busy = sum(v[1] for v in per.values()) / steps
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) / steps if spans else 0.0
    kernels = sorted(({"name": k, "calls": v[0] / steps, "us": round(v[1] / steps, 1)} for k, v in per.items()),
                     key=lambda r: -r["us"])
    return {"kernels": kernels, "gpu_busy_us": round(busy, 1), "gpu_span_us": round(span, 1)}


def host_issue_us(step, reps: int = 10) -> float:
    step()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        torch.cuda._sleep(200_000_000)  # keeps the GPU busy (~0.1 s) so no launch waits on it
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
        torch.cuda.synchronize()
    return round(best * 1e6, 1)


def host_top(step, steps: int = 20, top: int = 25) -> list[dict]:
    import cProfile
    import pstats
    step()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # (file, line, func) -> (calls, prim calls, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"fn": f"{k[0].rsplit('/', 1)[-1]}:{k[1]}:{k[2]}", "calls": v[0] / steps,
             "own_us": round(v[2] / steps * 1e6, 1), "cum_us": round(v[3] / steps * 1e6, 1)} for k, v in rows]


def gemm_host_us(M: int, K: int, N: int) -> dict:
    """Host time of the fprop GEMM by each working entry point (the GPU held busy meanwhile)."""
    from miles_lib.precision import fp8, fp8_gemm
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    qx, sx = fp8.quantize_act_1x128(x)
    qw, sw = fp8.quantize_weight_128x128(w)
    out = {}
    for api in fp8_gemm._apis():
        for i in range(fp8_gemm._NUM_CANDIDATES["b_blocks"]):
            how = (api, 0, i)
            try:
                fp8_gemm._cublas_mm(qx, sx, qw, sw, False, False, how, torch.bfloat16)
            except (RuntimeError, TypeError, ValueError):
                continue
            torch.cuda.synchronize()
            torch.cuda._sleep(500_000_000)
            t0 = time.perf_counter()
            for _ in range(20):
                fp8_gemm._cublas_mm(qx, sx, qw, sw, False, False, how, torch.bfloat16)
            out[f"{api}[{i}]"] = round((time.perf_counter() - t0) / 20 * 1e6, 1)
            torch.cuda.synchronize()
    return out


def wall_us(step, reps: int = 20) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / reps * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="32768x7168x2048,16384x4096x1536", help="linear shapes ('' for none)")
    ap.add_argument("--grouped", default="", help="expert shapes ExTxKxN,... (default: none)")
    args = ap.parse_args()
    out = {"bench": "fp8_trace", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": [],
           "grouped": []}
    for spec in filter(None, args.grouped.split(",")):
        E, T, K, N = (int(v) for v in spec.split("x"))
        row = {"experts": E, "tokens_per_expert": T, "hidden": K, "ffn": N}
        for touch in (True, False):
            for path in ("bf16", "fp8", "fp8_pow2"):
                t = trace(make_grouped_step(path, E, T, K, N, touch))
                row[path + ("" if touch else "_weights_cached")] = {**t, "by_kind": by_kind(t["kernels"])}
        out["grouped"].append(row)
    for spec in filter(None, args.shapes.split(",")):
        M, K, N = (int(v) for v in spec.split("x"))
        row = {"tokens": M, "hidden": K, "ffn": N, "gemm_host_us": gemm_host_us(M, K, N)}
        for path in ("bf16", *RECIPES):
            step = make_step(path, M, K, N)
            row[path] = {"wall_us": wall_us(step), "host_issue_us": host_issue_us(step), **trace(step)}
            if path == "fp8":
                row[path]["host_top"] = host_top(step)
        out["shapes"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
