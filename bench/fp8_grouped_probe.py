"""Grouped block-scaled FP8 GEMM kernels (the MoE experts) on the GPU; prints ONE JSON object.

    python3 bench/fp8_grouped_probe.py [--shapes 64x512x2048x768,...] [--quick]
    TRITON_INTERPRET=1 python bench/fp8_grouped_probe.py --check   # CPU: candidates vs the reference

Per expert shape (E experts x T tokens each, hidden K -> ffn N; uneven expert sizes as in
bench/fp8_gemm.py) and per GEMM of the expert linear -- fprop y = x W_e^T, dgrad dx = dy W_e,
wgrad dW_e = dy_e^T x_e -- the time (triton.testing.do_bench: median ms, L2 flushed) and TFLOP/s of
  * bf16 ``torch._grouped_mm`` (the peer),
  * with one expert (E = 1), fprop / dgrad also cuBLAS's dense block-scaled GEMM (``fp8_mm``),
  * the shipped path (``fp8_gemm.grouped_fp8_mm`` / ``grouped_fp8_wgrad``: the Gluon kernels on sm90),
  * every launch config of each candidate kernel:
      ptr       fprop / dgrad: the shipped kernel (pointer loads), config forced
      tma       fprop / dgrad: A and B tiles through TMA tensor descriptors (no per-row address
                math, no masks: rows past an expert are loaded and their outputs not stored);
      gluon     ``gluon_fp8.grouped_mm`` / ``grouped_wgrad`` (sm90 only: warp-specialized,
                persistent, TMA producer warp + two consumer warpgroups), config = ring depth;
      gluon_split  fprop / dgrad: the same with each slab's product in two column halves, one
                in flight while the other is promoted (``split=True``)
  "wgrad_aligned" (a fourth GEMM name): the wgrad on the expert-aligned operands of
  ``fp8.quantize_act_dual_grouped`` (every expert at a 128-aligned token column, no slab shared by
  two experts, so nothing is masked), what ``fp8_grouped_linear`` runs: tma_peel (Triton), gluon
      tma       wgrad: the Triton TMA kernel with PEEL off (every slab masked)
      tma_peel  wgrad: the Triton kernel with PEEL on (only the, at most two, 128-token slabs
                that straddle an expert boundary are masked)
each checked against the dequantized fp32 reference with an fp32 output (``rel_err`` < 1e-3, or
the config is not ranked) and timed with a bf16 output. ``best``: the fastest correct config per
candidate. Failures are recorded as {"error": ...}.
First run (H200, before the wgrad moved to TMA): bench/results/fp8_grouped_probe_h200.json. A
"lag" candidate (slab k's product scaled only after slab k + 1's MMA was issued, to keep the tensor
cores busy) ran 2-12x slower (registers for three accumulators spill) and was dropped:
bench/results/fp8_grouped_probe_lag_h200.json (measured with that candidate, since removed).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from miles_lib.precision import fp8, fp8_gemm, triton_fp8

SHAPES = [(64, 512, 2048, 768), (64, 512, 2048, 1536), (128, 256, 4096, 1536)]
MM_CONFIGS = [(bm, bn, w, s) for bm, bn, w in ((64, 128, 4), (128, 128, 8), (128, 128, 4), (128, 256, 8),
                                               (64, 256, 4), (64, 256, 8), (128, 64, 4))
              for s in (3, 4, 5)]
GL_CONFIGS = [(128, 128, 12, s) for s in (3, 4, 5, 6)]
WG_CONFIGS = [(bn, bk, w, s) for bn, bk, w in ((128, 128, 8), (128, 128, 4), (64, 128, 4), (128, 256, 8),
                                               (256, 128, 8))
              for s in (3, 4)]


@triton.jit
def _gmm_tma_kernel(a_desc, sa_ptr, b_desc, sb_ptr, c_ptr, starts_ptr, ends_ptr, N, K, E,
                    stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k,
                    E_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr):
    valid, e, row0, row_end = triton_fp8._expert_tile(tl.program_id(0), starts_ptr, ends_ptr, E, E_P2, BM)
    if not valid:
        return
    pid_n = tl.program_id(1)
    rm = row0 + tl.arange(0, BM)
    mmask = rm < row_end
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    sa_ptrs = sa_ptr + rm.to(tl.int64) * stride_sa_m
    sb_ptrs = sb_ptr + e * stride_sb_e + (rn // 128) * stride_sb_n
    brow = e * N + pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in tl.range(0, K // 128, num_stages=STAGES):
        a = a_desc.load([row0, kb * 128])
        b = b_desc.load([brow, kb * 128])
        sa = tl.load(sa_ptrs + kb * stride_sa_k, mask=mmask, other=0.0)
        sb = tl.load(sb_ptrs + kb * stride_sb_k, mask=nmask, other=0.0)
        acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _set_allocator() -> None:
    # device-side descriptors are not used, but some Triton versions ask for a scratch allocator
    if hasattr(triton, "set_allocator"):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                      device="cuda" if torch.cuda.is_available() else "cpu"))


def gmm(variant: str, qa, sa, qb, sb, offs, cfg, out_dtype=torch.bfloat16):
    """Grouped fprop / dgrad, A [M, K] 1x128 x B [E, N, K] 128x128, one forced launch config."""
    BM, BN, warps, stages = cfg
    qa, qb = qa.contiguous(), qb.contiguous()
    M, K = qa.shape
    E, N, _ = qb.shape
    c = torch.empty(M, N, dtype=out_dtype, device=qa.device)
    starts, ends = triton_fp8._starts_ends(offs)
    grid = (triton.cdiv(M, BM) + E, triton.cdiv(N, BN))
    common = (N, K, E, sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), sb.stride(2))
    if variant.startswith("gluon"):
        from miles_lib.precision import gluon_fp8
        return gluon_fp8.grouped_mm(qa, sa, qb, sb, offs, out_dtype, stages=stages, split=variant == "gluon_split")
    if variant == "ptr":
        triton_fp8._grouped_mm_kernel.fn[grid](qa, sa, qb, sb, c, starts, ends, *common,
                                               E_P2=triton.next_power_of_2(E), BM=BM, BN=BN,
                                               num_warps=warps, num_stages=stages)
    else:
        a_desc = TensorDescriptor.from_tensor(qa, [BM, 128])
        b_desc = TensorDescriptor.from_tensor(qb.view(E * N, K), [BN, 128])
        _gmm_tma_kernel[grid](a_desc, sa, b_desc, sb, c, starts, ends, *common,
                              E_P2=triton.next_power_of_2(E), BM=BM, BN=BN, STAGES=stages,
                              num_warps=warps)
    return c


def gwg(variant: str, qa_t, sa_t, qb_t, sb_t, offs, cfg, out_dtype=torch.bfloat16):
    """Grouped wgrad (the Triton TMA kernel, PEEL on for "tma_peel"; the Gluon kernel for "gluon*"),
    a_t [N, M'] and b_t [K, M'] 128x1 (along tokens) -> [E, N, K], one forced launch config."""
    BN, BK, warps, stages = cfg
    if variant == "gluon":
        from miles_lib.precision import gluon_fp8
        return gluon_fp8.grouped_wgrad(qa_t, sa_t, qb_t, sb_t, offs, out_dtype, stages=stages)
    qa_t, qb_t = qa_t.contiguous(), qb_t.contiguous()
    N = qa_t.shape[0]
    K = qb_t.shape[0]
    E = offs.shape[0]
    c = torch.empty(E, N, K, dtype=out_dtype, device=qa_t.device)
    starts, ends = triton_fp8._starts_ends(offs)
    grid = (E, triton.cdiv(N, BN), triton.cdiv(K, BK))
    a_desc = TensorDescriptor.from_tensor(qa_t, [BN, 128])
    b_desc = TensorDescriptor.from_tensor(qb_t, [BK, 128])
    triton_fp8._grouped_wgrad_kernel.fn[grid](a_desc, sa_t, b_desc, sb_t, c, starts, ends, N, K, sa_t.stride(0),
                                              sa_t.stride(1), sb_t.stride(0), sb_t.stride(1), BN=BN, BK=BK,
                                              STAGES=stages, PEEL=variant == "tma_peel", num_warps=warps)
    return c


def operands(E, T, K, N, device):
    """bf16 x, w, dy with uneven experts (as bench/fp8_gemm.py) and their FP8 operands."""
    g = torch.Generator().manual_seed(1)
    counts = torch.full((E,), T)
    counts[::2] += T // 4
    counts[1::2] -= T // 4
    if E > 3:
        counts[2] += counts[3] - 1  # one expert left with a single token, one with 128k + 1
        counts[3] = 1
    offs = counts.cumsum(0).to(device, torch.int32)
    M = int(counts.sum())
    x = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(E, N, K, generator=g) * 0.02).to(device, torch.bfloat16)
    dy = torch.randn(M, N, generator=g).to(device, torch.bfloat16)
    qx, sx = fp8.quantize_act_1x128(x)
    (qw, sw), (qwt, swt) = fp8.quantize_weight_128x128(w, with_transpose=True)
    (qdy, sdy), (qdyt, sdyt) = fp8.quantize_act_dual(dy)
    qxt, sxt = fp8.quantize_act_128x1_t(x)
    _, (qdyt_a, sdyt_a) = fp8.quantize_act_dual_grouped(dy, offs)
    _, (qxt_a, sxt_a) = fp8.quantize_act_dual_grouped(x, offs)
    return dict(offs=offs, x=x, w=w, dy=dy, fprop=(qx, sx, qw, sw), dgrad=(qdy, sdy, qwt, swt),
                wgrad=(qdyt, sdyt, qxt, sxt), wgrad_aligned=(qdyt_a, sdyt_a, qxt_a, sxt_a),
                offs_aligned=fp8.aligned_expert_offsets(offs))


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check() -> dict:
    """Every candidate (one config each) against the dequantized reference on small shapes."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for shape in ((6, 100, 256, 128), (4, 256, 256, 256), (5, 40, 128, 384), (3, 9, 384, 128)):
        ops = operands(*shape, dev)
        offs = ops["offs"]
        for gemm in ("fprop", "dgrad"):
            ref = fp8_gemm.grouped_fp8_mm_reference(*ops[gemm], offs)
            for v in ("ptr", "tma") + (("gluon", "gluon_split") if fp8_gemm.gluon_available() else ()):
                out[f"{shape}/{gemm}/{v}"] = rel(gmm(v, *ops[gemm], offs, (64, 128, 4, 3), torch.float32), ref)
        ref = fp8_gemm.grouped_fp8_wgrad_reference(*ops["wgrad"], offs)
        for v in ("tma", "tma_peel") + (("gluon",) if fp8_gemm.gluon_available() else ()):
            out[f"{shape}/wgrad/{v}"] = rel(gwg(v, *ops["wgrad"], offs, (128, 128, 4, 3), torch.float32), ref)
        ref = fp8_gemm.grouped_fp8_wgrad_reference(*ops["wgrad_aligned"], ops["offs_aligned"])
        for v in ("tma_peel",) + (("gluon",) if fp8_gemm.gluon_available() else ()):
            out[f"{shape}/wgrad_aligned/{v}"] = rel(gwg(v, *ops["wgrad_aligned"], ops["offs_aligned"],
                                                        (128, 128, 4, 3), torch.float32), ref)
    return out


def bench_shape(E, T, K, N, quick: bool, gemms=("fprop", "dgrad", "wgrad"), only_variants=None) -> dict:
    from triton.testing import do_bench
    ops = operands(E, T, K, N, "cuda")
    offs, x, w, dy = ops["offs"], ops["x"], ops["w"], ops["dy"]
    M = x.shape[0]
    flops = 2 * M * N * K
    ms = lambda fn: do_bench(fn, warmup=10, rep=40)  # noqa: E731
    res = {"experts": E, "tokens": M, "hidden": K, "ffn": N}
    offs_a = ops["offs_aligned"]
    bf16 = {"fprop": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
            "dgrad": lambda: torch._grouped_mm(dy, w, offs=offs),
            "wgrad": lambda: torch._grouped_mm(dy.t(), x, offs=offs)}
    bf16["wgrad_aligned"] = bf16["wgrad"]
    shipped = {"fprop": lambda: fp8_gemm.grouped_fp8_mm(*ops["fprop"], offs, torch.bfloat16),
               "dgrad": lambda: fp8_gemm.grouped_fp8_mm(*ops["dgrad"], offs, torch.bfloat16),
               "wgrad": lambda: fp8_gemm.grouped_fp8_wgrad(*ops["wgrad"], offs, torch.bfloat16),
               "wgrad_aligned": lambda: fp8_gemm.grouped_fp8_wgrad(*ops["wgrad_aligned"], offs_a, torch.bfloat16)}
    for gemm in gemms:
        row = {}
        wgrad = gemm.startswith("wgrad")
        g_offs = offs_a if gemm == "wgrad_aligned" else offs
        ref = (fp8_gemm.grouped_fp8_wgrad_reference if wgrad else fp8_gemm.grouped_fp8_mm_reference)(
            *ops[gemm], g_offs)
        peers = [("bf16_grouped_mm", bf16[gemm]), ("shipped", shipped[gemm])]
        if E == 1 and gemm != "wgrad":  # one expert: also cuBLAS's dense block-scaled GEMM
            qa, sa, qb, sb = ops[gemm]
            peers.append(("cublas_dense", lambda qa=qa, sa=sa, qb=qb[0], sb=sb[0]: fp8_gemm.fp8_mm(
                qa, sa, qb, sb, torch.bfloat16)))
        for name, fn in peers:
            try:
                t = ms(fn)
                row[name] = {"ms": round(t, 4), "tflops": round(flops / t / 1e9, 1)}
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": repr(e)[:300]}
        variants = {"wgrad": ("tma", "tma_peel", "gluon"),
                    "wgrad_aligned": ("tma_peel", "gluon")}.get(
            gemm, ("ptr", "tma", "gluon", "gluon_split"))
        variants = [v for v in variants if v in only_variants] if only_variants else variants
        for v in variants:
            configs = GL_CONFIGS if v.startswith("gluon") else WG_CONFIGS if wgrad else MM_CONFIGS
            runs = []
            for cfg in configs[:3] if quick else configs:
                fn = gwg if wgrad else gmm
                call = lambda v=v, cfg=cfg, fn=fn, gemm=gemm, g_offs=g_offs: fn(v, *ops[gemm], g_offs, cfg)  # noqa: E731
                try:
                    err = rel(fn(v, *ops[gemm], g_offs, cfg, torch.float32), ref)
                    t = ms(call)
                    runs.append({"config": list(cfg), "ms": round(t, 4), "tflops": round(flops / t / 1e9, 1),
                                 "rel_err": round(err, 6)})
                except Exception as e:  # noqa: BLE001
                    runs.append({"config": list(cfg), "error": repr(e)[:300]})
            ok = [r for r in runs if "ms" in r and r["rel_err"] < 1e-3]
            row[v] = {"best": min(ok, key=lambda r: r["ms"]) if ok else None, "runs": runs}
        res[gemm] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="ExTxKxN,... (default: bench/fp8_gemm.py's GROUPED)")
    ap.add_argument("--quick", action="store_true", help="first 3 configs only")
    ap.add_argument("--gemms", default="fprop,dgrad,wgrad,wgrad_aligned")
    ap.add_argument("--variants", default=None, help="comma-separated candidate names (default: all)")
    ap.add_argument("--check", action="store_true", help="correctness of every candidate on small shapes only")
    args = ap.parse_args()
    _set_allocator()
    if args.check or os.environ.get("TRITON_INTERPRET") == "1":
        print(json.dumps({"bench": "fp8_grouped_probe", "check_rel_err": check()}))
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    print(json.dumps({"bench": "fp8_grouped_probe", "torch": torch.__version__, "triton": triton.__version__,
                      "gpu": torch.cuda.get_device_name(), "check_rel_err": check(),
                      "shapes": [bench_shape(*s, args.quick, args.gemms.split(","),
                                                       args.variants and args.variants.split(","))
                                            for s in shapes]}))


if __name__ == "__main__":
    main()
