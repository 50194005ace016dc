"""FP8 (block-scaled e4m3) vs bf16: linear forward+backward and grouped MoE experts.

Prints ONE JSON object:
  linear[]:  per (tokens x hidden -> ffn) shape, y = x W^T forward+backward (dx and dW), bf16
             ``F.linear`` vs ``fp8_linear`` in each of RECIPES (quantization included, cuBLAS
             block-scaled GEMMs; all alternate over ROUNDS rounds of `iters` steps, best round
             mean kept, and the median over rounds of the per-round speedup); the same steps
             captured as CUDA graphs and replayed in turn, step by step, timed by CUDA events
             (GPU time without launch gaps, both sides alike; median of the per-step speedups); ms,
             TFLOP/s (3 GEMMs = 6*M*N*K flops), speedup = bf16 ms / fp8 ms; the
             gradients' relative error vs fp32 per recipe; forward alone; breakdown of the FP8
             step (one GEMM, one 1x128 / 128x1 activation quantization).
  grouped[]: the MoE expert projection (E experts x tokens each, hidden -> ffn), forward+backward
             and forward, bf16 ``torch._grouped_mm`` (autograd) vs ``fp8_grouped_linear`` (the
             grouped block-scaled kernels: Gluon on sm90, else Triton; fp32 and power-of-two
             scales); eager rounds and, on CUDA, the CUDA-graph GPU time as for linear[]; the
             breakdown times each grouped GEMM on the operands the linear uses.
  shared[]:  linears that read one input (q/k/v with GQA, dense gate/up): bf16 one linear each and
             on a pre-stacked weight, FP8 one linear each and as one stacked linear
             (``fp8_linear_shared_input``, what the model runs); CUDA-graph GPU time, speedups vs
             both bf16 variants.
  *_weights_cached (CUDA): the graphed steps again without the weight touch, so FP8 reuses the
             weight's quantized blocks (gradient accumulation: one weight quantization per optimizer
             step, amortized over its micro-batches; this is the many-micro-batch limit).
  summary:   the speedup at the large linear shapes against the 1.4x target.
Also the relative error of each FP8 forward vs the bf16 one (e4m3 rounding, ~3-4%).

    python bench/fp8_gemm.py --device cuda [--sections linear,grouped,shared]
    python bench/fp8_gemm.py --device cpu --quick      # tiny shapes, emulation (checks it runs)

Per-kernel GPU time and host time of one step: bench/fp8_trace.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from miles_lib.precision import fp8, fp8_gemm
from miles_lib.precision.fp8_linear import (
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_shared_input,
)

LINEAR = [(8192, 2048, 768), (16384, 4096, 1536), (32768, 7168, 2048), (32768, 4096, 2048)]
GROUPED = [(64, 512, 2048, 768), (64, 512, 2048, 1536), (128, 256, 4096, 1536)]
QUICK_LINEAR = [(256, 256, 128)]
QUICK_GROUPED = [(4, 64, 256, 128)]
SHARED = [(32768, 4096, (4096, 1024, 1024)), (16384, 4096, (11008, 11008))]  # q/k/v (GQA), dense gate/up
QUICK_SHARED = [(256, 256, (256, 128, 128))]
LARGE = 16384  # tokens at or above this are "large shapes" for the target
ROUNDS = {"cuda": 7, "cpu": 1}  # forward+backward: bf16 and FP8 alternate over this many rounds
GRAPH_REPS = 40  # CUDA-graph replays per variant, interleaved step by step


def timeit(fn, device: str, iters: int, warmup: int = 3) -> float:
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


def alternating(fns: dict, device: str, iters: int, rounds: int) -> dict[str, list[float]]:
    """Per-round mean ms of each function; the functions take turns within a round, so a slow
    phase of the GPU (clocks, other tenants) hits all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timeit(fn, device, iters))
    return times


def speedups(times: dict[str, list[float]], base: str) -> dict:
    """Per variant: bf16-over-variant speedup from the best rounds, and the median over rounds of
    the per-round speedup (robust to one lucky round)."""
    return {k: {"best": round(min(times[base]) / min(v), 3),
                "median_of_rounds": round(statistics.median(b / t for b, t in zip(times[base], v)), 3)}
            for k, v in times.items() if k != base}


def interleaved_replays(replays: dict, reps: int) -> dict[str, list[float]]:
    """GPU ms of each replay measured with CUDA events, the variants taking turns step by step
    (so clock drift hits all alike): per variant the list over reps."""
    times = {k: [] for k in replays}
    for _ in range(reps):
        for k, replay in replays.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end))
    return times


def median_speedups(times: dict[str, list[float]], base: str) -> dict:
    """Per variant: bf16 median / variant median, and the median of the per-step speedups."""
    return {k: {"of_medians": round(statistics.median(times[base]) / statistics.median(v), 3),
                "median_of_steps": round(statistics.median(b / t for b, t in zip(times[base], v)), 3)}
            for k, v in times.items() if k != base}


def cuda_graphed(step):
    """The step captured as one CUDA graph (after warm-up on a side stream, as capture requires)
    and replayed: the GPU time of the same kernels without the host's launch cost or gaps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graphed_figures(steps: dict, suffix: str = "") -> dict:
    """The steps (bf16 among them) as CUDA graphs replayed in turn: median GPU ms of each and the
    speedups over bf16."""
    times = interleaved_replays({k: cuda_graphed(f) for k, f in steps.items()}, GRAPH_REPS)
    return {"fwd_bwd_gpu_ms_cuda_graphs" + suffix: {k: round(statistics.median(v), 3) for k, v in times.items()},
            "fwd_bwd_speedup_cuda_graphs" + suffix: median_speedups(times, "bf16")}


def own_copy(w: torch.nn.Parameter) -> torch.nn.Parameter:
    """A separate copy of w for one recipe's weights-cached step: recipes sharing one weight would
    evict each other's cached FP8 blocks, whose addresses a captured CUDA graph keeps using."""
    return torch.nn.Parameter(w.detach().clone())


def weights_cached_figures(make_steps) -> dict:
    """``graphed_figures`` of the steps built without the in-place weight touch: FP8 finds the
    weight's quantized blocks in its per-version cache, as every micro-batch after the first does
    under gradient accumulation (the weight is quantized once per optimizer step). The limit of many
    micro-batches per step; keys end in ``_weights_cached``."""
    return graphed_figures(make_steps(False), "_weights_cached")


def rel(a, b) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)


def fwd_bwd(fn, inputs, dy, weight, touch: bool = True):
    """One training micro-step. ``touch``: the weight is touched in place first (as an optimizer
    step does), so FP8 re-quantizes it every step (its per-version cache never hits): the
    conservative cost; the bf16 side pays the same in-place touch."""
    def step():
        for t in inputs:
            t.grad = None
        if touch:
            with torch.no_grad():
                weight.add_(0)
        fn().backward(dy)
    return step


RECIPES = {  # name -> fp8_linear keywords; "fp8" (fp32 scales, 128x1 dy tiles) is DeepSeek-V3's recipe
    "fp8": {},
    "fp8_pow2": {"pow2_scales": True},  # Transformer Engine's Float8BlockScaling default
    "fp8_pow2_dy128x128": {"pow2_scales": True, "wgrad_grad_blocks": "128x128"},
}


def bench_linear(M, K, N, dev, iters):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16).requires_grad_()
    w = torch.nn.Parameter((torch.randn(N, K, generator=g) * 0.02).to(dev, torch.bfloat16))
    dy = torch.randn(M, N, generator=g).to(dev, torch.bfloat16)

    def make_steps(touch: bool) -> dict:
        steps = {"bf16": fwd_bwd(lambda: F.linear(x, w), (x, w), dy, w, touch)}
        for name, kw in RECIPES.items():
            wr = w if touch else own_copy(w)
            steps[name] = fwd_bwd(lambda kw=kw, wr=wr: fp8_linear(x, wr, **kw), (x, wr), dy, wr, touch)
        return steps

    steps = make_steps(True)
    rounds = alternating(steps, dev, iters, ROUNDS[dev])
    t = {k: min(v) for k, v in rounds.items()}
    t_bf16, t_fp8 = t["bf16"], t["fp8"]
    graphed = {**graphed_figures(steps), **weights_cached_figures(make_steps)} if dev == "cuda" else {}
    xd, wd = x.detach(), w.detach()
    # gradient error vs fp32, for dy as drawn and for dy whose channels differ in scale by up to 10^4
    # (the 128x1 tiles of the wgrad already span 128 tokens; 128x128 dy blocks also span 128
    # channels, so a channel spread is where they lose precision: e4m3 keeps full precision over
    # ~4.5 decades below a block's amax). dw_channel_mean: mean over dW's rows of their relative error.
    channel_scale = torch.logspace(-4, 0, N, device=dev)[torch.randperm(N, generator=g).to(dev)]
    grad_err = {}
    for name, kw in RECIPES.items():
        for tag, d in (("", dy), ("_channel_scaled_dy", (dy.float() * channel_scale).bfloat16())):
            x.grad = w.grad = None
            fp8_linear(x, w, **kw).backward(d)
            dw_exact = d.float().T @ xd.float()
            grad_err.setdefault(name, {}).update({
                "dx" + tag: rel(x.grad, d.float() @ wd.float()), "dw" + tag: rel(w.grad, dw_exact),
                "dw_channel_mean" + tag: round(((w.grad.float() - dw_exact).norm(dim=1)
                                                / dw_exact.norm(dim=1)).mean().item(), 5)})
    with torch.no_grad():
        f_bf16 = timeit(lambda: F.linear(xd, wd), dev, iters)
        f_fp8 = timeit(lambda: fp8_linear(xd, wd), dev, iters)
        qx, sx = fp8.quantize_act_1x128(xd)
        (qw, sw), (qwt, swt) = fp8.quantize_weight_128x128(wd, with_transpose=True)  # as fp8_linear
        t_gemm = timeit(lambda: fp8_gemm.fp8_mm(qx, sx, qw, sw, torch.bfloat16), dev, iters)
        (qdy, sdy), (qdyt, sdyt) = fp8.quantize_act_dual(dy)
        t_dgrad = timeit(lambda: fp8_gemm.fp8_mm(qdy, sdy, qwt, swt, torch.bfloat16), dev, iters)
        qxt, sxt = fp8.quantize_act_128x1_t(xd)
        t_wgrad = timeit(lambda: fp8_gemm.fp8_mm(qdyt, sdyt, qxt, sxt, torch.bfloat16), dev, iters)
        _, (qdyb, sdyb) = fp8.quantize_act_dual(dy, True, "128x128")
        t_wgrad_b = timeit(lambda: fp8_gemm.fp8_mm(qxt, sxt, qdyb, sdyb, torch.bfloat16), dev, iters)
        t_q1 = timeit(lambda: fp8.quantize_act_1x128(xd), dev, iters)
        t_q2 = timeit(lambda: fp8.quantize_act_128x1_t(xd), dev, iters)
        t_qd = timeit(lambda: fp8.quantize_act_dual(xd), dev, iters)
        t_qd_p2 = timeit(lambda: fp8.quantize_act_dual(xd, True), dev, iters)
        t_qdy_p2b = timeit(lambda: fp8.quantize_act_dual(dy, True, "128x128"), dev, iters)
        t_qw = timeit(lambda: fp8.quantize_weight_128x128(wd), dev, iters)
        err = rel(fp8_linear(xd, wd), F.linear(xd.float(), wd.float()))
        gemm_err = rel(fp8_gemm.fp8_mm(qx, sx, qw, sw), fp8_gemm.fp8_mm_reference(qx, sx, qw, sw))
    flops = 6 * M * N * K
    return {"tokens": M, "hidden": K, "ffn": N,
            "fwd_bwd_ms": {k: round(v, 3) for k, v in t.items()},
            "fwd_bwd_tflops": {k: round(flops / v / 1e9, 1) for k, v in t.items()},
            "fwd_bwd_speedup_fp8": round(t_bf16 / t_fp8, 3),
            "fwd_bwd_speedup": {k: round(t_bf16 / t[k], 3) for k in RECIPES},
            "fwd_bwd_speedup_rounds": speedups(rounds, "bf16"), **graphed,
            "grad_rel_err_vs_fp32": grad_err,
            "fwd_ms": {"bf16": round(f_bf16, 3), "fp8": round(f_fp8, 3)},
            "fwd_speedup_fp8": round(f_bf16 / f_fp8, 3),
            "fp8_breakdown_ms": {"gemm_fprop": round(t_gemm, 3), "gemm_dgrad": round(t_dgrad, 3),
                                 "gemm_wgrad": round(t_wgrad, 3), "gemm_wgrad_dy128x128": round(t_wgrad_b, 3),
                                 "quant_act_1x128": round(t_q1, 3), "quant_act_128x1_t": round(t_q2, 3),
                                 "quant_act_dual": round(t_qd, 3), "quant_act_dual_pow2": round(t_qd_p2, 3),
                                 "quant_grad_dual_pow2_128x128": round(t_qdy_p2b, 3),
                                 "quant_weight_128x128": round(t_qw, 3)},
            "fp8_gemm_tflops": round(2 * M * N * K / t_gemm / 1e9, 1),
            "fwd_rel_err_vs_fp32": err, "gemm_rel_err_vs_dequant_reference": gemm_err}


def multi_step(fn, leaves, dys, weights, touch: bool = True):
    """``fwd_bwd`` for a function with several outputs (one output grad each)."""
    def step():
        for t in leaves:
            t.grad = None
        if touch:
            with torch.no_grad():
                for w in weights:
                    w.add_(0)
        torch.autograd.backward(fn(), dys)
    return step


SHARED_RECIPES = {"fp8": {}, "fp8_pow2_dy128x128": RECIPES["fp8_pow2_dy128x128"]}


def bench_shared(M, K, Ns, dev, iters):
    """Linears that read one input (q/k/v, gate/up), forward+backward: bf16 one F.linear each, bf16
    on one pre-stacked weight (the best bf16 peer: the model would have to store the stack), FP8 one
    fp8_linear each, and FP8 as one stacked linear (fp8_linear_shared_input, the model's path)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16).requires_grad_()
    ws = [torch.nn.Parameter((torch.randn(n, K, generator=g) * 0.02).to(dev, torch.bfloat16)) for n in Ns]
    w_stack = torch.nn.Parameter(torch.cat([w.detach() for w in ws]))
    dys = [torch.randn(M, n, generator=g).to(dev, torch.bfloat16) for n in Ns]
    steps = {"bf16": multi_step(lambda: [F.linear(x, w) for w in ws], (x, *ws), dys, ws),
             "bf16_stacked": multi_step(lambda: F.linear(x, w_stack).split(list(Ns), -1), (x, w_stack), dys,
                                        (w_stack,))}
    for name, kw in SHARED_RECIPES.items():
        steps[name + "_separate"] = multi_step(lambda kw=kw: [fp8_linear(x, w, **kw) for w in ws], (x, *ws), dys, ws)
        steps[name + "_shared"] = multi_step(lambda kw=kw: fp8_linear_shared_input(x, ws, [None] * len(ws), **kw),
                                             (x, *ws), dys, ws)
    out = {"tokens": M, "hidden": K, "outputs": list(Ns)}
    if dev == "cuda":
        times = interleaved_replays({k: cuda_graphed(f) for k, f in steps.items()}, GRAPH_REPS)
        out["fwd_bwd_gpu_ms_cuda_graphs"] = {k: round(statistics.median(v), 3) for k, v in times.items()}
        out["speedup_vs_bf16_cuda_graphs"] = median_speedups(times, "bf16")
        out["speedup_vs_bf16_stacked_cuda_graphs"] = median_speedups(times, "bf16_stacked")
    else:
        t = {k: min(v) for k, v in alternating(steps, dev, iters, ROUNDS[dev]).items()}
        out["fwd_bwd_ms"] = {k: round(v, 3) for k, v in t.items()}
    return out


def uneven_offsets(E: int, T: int, device) -> torch.Tensor:
    """Cumulative ends of E experts averaging T tokens, alternately T + T/4 and T - T/4 (so the
    experts straddle 128-token tiles), int32 on ``device``."""
    counts = torch.full((E,), T)
    counts[::2] += T // 4
    counts[1::2] -= T // 4
    return counts.cumsum(0).to(device, torch.int32)


def bf16_grouped(x, w_ENK, offs):
    return torch._grouped_mm(x, w_ENK.transpose(-2, -1), offs=offs)


def bench_grouped(E, T, K, N, dev, iters):
    g = torch.Generator().manual_seed(1)
    M = E * T
    offs = uneven_offsets(E, T, dev)
    x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16).requires_grad_()
    w = torch.nn.Parameter((torch.randn(E, N, K, generator=g) * 0.02).to(dev, torch.bfloat16))
    dy = torch.randn(M, N, generator=g).to(dev, torch.bfloat16)
    out = {"experts": E, "tokens_per_expert": T, "hidden": K, "ffn": N}

    def make_steps(touch: bool) -> dict:
        w8, w8p = (w, w) if touch else (own_copy(w), own_copy(w))
        return {"bf16": fwd_bwd(lambda: bf16_grouped(x, w, offs), (x, w), dy, w, touch),
                "fp8": fwd_bwd(lambda: fp8_grouped_linear(x, w8, offs), (x, w8), dy, w8, touch),
                "fp8_pow2": fwd_bwd(lambda: fp8_grouped_linear(x, w8p, offs, pow2_scales=True), (x, w8p), dy, w8p,
                                    touch)}

    steps = make_steps(True)
    try:
        steps["bf16"]()
    except RuntimeError as e:  # a torch without _grouped_mm backward on this device
        out["bf16_fwd_bwd_error"] = str(e)[:200]
        del steps["bf16"]
    t = {k: min(v) for k, v in alternating(steps, dev, iters, ROUNDS[dev]).items()}
    t_bf16, t_fp8 = t.get("bf16", float("nan")), t["fp8"]
    if dev == "cuda" and "bf16" in steps:
        out.update({**graphed_figures(steps), **weights_cached_figures(make_steps)})
    xd, wd = x.detach(), w.detach()
    with torch.no_grad():
        f_bf16 = timeit(lambda: bf16_grouped(xd, wd, offs), dev, iters)
        f_fp8 = timeit(lambda: fp8_grouped_linear(xd, wd, offs), dev, iters)
        qx, sx = fp8.quantize_act_1x128(xd)
        qw, sw = fp8.quantize_weight_128x128(wd)
        t_gemm = timeit(lambda: fp8_gemm.grouped_fp8_mm(qx, sx, qw, sw, offs, torch.bfloat16), dev, iters)
        # the operands fp8_grouped_linear's backward uses: the wgrad's expert-aligned
        (qdy, sdy), (qdyt, sdyt) = fp8.quantize_act_dual_grouped(dy, offs)
        _, (qxt, sxt) = fp8.quantize_act_dual_grouped(xd, offs)
        offs_a = fp8.aligned_expert_offsets(offs)
        qwt, swt = qw.transpose(1, 2).contiguous(), sw.transpose(1, 2).contiguous()
        t_dgrad = timeit(lambda: fp8_gemm.grouped_fp8_mm(qdy, sdy, qwt, swt, offs, torch.bfloat16), dev, iters)
        t_wgrad = timeit(lambda: fp8_gemm.grouped_fp8_wgrad(qdyt, sdyt, qxt, sxt, offs_a, torch.bfloat16), dev, iters)
        err = rel(fp8_grouped_linear(xd, wd, offs), bf16_grouped(xd.float(), wd.float(), offs)
                  if dev == "cpu" else bf16_grouped(xd, wd, offs))
        gemm_err = rel(fp8_gemm.grouped_fp8_mm(qx, sx, qw, sw, offs),
                       fp8_gemm.grouped_fp8_mm_reference(qx, sx, qw, sw, offs))
    flops = 6 * M * N * K
    out.update({"fwd_bwd_ms": {"bf16_grouped_mm": round(t_bf16, 3), "fp8": round(t_fp8, 3),
                               "fp8_pow2": round(t["fp8_pow2"], 3)},
                "fwd_bwd_tflops": {"bf16_grouped_mm": round(flops / t_bf16 / 1e9, 1), "fp8": round(flops / t_fp8 / 1e9, 1)},
                "fwd_bwd_speedup_fp8": round(t_bf16 / t_fp8, 3),
                "fwd_bwd_speedup_fp8_pow2": round(t_bf16 / t["fp8_pow2"], 3),
                "fwd_ms": {"bf16_grouped_mm": round(f_bf16, 3), "fp8": round(f_fp8, 3)},
                "fwd_speedup_fp8": round(f_bf16 / f_fp8, 3),
                "fp8_grouped_gemm_ms": round(t_gemm, 3),
                "fp8_breakdown_ms": {"gemm_fprop": round(t_gemm, 3), "gemm_dgrad": round(t_dgrad, 3),
                                     "gemm_wgrad": round(t_wgrad, 3)},
                "fp8_grouped_gemm_tflops": round(2 * M * N * K / t_gemm / 1e9, 1),
                "fwd_rel_err_vs_bf16": err, "gemm_rel_err_vs_dequant_reference": gemm_err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU check)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--sections", default="linear,grouped,shared", help="comma-separated: linear, grouped, shared")
    args = ap.parse_args()
    sections = args.sections.split(",")
    dev = args.device
    iters = args.iters or (2 if args.quick or dev == "cpu" else 20)
    result = {"bench": "fp8_gemm", "device": dev, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
              "triton_kernels": dev == "cuda" and fp8.triton_available(),
              "cublas_blockwise": ({"1x128_x_128x128": fp8_gemm.cublas_blockwise(dev, False),
                                    "1x128_x_1x128": fp8_gemm.cublas_blockwise(dev, True),
                                    "128x128_x_1x128": fp8_gemm.cublas_blockwise(dev, True, blocks_a=True)}
                                   if dev == "cuda" else None)}
    result["linear"] = ([bench_linear(*s, dev, iters) for s in (QUICK_LINEAR if args.quick else LINEAR)]
                        if "linear" in sections else [])
    result["grouped"] = ([bench_grouped(*s, dev, iters) for s in (QUICK_GROUPED if args.quick else GROUPED)]
                         if "grouped" in sections else [])
    result["shared"] = ([bench_shared(*s, dev, iters) for s in (QUICK_SHARED if args.quick else SHARED)]
                        if "shared" in sections else [])
    large = [r for r in result["linear"] if r["tokens"] >= LARGE]
    by_recipe = {k: [r["fwd_bwd_speedup"][k] for r in large] for k in RECIPES}
    medians = {k: [r["fwd_bwd_speedup_rounds"][k]["median_of_rounds"] for r in large] for k in RECIPES}
    graphed, cached = ({k: [r[key][k]["median_of_steps"] for r in large if key in r] for k in RECIPES}
                       for key in ("fwd_bwd_speedup_cuda_graphs", "fwd_bwd_speedup_cuda_graphs_weights_cached"))
    result["summary"] = {"target_fwd_bwd_speedup_large": 1.4, "large_shapes": [[r["tokens"], r["hidden"], r["ffn"]] for r in large],
                         "large_linear_fwd_bwd_speedups": by_recipe,
                         "large_linear_fwd_bwd_speedups_median_of_rounds": medians,
                         "large_linear_fwd_bwd_speedups_cuda_graphs_median_of_steps": graphed,
                         "large_linear_fwd_bwd_speedups_cuda_graphs_weights_cached": cached,
                         "target_met_by": [k for k, v in by_recipe.items() if v and min(v) >= 1.4],
                         "grouped_fwd_bwd_speedups": [r["fwd_bwd_speedup_fp8"] for r in result["grouped"]],
                         "grouped_fwd_bwd_speedups_cuda_graphs": [
                             {k: v["median_of_steps"] for k, v in r["fwd_bwd_speedup_cuda_graphs"].items()}
                             for r in result["grouped"] if "fwd_bwd_speedup_cuda_graphs" in r],
                         "grouped_fwd_bwd_speedups_cuda_graphs_weights_cached": [
                             {k: v["median_of_steps"] for k, v in r["fwd_bwd_speedup_cuda_graphs_weights_cached"].items()}
                             for r in result["grouped"] if "fwd_bwd_speedup_cuda_graphs_weights_cached" in r]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
