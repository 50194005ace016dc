"""GPU probe of the FP8 training path's parts (CUDA only); prints ONE JSON object.

    python3 bench/fp8_probe.py [--sections quant,fast_div,gemm,linear] [--pow2]

  quant[]    per bf16 activation x [tokens, hidden] and output grad dy [tokens, ffn]: median ms
             (CUDA events, L2 flushed before each rep) of every launch config of
             triton_fp8.quantize_1x128 and quantize_128x1_t, each with the div.rn division and the
             FMA division (fast_div), and of every fused variant of triton_fp8.quantize_dual;
             `equal`: q (as uint8), scales, shapes and strides bitwise equal to the reference (the
             two kernels in their default config with div.rn, the production path before this
             probe); GB/s of the ideal traffic (x read once per kernel, q written). Summary: the
             default two kernels, the best bit-equal two kernels, the best bit-equal fused variant.
  fast_div_check  the FMA division against div.rn: every finite bf16 value against every bf16 amax
             mantissa (normal, subnormal and huge amax), 1x128, 128x1_t and fused; plus random fp32
             blocks over 60 decades. Mismatch counts (0 = bit-identical).
  gemm[]     (M, K, N) of y = x W^T: the three cuBLAS block-scaled FP8 GEMMs exactly as fp8_linear
             issues them (fprop y = Qx.Qw, dgrad dx = Qdy.Qw^T-blocks, wgrad dW = Qdy_t.Qx_t), the
             swapped wgrad (dW^T = Qx_t.Qdy_t, returned .t(); and with .contiguous()), and bf16
             torch.mm of the same three GEMMs; ms and TFLOP/s; swapped vs normal wgrad in fp32:
             max|diff| / max|dW| and relative Frobenius difference.
  cublas_recipes  per block recipe (1x128 x 128x128, 1x128 x 1x128, 128x128 x 1x128): every cuBLAS
             entry point and scale layout candidate, "ok" / "wrong" / the error it raised.
  cublas_grouped  whether F.scaled_grouped_mm takes the block-scaled grouped fprop (per scale layout:
             ms next to the Triton grouped kernel, "wrong", or the error).
  linear[]   fwd+bwd of fp8_linear (y, dx, dW; the weight touched in place every step, as an
             optimizer does, so it is re-quantized) vs bf16 F.linear, per quantization setting:
             (fp8._DUAL_IMPL, triton_fp8.FAST_DIV), the fused setting with the fastest bit-equal
             fused variant of quant[] for that x, and the best bit-equal two-kernel configs.
Every measurement is guarded: a failure is recorded as {"error": ...} and the rest still runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch.nn.functional as F

from miles_lib.precision import fp8, fp8_gemm, triton_fp8
from miles_lib.precision.fp8_linear import fp8_linear

from fp8_gemm import fwd_bwd  # bench/ sibling: the same training micro-step as the FP8 bench

X_SHAPES = [(32768, 7168), (32768, 4096), (16384, 4096)]
DY_SHAPES = [(32768, 2048), (32768, 1536)]
GEMMS = [(32768, 7168, 2048), (32768, 4096, 2048), (16384, 4096, 1536)]  # (M, K, N) of y = x W^T
ROWS_CONFIGS = [{"block_m": 32, "num_warps": 4}, {"block_m": 64, "num_warps": 8}, {"block_m": 128, "num_warps": 8}]
COLS_CONFIGS = [{"block_k": 64, "num_warps": 4}, {"block_k": 32, "num_warps": 4}, {"block_k": 128, "num_warps": 8}]
FUSED_CONFIGS = {"tile_w8": {"paired_sub": None, "num_warps": 8},
                 "tile_w8_r128": {"paired_sub": None, "num_warps": 8, "max_registers": 128},
                 "tile_w16": {"paired_sub": None, "num_warps": 16},
                 # the 1x128 program on whole 128-row tiles (row_sub 128)
                 "paired64_w4": {"paired_sub": 64, "num_warps": 4, "row_sub": 128},
                 "paired64_w8": {"paired_sub": 64, "num_warps": 8, "row_sub": 128},
                 "paired32_w4": {"paired_sub": 32, "num_warps": 4, "row_sub": 128},
                 "paired128_w8": {"paired_sub": 128, "num_warps": 8, "row_sub": 128},
                 # the 1x128 program in 32- or 64-row slices (a quarter or half of the registers of a whole tile)
                 "paired64_w4_rows32": {"paired_sub": 64, "num_warps": 4, "row_sub": 32},
                 "paired64_w4_rows64": {"paired_sub": 64, "num_warps": 4, "row_sub": 64},  # the default
                 "paired32_w4_rows32": {"paired_sub": 32, "num_warps": 4, "row_sub": 32},
                 "paired128_w8_rows32": {"paired_sub": 128, "num_warps": 8, "row_sub": 32},
                 "paired128_w8_rows64": {"paired_sub": 128, "num_warps": 8, "row_sub": 64},
                 "paired64_w4_rows64_r168": {"paired_sub": 64, "num_warps": 4, "row_sub": 64, "max_registers": 168},
                 "paired64_w4_rows64_r128": {"paired_sub": 64, "num_warps": 4, "row_sub": 64, "max_registers": 128},
                 "paired64_w8_rows64": {"paired_sub": 64, "num_warps": 8, "row_sub": 64}}
REPS, WARMUP = 25, 3
_FLUSH = None


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a probe records every failure and goes on
        return {"error": f"{type(e).__name__}: {e}"[:400]}


def cuda_ms(fn, reps: int = REPS, flush: bool = True) -> float:
    """Median ms of fn() over reps CUDA-event-timed calls (after WARMUP calls); the L2 cache is
    overwritten before each timed call when flush (its 50 MB would otherwise hold outputs)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(WARMUP):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush:
            _FLUSH.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return round(statistics.median(s.elapsed_time(e) for s, e in events), 4)


def same_bits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """(q, s) pairs identical: shapes, strides, q bytes, scale values."""
    (qa, sa), (qb, sb) = a, b
    return (qa.shape == qb.shape and sa.shape == sb.shape and sa.stride() == sb.stride()
            and torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb))


def mismatches(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> int:
    (qa, sa), (qb, sb) = a, b
    return int((qa.view(torch.uint8) != qb.view(torch.uint8)).sum()) + int((sa != sb).sum())


# ---------------------------------------------------------------------------------------------
# quantization kernels
# ---------------------------------------------------------------------------------------------
def _name(cfg: dict, fast_div: bool) -> str:
    return "_".join(f"{k}{v}" for k, v in cfg.items()) + ("_fastdiv" if fast_div else "_divrn")


def _timed_variant(fn, ref, gb: float) -> dict:
    out = fn()
    equal = (same_bits(out[0], ref[0]) and same_bits(out[1], ref[1])) if isinstance(out[0], tuple) \
        else same_bits(out, ref)
    del out
    ms = cuda_ms(fn)
    return {"ms": ms, "equal": equal, "GB/s": round(gb / ms * 1e3, 1)}


def _best(results: dict) -> tuple[str, float] | None:
    ok = [(k, v["ms"]) for k, v in results.items() if isinstance(v, dict) and v.get("equal")]
    return min(ok, key=lambda kv: kv[1]) if ok else None


def probe_quant(kind: str, M: int, K: int, pow2: bool = False) -> dict:
    """pow2: power-of-two scales (a multiply instead of a division; the fast_div variants then run
    the same code and are skipped)."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref_rows = triton_fp8.quantize_1x128(x, pow2, fast_div=False)
    ref_cols = triton_fp8.quantize_128x1_t(x, pow2, fast_div=False)
    gb_one = M * K * 3 / 1e9  # read x (bf16), write q (e4m3); scales are < 2 %
    rows, cols, fused = {}, {}, {}
    for fast_div in (False,) if pow2 else (False, True):
        for cfg in ROWS_CONFIGS:
            rows[_name(cfg, fast_div)] = guarded(_timed_variant, functools.partial(
                triton_fp8.quantize_1x128, x, pow2, fast_div=fast_div, **cfg), ref_rows, gb_one)
        for cfg in COLS_CONFIGS:
            cols[_name(cfg, fast_div)] = guarded(_timed_variant, functools.partial(
                triton_fp8.quantize_128x1_t, x, pow2, fast_div=fast_div, **cfg), ref_cols, gb_one)
        for name, cfg in FUSED_CONFIGS.items():
            fused[name + ("_fastdiv" if fast_div else "_divrn")] = guarded(_timed_variant, functools.partial(
                triton_fp8.quantize_dual, x, pow2, fast_div=fast_div, **cfg), (ref_rows, ref_cols), M * K * 4 / 1e9)
    default = [rows.get(_name(ROWS_CONFIGS[0], False), {}).get("ms"),
               cols.get(_name(COLS_CONFIGS[0], False), {}).get("ms")]
    best_rows, best_cols, best_fused = _best(rows), _best(cols), _best(fused)
    return {"tensor": kind, "shape": [M, K], "quantize_1x128": rows, "quantize_128x1_t": cols, "quantize_dual": fused,
            "summary_ms": {
                "two_kernels_default": round(sum(default), 4) if None not in default else None,
                "two_kernels_best": (round(best_rows[1] + best_cols[1], 4) if best_rows and best_cols else None),
                "two_kernels_best_configs": [best_rows and best_rows[0], best_cols and best_cols[0]],
                "fused_best": best_fused and best_fused[1], "fused_best_variant": best_fused and best_fused[0],
                "ideal_fused_at_3.8TB/s": round(M * K * 4 / 3.8e9, 4)}}


# ---------------------------------------------------------------------------------------------
# the FMA division against div.rn
# ---------------------------------------------------------------------------------------------
def _fast_vs_rn(x: torch.Tensor) -> dict:
    """Mismatches (q bytes + scales) of the FMA division vs div.rn on the blocks (rows) of x [R, 128]:
    1x128 and fused on x, 128x1_t and fused on x^T (zero blocks appended to R' = R rounded up to 128)."""
    xt = fp8.pad_rows(x, 128).t().contiguous()
    out = {"elements": x.numel()}
    for name, fn, t in (("1x128", triton_fp8.quantize_1x128, x), ("fused", triton_fp8.quantize_dual, x),
                        ("128x1_t_of_transpose", triton_fp8.quantize_128x1_t, xt),
                        ("fused_of_transpose", triton_fp8.quantize_dual, xt)):
        fast, rn = fn(t, False, fast_div=True), fn(t, False, fast_div=False)
        pairs = zip(fast, rn) if isinstance(fast[0], tuple) else [(fast, rn)]
        out[name] = sum(mismatches(a, b) for a, b in pairs)
    return out


def probe_fast_div() -> dict:
    x = fp8.every_bf16_block()
    res = {"bf16_exhaustive": guarded(_fast_vs_rn, x.cuda())}
    res["bf16_exhaustive_vs_cpu_reference_1x128"] = guarded(
        lambda: mismatches(tuple(t.cpu() for t in triton_fp8.quantize_1x128(x.cuda(), False, fast_div=True)),
                           fp8.quantize_blockwise(x, 1, 128)))
    g = torch.Generator(device="cuda").manual_seed(0)
    fp32 = []
    for _ in range(4):
        blocks = torch.randn(262144, 128, device="cuda", generator=g)
        blocks *= 10.0 ** (torch.rand(262144, 1, device="cuda", generator=g) * 60 - 30)
        fp32.append(guarded(_fast_vs_rn, blocks))
    res["fp32_random"] = fp32
    return res


# ---------------------------------------------------------------------------------------------
# cuBLAS GEMMs
# ---------------------------------------------------------------------------------------------
def _tflops(flops: float, ms) -> float | None:
    return round(flops / ms / 1e9, 1) if isinstance(ms, float) else None


def probe_gemm(M: int, K: int, N: int) -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    (qx, sx), (qxt, sxt) = fp8.quantize_act_1x128(x), fp8.quantize_act_128x1_t(x)
    (qdy, sdy), (qdyt, sdyt) = fp8.quantize_act_1x128(dy), fp8.quantize_act_128x1_t(dy)
    (qw, sw), (qwt, swt) = fp8.quantize_weight_128x128(w, with_transpose=True)  # as fp8_linear
    bf = torch.bfloat16
    fp8_calls = {
        "fprop": lambda: fp8_gemm.fp8_mm(qx, sx, qw, sw, bf),
        "dgrad": lambda: fp8_gemm.fp8_mm(qdy, sdy, qwt, swt, bf),
        "wgrad": lambda: fp8_gemm.fp8_mm(qdyt, sdyt, qxt, sxt, bf),
        "wgrad_swapped": lambda: fp8_gemm.fp8_mm(qxt, sxt, qdyt, sdyt, bf).t(),
        "wgrad_swapped_contiguous": lambda: fp8_gemm.fp8_mm(qxt, sxt, qdyt, sdyt, bf).t().contiguous(),
    }
    bf16_calls = {"fprop": lambda: torch.mm(x, w.t()), "dgrad": lambda: torch.mm(dy, w),
                  "wgrad": lambda: torch.mm(dy.t(), x)}
    flops = 2.0 * M * N * K
    out = {"M": M, "K": K, "N": N, "cublas_blockwise": [fp8_gemm.cublas_blockwise("cuda", False),
                                                        fp8_gemm.cublas_blockwise("cuda", True)]}
    for group, calls in (("fp8", fp8_calls), ("bf16", bf16_calls)):
        ms = {k: guarded(cuda_ms, f, flush=False) for k, f in calls.items()}
        out[group] = {k: {"ms": v, "TFLOP/s": _tflops(flops, v)} if isinstance(v, float) else v for k, v in ms.items()}
        times = [v for v in ms.values() if isinstance(v, float)][:3]
        out[group]["three_gemms_ms"] = round(sum(times), 4) if len(times) == 3 else None
    out["wgrad_swapped_vs_wgrad"] = guarded(_swapped_diff, qdyt, sdyt, qxt, sxt)
    return out


def _swapped_diff(qdyt, sdyt, qxt, sxt) -> dict:
    dw = fp8_gemm.fp8_mm(qdyt, sdyt, qxt, sxt, torch.float32)
    dw_swapped = fp8_gemm.fp8_mm(qxt, sxt, qdyt, sdyt, torch.float32).t()
    diff = (dw_swapped - dw).abs()
    return {"max_abs_diff_over_max_abs": float(diff.max() / dw.abs().max()),
            "rel_frobenius": float((dw_swapped - dw).norm() / dw.norm())}


# ---------------------------------------------------------------------------------------------
# fp8_linear end to end
# ---------------------------------------------------------------------------------------------
def _config_of(variant: str | None, configs: list[dict] | dict) -> dict:
    """The launch config a quant[] variant name stands for ({} when there is none)."""
    if not variant:
        return {}
    if isinstance(configs, dict):
        return configs[variant.rsplit("_", 1)[0]]
    return next(c for c in configs if variant.startswith(_name(c, False).rsplit("_", 1)[0] + "_"))


class _Setting:
    """fp8._DUAL_IMPL, triton_fp8.FAST_DIV and the quantization wrappers' launch configs, set for
    one measurement and restored after it."""

    def __init__(self, dual: str, fast_div: bool, configs: dict[str, dict]):
        self.dual, self.fast_div, self.configs = dual, fast_div, configs

    def __enter__(self):
        self.saved = (fp8._DUAL_IMPL, triton_fp8.FAST_DIV,
                      {name: getattr(triton_fp8, name) for name in self.configs})
        fp8._DUAL_IMPL, triton_fp8.FAST_DIV = self.dual, self.fast_div
        for name, cfg in self.configs.items():
            setattr(triton_fp8, name, functools.partial(getattr(triton_fp8, name), **cfg))

    def __exit__(self, *exc):
        fp8._DUAL_IMPL, triton_fp8.FAST_DIV, wrappers = self.saved
        for name, fn in wrappers.items():
            setattr(triton_fp8, name, fn)


def probe_linear(M: int, K: int, N: int, quant_by_shape: dict) -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    summary = quant_by_shape.get((M, K), {}).get("summary_ms", {})
    best_fused = _config_of(summary.get("fused_best_variant"), FUSED_CONFIGS)
    best_rows, best_cols = summary.get("two_kernels_best_configs") or [None, None]
    settings = {
        "two_kernels_divrn (before)": _Setting("two_kernels", False, {}),
        "two_kernels_fastdiv": _Setting("two_kernels", True, {}),
        "two_kernels_best_configs_fastdiv": _Setting("two_kernels", True, {
            "quantize_1x128": _config_of(best_rows, ROWS_CONFIGS),
            "quantize_128x1_t": _config_of(best_cols, COLS_CONFIGS)}),
        "fused_divrn": _Setting("fused", False, {"quantize_dual": best_fused}),
        "fused_fastdiv": _Setting("fused", True, {"quantize_dual": best_fused}),
    }
    flops = 6.0 * M * N * K
    out = {"M": M, "K": K, "N": N, "fused_variant": summary.get("fused_best_variant"),
           "bf16_ms": guarded(cuda_ms, fwd_bwd(lambda: F.linear(x, w), (x, w), dy, w), 20, False)}
    for name, setting in settings.items():
        def measure(setting=setting):
            with setting:
                return cuda_ms(fwd_bwd(lambda: fp8_linear(x, w), (x, w), dy, w), 20, False)
        ms = guarded(measure)
        out[name] = {"ms": ms, "TFLOP/s": _tflops(flops, ms),
                     "speedup_vs_bf16": (round(out["bf16_ms"] / ms, 3)
                                         if isinstance(ms, float) and isinstance(out["bf16_ms"], float) else None)}
    return out


def probe_cublas_recipes() -> dict:
    """Every (entry point, scale_a layout, scale_b layout) candidate of every block recipe on a small
    problem: "ok", "wrong" (runs, differs from the reference) or the error text."""
    from miles_lib.precision.fp8 import quantize_blockwise
    g = torch.Generator().manual_seed(0)
    out = {}
    for blocks_a, rowwise_b in ((False, False), (False, True), (True, True)):
        qa, sa = quantize_blockwise(torch.randn(256, 768, generator=g).cuda(), 128 if blocks_a else 1, 128)
        qb, sb = quantize_blockwise(torch.randn(384, 768, generator=g).cuda(), 1 if rowwise_b else 128, 128)
        ref = fp8_gemm.fp8_mm_reference(qa, sa, qb, sb)
        rows = {}
        for api in fp8_gemm._apis():
            for i in range(fp8_gemm._NUM_CANDIDATES["a_blocks" if blocks_a else "a_tiles"]):
                for j in range(fp8_gemm._NUM_CANDIDATES["b_tiles" if rowwise_b else "b_blocks"]):
                    try:
                        o = fp8_gemm._call(api, qa, qb.t(), fp8_gemm._candidate_a(sa, blocks_a, i),
                                           fp8_gemm._candidate_b(sb, rowwise_b, j), blocks_a, rowwise_b, torch.float32)
                        rows[f"{api}[{i},{j}]"] = "ok" if ((o - ref).norm() / ref.norm()).item() < 1e-3 else "wrong"
                    except Exception as e:  # noqa: BLE001 - the probe records every failure
                        rows[f"{api}[{i},{j}]"] = f"{type(e).__name__}: {str(e)[:300]}"
        out[f"{'128x128' if blocks_a else '1x128'}_x_{'1x128' if rowwise_b else '128x128'}"] = rows
    return out


def probe_cublas_grouped(E: int = 64, T: int = 512, K: int = 2048, N: int = 1536) -> dict:
    """Does this torch's ``F.scaled_grouped_mm`` take block-scaled FP8 (1x128 activations x 128x128
    expert weights, the grouped fprop)? Every scale layout candidate: "ok" with its ms next to the
    Triton grouped kernel, "wrong", or the error text."""
    import torch.nn.functional as F
    from miles_lib.precision.fp8 import quantize_blockwise
    if not hasattr(F, "scaled_grouped_mm"):
        return {"error": "no F.scaled_grouped_mm"}
    g = torch.Generator().manual_seed(0)
    M = E * T
    qa, sa = quantize_blockwise(torch.randn(M, K, generator=g).cuda(), 1, 128)
    qb, sb = quantize_blockwise(torch.randn(E, N, K, generator=g).cuda(), 128, 128)
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * T
    ref = fp8_gemm.grouped_fp8_mm(qa, sa, qb, sb, offs, torch.bfloat16).float()
    st = F.ScalingType
    a_layouts = {"outer_major": lambda: sa.t().contiguous().t(), "row_major": lambda: sa.contiguous()}
    b_layouts = {"E_N_K": lambda: sb.contiguous(), "E_K_N^T": lambda: sb.transpose(1, 2).contiguous().transpose(1, 2),
                 "E_K_N": lambda: sb.transpose(1, 2).contiguous()}
    out = {"triton_grouped_ms": cuda_ms(lambda: fp8_gemm.grouped_fp8_mm(qa, sa, qb, sb, offs, torch.bfloat16),
                                         flush=False)}
    for an, af in a_layouts.items():
        for bn, bf in b_layouts.items():
            scale_a, scale_b = af(), bf()
            call = functools.partial(F.scaled_grouped_mm, qa, qb.transpose(1, 2), scale_a, st.BlockWise1x128,
                                     scale_b, st.BlockWise128x128, offs=offs, output_dtype=torch.bfloat16)
            try:
                o = call().float()
                ok = ((o - ref).norm() / ref.norm()).item() < 1e-2
                out[f"{an}|{bn}"] = {"ms": cuda_ms(call, flush=False)} if ok else "wrong"
            except Exception as e:  # noqa: BLE001 - the probe records every failure
                out[f"{an}|{bn}"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


SECTIONS = ("quant", "fast_div", "gemm", "linear", "cublas", "cublas_grouped")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--pow2", action="store_true", help="quant section with power-of-two scales")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    t0 = time.time()
    result = {"probe": "fp8_probe", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": guarded(lambda: __import__("triton").__version__), "reps": REPS}
    quant = [guarded(probe_quant, kind, M, K, args.pow2) for kind, shapes in (("x", X_SHAPES), ("dy", DY_SHAPES))
             for M, K in shapes] if "quant" in sections else []
    result["quant"] = quant
    if "fast_div" in sections:
        result["fast_div_check"] = guarded(probe_fast_div)
    if "cublas" in sections:
        result["cublas_recipes"] = guarded(probe_cublas_recipes)
    if "cublas_grouped" in sections:
        result["cublas_grouped"] = guarded(probe_cublas_grouped)
    if "gemm" in sections:
        result["gemm"] = [guarded(probe_gemm, *s) for s in GEMMS]
    by_shape = {tuple(q["shape"]): q for q in quant if "shape" in q}
    if "linear" in sections:
        result["linear"] = [guarded(probe_linear, M, K, N, by_shape) for M, K, N in GEMMS]
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
