"""Triton kernels for block-scaled FP8 on CUDA: fused quantization and grouped (MoE) GEMMs.

Imported only when a CUDA tensor meets a Triton-capable GPU (``fp8.triton_available``).

Design note.
  * Quantization kernels compute exactly the arithmetic of ``fp8.quantize_blockwise`` (exact max,
    s = amax * fp32(1/448), IEEE division ``div_rn``, round-to-nearest-even e4m3 cast), so their
    output equals the torch ops bit for bit; they read the input once instead of ~8 unfused passes.
    1x128 scales are written outer-dim-major ([K/128, M] in memory, returned as its transpose),
    the layout cuBLAS reads without a copy. The 128x1 kernel writes its tile transposed.
  * Grouped GEMM (fprop / dgrad): rows of A are sorted by expert, ``offs`` the cumulative counts.
    Each expert's rows are cut into BM-row tiles; program (t, n) finds its expert by a prefix sum
    over the per-expert tile counts (computed in the kernel: no host sync, no per-expert launch),
    then runs  acc += dot(qA_slab, qB_slab) * sA[m, kb] * sB[e, n/128, kb]  over the 128-deep K
    slabs (the fp32 promotion after every slab, as in DeepSeek-V3). The grid has
    cdiv(M, BM) + E row tiles (an upper bound), the surplus programs exit at once.
  * Grouped wgrad: program (e, n, k) accumulates over the 128-token slabs that overlap expert e's
    rows; a slab may straddle two experts (its 128x1 scale then covers both), the other expert's
    tokens are zeroed in the A operand. No token padding per expert is needed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from miles_lib.precision.fp8 import BLOCK, FP8

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    s = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _quant_1x128_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, POW2: tl.constexpr, BM: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = kb * 128 + tl.arange(0, 128)
    mask = rm[:, None] < M
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale(tl.max(tl.abs(x), axis=1), POW2)
    q = tl.clamp(tl.math.div_rn(x, tl.broadcast_to(s[:, None], (BM, 128))), -448.0, 448.0)
    tl.store(q_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + kb * M + rm, s, mask=rm < M)


@triton.jit
def _quant_128x1_t_kernel(x_ptr, q_ptr, s_ptr, M, K, Mp, stride_xm, POW2: tl.constexpr, BK: tl.constexpr):
    mb = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = mb * 128 + tl.arange(0, 128)
    rk = pid_k * BK + tl.arange(0, BK)
    kmask = rk < K
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                mask=(rm[:, None] < M) & kmask[None, :], other=0.0).to(tl.float32)
    s = _scale(tl.max(tl.abs(x), axis=0), POW2)
    q = tl.clamp(tl.math.div_rn(x, tl.broadcast_to(s[None, :], (128, BK))), -448.0, 448.0)
    tl.store(q_ptr + rk[:, None].to(tl.int64) * Mp + rm[None, :], tl.trans(q).to(q_ptr.dtype.element_ty),
             mask=kmask[:, None])
    tl.store(s_ptr + mb * K + rk, s, mask=kmask)


@triton.jit
def _quant_128x128_kernel(w_ptr, q_ptr, s_ptr, N, K, POW2: tl.constexpr):
    pid = tl.program_id(0)  # over E * N/128 row blocks
    kb = tl.program_id(1)
    nbs = N // 128
    e = pid // nbs
    rn = (pid % nbs) * 128 + tl.arange(0, 128)
    rk = kb * 128 + tl.arange(0, 128)
    offs = e.to(tl.int64) * N * K + rn[:, None].to(tl.int64) * K + rk[None, :]
    w = tl.load(w_ptr + offs).to(tl.float32)
    s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    q = tl.clamp(tl.math.div_rn(w, tl.zeros((128, 128), tl.float32) + s), -448.0, 448.0)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + pid * (K // 128) + kb, s)


def quantize_1x128(x: torch.Tensor, pow2_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    s_t = torch.empty(K // BLOCK, M, dtype=torch.float32, device=x.device)
    BM = 32
    _quant_1x128_kernel[(triton.cdiv(M, BM), K // BLOCK)](x, q, s_t, M, K, x.stride(0), POW2=pow2_scales, BM=BM)
    return q, s_t.t()


def quantize_128x1_t(x: torch.Tensor, pow2_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    Mp = -(-M // BLOCK) * BLOCK
    q = torch.empty(K, Mp, dtype=FP8, device=x.device)
    s_buf = torch.empty(Mp // BLOCK, K, dtype=torch.float32, device=x.device)
    BK = 64
    _quant_128x1_t_kernel[(Mp // BLOCK, triton.cdiv(K, BK))](x, q, s_buf, M, K, Mp, x.stride(0),
                                                            POW2=pow2_scales, BK=BK)
    return q, s_buf.t()


def quantize_128x128(w: torch.Tensor, pow2_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.contiguous()
    *lead, N, K = w.shape
    E = w.shape[0] if lead else 1
    q = torch.empty_like(w, dtype=FP8)
    s = torch.empty(*lead, N // BLOCK, K // BLOCK, dtype=torch.float32, device=w.device)
    _quant_128x128_kernel[(E * (N // BLOCK), K // BLOCK)](w, q, s, N, K, POW2=pow2_scales, num_warps=8)
    return q, s


# ---------------------------------------------------------------------------------------------
# grouped GEMMs
# ---------------------------------------------------------------------------------------------
def _configs(pairs):
    if _INTERPRET:  # the CPU interpreter: one small config, no tuning
        return [triton.Config({"BM": 32, "BN": 64} if "BM" in pairs[0][0] else {"BN": 64, "BK": 64})]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in pairs]


_MM_CONFIGS = _configs([({"BM": 128, "BN": 128}, 8, 3), ({"BM": 128, "BN": 128}, 4, 4),
                        ({"BM": 64, "BN": 128}, 4, 4), ({"BM": 128, "BN": 64}, 4, 4),
                        ({"BM": 64, "BN": 256}, 8, 3), ({"BM": 128, "BN": 256}, 8, 3),
                        ({"BM": 64, "BN": 64}, 4, 5)])
_WG_CONFIGS = _configs([({"BN": 128, "BK": 128}, 8, 3), ({"BN": 128, "BK": 128}, 4, 4),
                        ({"BN": 64, "BK": 128}, 4, 4), ({"BN": 128, "BK": 64}, 4, 4)])


@triton.autotune(configs=_MM_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_mm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, starts_ptr, ends_ptr, N, K, E,
                       stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k,
                       E_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    eidx = tl.arange(0, E_P2)
    starts = tl.load(starts_ptr + eidx, mask=eidx < E, other=0)
    ends = tl.load(ends_ptr + eidx, mask=eidx < E, other=0)
    tiles = (ends - starts + BM - 1) // BM
    cum = tl.cumsum(tiles, axis=0)
    if t >= tl.sum(tiles, axis=0):
        return
    e = tl.sum((cum <= t).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(eidx < e, tiles, 0), axis=0)
    row0 = tl.sum(tl.where(eidx == e, starts, 0), axis=0) + (t - first_tile) * BM
    row_end = tl.sum(tl.where(eidx == e, ends, 0), axis=0)
    rm = row0 + tl.arange(0, BM)
    mmask = rm < row_end
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rk = tl.arange(0, 128)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * N * K + rn[None, :].to(tl.int64) * K + rk[:, None]
    sa_ptrs = sa_ptr + rm.to(tl.int64) * stride_sa_m
    sb_ptrs = sb_ptr + e * stride_sb_e + (rn // 128) * stride_sb_n  # one 128x128 block scale per column
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, K // 128):
        a = tl.load(a_ptrs, mask=mmask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
        sa = tl.load(sa_ptrs + kb * stride_sa_k, mask=mmask, other=0.0)
        sb = tl.load(sb_ptrs + kb * stride_sb_k, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        a_ptrs += 128
        b_ptrs += 128
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.autotune(configs=_WG_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_wgrad_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, starts_ptr, ends_ptr, N, K, Mp,
                          stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m,
                          BN: tl.constexpr, BK: tl.constexpr):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rk = pid_k * BK + tl.arange(0, BK)
    kmask = rk < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for mb in range(start // 128, (end + 127) // 128):  # 128-token slabs overlapping expert e
        rm = mb * 128 + tl.arange(0, 128)
        mvalid = (rm >= start) & (rm < end)
        # whole slabs are loaded (no mask along the contiguous token dim, so the loads vectorize and
        # pipeline); tokens of the neighbouring experts are zeroed in A, which zeroes their products
        a = tl.load(a_ptr + rn[:, None].to(tl.int64) * Mp + rm[None, :], mask=nmask[:, None], other=0.0)
        a = tl.where(mvalid[None, :], a, tl.zeros_like(a))
        b = tl.load(b_ptr + rk[None, :].to(tl.int64) * Mp + rm[:, None], mask=kmask[None, :], other=0.0)
        sa = tl.load(sa_ptr + rn * stride_sa_n + mb * stride_sa_m, mask=nmask, other=0.0)
        sb = tl.load(sb_ptr + rk * stride_sb_k + mb * stride_sb_m, mask=kmask, other=0.0)
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
    c_ptrs = c_ptr + e.to(tl.int64) * N * K + rn[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])


def _starts_ends(offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ends = offs_E.to(torch.int32).contiguous()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    return starts, ends


def grouped_mm(qa, sa, qb, sb, offs_E, out_dtype) -> torch.Tensor:
    """A [M, K] (1x128 scales [M, K/128], any strides) x B [E, N, K] (scales [E, N/128, K/128])."""
    qa, qb = qa.contiguous(), qb.contiguous()
    M, K = qa.shape
    E, N, _ = qb.shape
    c = torch.empty(M, N, dtype=out_dtype, device=qa.device)
    if M == 0:
        return c
    starts, ends = _starts_ends(offs_E)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) + E, triton.cdiv(N, meta["BN"]))

    _grouped_mm_kernel[grid](qa, sa, qb, sb, c, starts, ends, N, K, E,
                             sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), sb.stride(2),
                             E_P2=triton.next_power_of_2(E))
    return c


def grouped_wgrad(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype) -> torch.Tensor:
    """a_t [N, M'] and b_t [K, M'] with 1x128 scales along tokens -> dW [E, N, K]."""
    qa_t, qb_t = qa_t.contiguous(), qb_t.contiguous()
    N, Mp = qa_t.shape
    K = qb_t.shape[0]
    E = offs_E.shape[0]
    c = torch.empty(E, N, K, dtype=out_dtype, device=qa_t.device)
    starts, ends = _starts_ends(offs_E)

    def grid(meta):
        return (E, triton.cdiv(N, meta["BN"]), triton.cdiv(K, meta["BK"]))

    _grouped_wgrad_kernel[grid](qa_t, sa_t, qb_t, sb_t, c, starts, ends, N, K, Mp,
                                sa_t.stride(0), sa_t.stride(1), sb_t.stride(0), sb_t.stride(1))
    return c
