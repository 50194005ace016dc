"""Triton kernels for block-scaled FP8 on CUDA: fused quantization and grouped (MoE) GEMMs (the
grouped GEMMs run on the faster sm90 Gluon kernels of ``gluon_fp8`` where those run; these serve
other GPUs and ``fp8_gemm._USE_GLUON = False``).

Imported only when a CUDA tensor meets a Triton-capable GPU (``fp8.triton_available``).

Design note.
  * Quantization kernels compute exactly the arithmetic of ``fp8.quantize_blockwise`` (exact max,
    s = amax * fp32(1/448), IEEE division x / s, round-to-nearest-even e4m3 cast), so their output
    equals the torch ops bit for bit for finite x; they read the input once instead of ~8 unfused
    passes. 1x128 scales are written outer-dim-major ([K/128, M] in memory, returned as its
    transpose), the layout cuBLAS reads without a copy. The 128x1 kernel writes its tile
    transposed. ``quantize_dual`` does both with x read from DRAM once (1x128 needs all 128 columns
    of a row, 128x1 all 128 rows of a column, so a 128x128 tile is the unit): two programs with
    adjacent ids take the same tile, one quantization each, and the second read hits L2.
  * Cost per element: these kernels are bound by instruction issue as much as by bandwidth
    (~25 SASS instructions per element with ``div.rn``, 2 bytes read + 1 written). Three things
    keep the count down:
      - division (``FAST_DIV``): ``div.rn.f32`` is, per element, MUFU.RCP(s) and two FMAs
        refining it to y, then q = x y, r = s q - x, RN(q - y r), guarded by a range check with a
        slow-path branch. The reciprocal part depends on s only, so ``_divisor`` does it once per
        scale, and ``_fma_divide`` does per element one multiply x' = x p and the last three
        operations on x' and d = s p, where p = 2^-e for s = 1.f 2^e: d is in [1, 2) and
        x' / d = x / s exactly. Why the bits equal div.rn's: for d in [1, 2) and any x' whose
        quotient e4m3 can resolve (|x' / d| >= 2^-12), every operand and intermediate is a normal
        number far inside the range where div.rn itself takes this fast path (so it computes the
        same operations on the same values); a smaller quotient rounds to +-0 in e4m3 either way
        (the sign of x, -0 included, survives: r is d q + (-x')). A subnormal s (amax < 5e-36)
        gives d in [2^-22, 1), still far inside that range. The GPU tests and bench/fp8_probe.py
        check every bf16 value against every bf16 amax mantissa, and random fp32. Non-finite
        input: a block with amax = inf comes out NaN (div.rn: 0 or NaN).
      - power-of-two scales (``pow2_scales``, Transformer Engine's default): x / s is one multiply
        by the exact reciprocal 2^-e (``_pow2_reciprocal``, from the exponent bits), rounded once
        like the division: the same bits, ~25% less time for the dual kernel.
      - no clamp to +-448: |x / s| <= 448 (1 + 2^-23) and the e4m3 cast saturates anyway.
      - the transposed store: rows are loaded permuted so that each thread holds consecutive rows
        (``_load_rows``), and the register shuffle before the transposed store moves 8-byte
        words, not single bytes.
  * Grouped GEMM (fprop / dgrad): rows of A are sorted by expert, ``offs`` the cumulative counts.
    Each expert's rows are cut into BM-row tiles; program (t, n) finds its expert by a prefix sum
    over the per-expert tile counts (computed in the kernel: no host sync, no per-expert launch),
    then runs  acc += dot(qA_slab, qB_slab) * sA[m, kb] * sB[e, n/128, kb]  over the 128-deep K
    slabs (the fp32 promotion after every slab, as in DeepSeek-V3). The grid has
    cdiv(M, BM) + E row tiles (an upper bound), the surplus programs exit at once.
  * Grouped wgrad: program (e, n, k) accumulates over the 128-token slabs that overlap expert e's
    rows; a slab may straddle two experts (its 128x1 scale then covers both), the other expert's
    tokens are zeroed in the A operand. No token padding per expert is needed. Both operands come
    in through host-side TMA descriptors (``triton.tools.tensor_descriptor``). With ``PEEL`` only
    the first and last slab of an expert are masked and the slabs inside it go from shared memory
    straight into the MMA (1.3-1.4x faster when experts span several slabs; the autotuner picks
    PEEL per shape).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from miles_lib.precision.fp8 import BLOCK, FP8, WGRAD_GRAD_BLOCKS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------
FAST_DIV = True  # divide through _fma_divide: bit-equal to div.rn on the H200 (bench/fp8_probe.py: every
# finite bf16 value x every bf16 amax mantissa, 134M random fp32 values) and 1.5x faster for 128x1_t


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    s = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _rcp_approx(d):
    """MUFU.RCP, the hardware reciprocal estimate that div.rn.f32 starts from."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _divisor(s, FAST_DIV: tl.constexpr):
    """What dividing by the scales s [R] needs, computed once per scale. With FAST_DIV: (d, y, p)
    with p = 2^-e for s = 1.f 2^e (from the exponent bits; 2^127 for a subnormal s), d = s p in
    [1, 2), and y = y0 + y0 (1 - d y0), y0 = rcp.approx(d): the refined reciprocal of div.rn.f32's
    fast path. Without: placeholders."""
    if FAST_DIV:
        p = (0x7F000000 - (s.to(tl.int32, bitcast=True) & 0x7F800000)).to(tl.float32, bitcast=True)
        d = s * p
        y0 = _rcp_approx(d)
        y = tl.fma(y0, tl.fma(-d, y0, 1.0), y0)
    else:
        d, y, p = s, s, s
    return d, y, p


@triton.jit
def _fma_divide(x, d, y, p, AXIS: tl.constexpr):
    """x / s (s = d / p per row (AXIS=1) or column (AXIS=0)) rounded to nearest, bit for bit
    tl.math.div_rn: div.rn.f32's fast path on x' = x p and d, its reciprocal step done per scale:
        q = x' y,  r = d q - x' (exact),  x / s = x' / d = RN(q - y r)
    4 FP instructions per element instead of ~10 and a branch (why it is exact: the module note)."""
    d_b = tl.broadcast_to(tl.expand_dims(d, AXIS), x.shape)
    y_b = tl.broadcast_to(tl.expand_dims(y, AXIS), x.shape)
    x = x * tl.broadcast_to(tl.expand_dims(p, AXIS), x.shape)
    q = x * y_b
    r = tl.fma(d_b, q, x * -1.0)  # x * -1 (not -x, which is 0 - x): a free operand negation
    return tl.fma(-y_b, r, q)


@triton.jit
def _pow2_reciprocal(s):
    """1 / s exactly for s = 2^e (e in [-126, 127], what _scale(POW2) gives), from the exponent bits."""
    return (0x7F000000 - s.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _divide(x, s, AXIS: tl.constexpr, POW2: tl.constexpr, FAST_DIV: tl.constexpr):
    """x [R, C] fp32 / s [R] broadcast along AXIS, IEEE round-to-nearest.

    POW2 scales: one multiply by the exact reciprocal 2^-e (x 2^-e rounded once is x / s rounded
    once: the same bits as div.rn, subnormal quotients included). Otherwise ``_divisor`` per scale
    and ``_fma_divide`` per element (FAST_DIV), or div.rn."""
    if POW2:
        q = x * tl.broadcast_to(tl.expand_dims(_pow2_reciprocal(s), AXIS), x.shape)
    elif FAST_DIV:
        d, y, p = _divisor(s, FAST_DIV)
        q = _fma_divide(x, d, y, p, AXIS)
    else:
        q = tl.math.div_rn(x, tl.broadcast_to(tl.expand_dims(s, AXIS), x.shape))
    return q


@triton.jit
def _quantize(x, AXIS: tl.constexpr, POW2: tl.constexpr, FAST_DIV: tl.constexpr):
    """x [R, C] -> (x / s in fp32, s): one scale per row (AXIS=1) or per column (AXIS=0).

    No clamp to +-448: |x / s| <= 448 (1 + 2^-23) for finite x, and the e4m3 cast (cvt.rn.satfinite)
    rounds every such value as clamp-then-cast does."""
    s = _scale(tl.max(tl.abs(x), axis=AXIS), POW2)
    return _divide(x.to(tl.float32), s, AXIS, POW2, FAST_DIV), s


@triton.jit
def _load_rows(x_ptr, row0, rk, M, K, stride_xm, ROWS: tl.constexpr, G: tl.constexpr, EVICT: tl.constexpr):
    """x[row0 : row0 + ROWS, rk] as a [ROWS, C] tensor in x's dtype, zeros past M (and K).

    The rows are loaded in the order i -> i // G + (ROWS / G) (i % G) and put back in order by a
    reshape / permute that moves no data: with G = the rows one register repetition of the load
    layout covers, each thread then holds ROWS / G consecutive rows, so the transposed store packs
    them into 8-byte shared-memory stores instead of one store per byte (a speed hint only: any G
    dividing ROWS gives the same tensor)."""
    REPS: tl.constexpr = ROWS // G
    i = tl.arange(0, ROWS)
    rows = row0 + i // G + REPS * (i % G)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + rk[None, :],
                mask=(rows[:, None] < M) & (rk[None, :] < K), other=0.0, eviction_policy=EVICT)
    return tl.reshape(tl.permute(tl.reshape(x, (REPS, G, rk.shape[0])), (1, 0, 2)), (ROWS, rk.shape[0]))


@triton.jit
def _store_1x128(q_ptr, s_ptr, q, s, rm, kb, M, LDQ, row_end):
    """Rows rm (those < row_end) of the 128 columns of K block kb: q into the [M, K] output (row
    stride LDQ), s into the [K/128, M] scales (outer-dim-major)."""
    rk = kb * 128 + tl.arange(0, 128)
    mmask = rm < row_end
    tl.store(q_ptr + rm[:, None].to(tl.int64) * LDQ + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mmask[:, None])
    tl.store(s_ptr + kb * M + rm, s, mask=mmask)


@triton.jit
def _store_128x1_t(qt_ptr, q, rm, rk, K, Mp):
    """q [R, C] (rows rm, columns rk of x) into the transposed [K, Mp] output at [rk, rm] (rows past
    M hold the zero padding); cast to e4m3 before the transpose, so the shuffle moves bytes."""
    tl.store(qt_ptr + rk[:, None].to(tl.int64) * Mp + rm[None, :], tl.trans(q.to(qt_ptr.dtype.element_ty)),
             mask=rk[:, None] < K)


@triton.jit
def _quant_1x128_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, POW2: tl.constexpr, FAST_DIV: tl.constexpr,
                        BM: tl.constexpr):
    """Program (m, kb): rows [m BM, (m + 1) BM) x the 128 columns of K block kb."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = kb * 128 + tl.arange(0, 128)
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0)
    q, s = _quantize(x, 1, POW2, FAST_DIV)
    _store_1x128(q_ptr, s_ptr, q, s, rm, kb, M, K, M)


@triton.jit
def _quant_128x1_t_kernel(x_ptr, q_ptr, s_ptr, M, K, Mp, stride_xm, POW2: tl.constexpr, FAST_DIV: tl.constexpr,
                          BK: tl.constexpr, G: tl.constexpr):
    """Program (mb, k): the 128 rows of M block mb x columns [k BK, (k + 1) BK)."""
    mb = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = mb * 128 + tl.arange(0, 128)
    rk = pid_k * BK + tl.arange(0, BK)
    x = _load_rows(x_ptr, mb * 128, rk, M, K, stride_xm, 128, G, "")
    q, s = _quantize(x, 0, POW2, FAST_DIV)
    _store_128x1_t(q_ptr, q, rm, rk, K, Mp)
    tl.store(s_ptr + mb * K + rk, s, mask=rk < K)


@triton.jit
def _store_block_scale(s_ptr, sp_ptr, row, col, ncols, SP_ROW, s):
    """One 128x128 block's scale s at [row, col] of the [rows, ncols] scales (s_ptr) and of their
    copy with rows padded to SP_ROW (sp_ptr, cuBLAS's 128x128 scale layout); a row's last block
    also writes 1 into that row's padding."""
    tl.store(s_ptr + row * ncols + col, s)
    tl.store(sp_ptr + row * SP_ROW + col, s)
    if col == ncols - 1:
        pad = tl.arange(0, 4)
        tl.store(sp_ptr + row * SP_ROW + ncols + pad, tl.full((4,), 1.0, tl.float32), mask=ncols + pad < SP_ROW)


@triton.jit
def _quant_dual_tile_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, Mp, stride_xm, POW2: tl.constexpr,
                            FAST_DIV: tl.constexpr, G: tl.constexpr):
    """Program (kb, mb): one 128x128 tile of x, loaded once and held in registers -> both
    quantizations."""
    kb = tl.program_id(0)
    mb = tl.program_id(1)
    rm = mb * 128 + tl.arange(0, 128)
    rk = kb * 128 + tl.arange(0, 128)
    x = _load_rows(x_ptr, mb * 128, rk, M, K, stride_xm, 128, G, "")
    q, s = _quantize(x, 1, POW2, FAST_DIV)
    _store_1x128(q_ptr, s_ptr, q, s, rm, kb, M, K, M)
    qt, st = _quantize(x, 0, POW2, FAST_DIV)
    _store_128x1_t(qt_ptr, qt, rm, rk, K, Mp)
    tl.store(st_ptr + mb * K + rk, st)


@triton.jit
def _quant_dual_paired_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, stp_ptr, M, K, Mp, stride_xm, LDQ, LDST, STP_ROW,
                              table_ptr, POW2: tl.constexpr, FAST_DIV: tl.constexpr, G: tl.constexpr,
                              SUB: tl.constexpr, T_2D: tl.constexpr, RSUB: tl.constexpr, GROUPED: tl.constexpr):
    """Programs 2t and 2t + 1 take the same 128x128 tile t: the first quantizes it 1x128 (in
    RSUB-row slices), the second 128x1 (transposed, in SUB-column slices). The pair runs at about the same time, so the
    second read of the tile is served by L2: x comes from DRAM once, and each program holds only
    one quantization's registers (the tile kernel holds both).

    T_2D: the transposed copy has one scale per 128x128 block instead (the block's amax from a
    first pass over the slices, also served by L2), written to st [K/128, Mp/128] and to stp, its
    rows padded to STP_ROW with ones (cuBLAS's 128x128 scale layout).

    LDQ, LDST: row strides of q and of the 128x1 scale buffer [M'/128, K] (K and K when the outputs
    are x's own; larger when they are column slices of a stack, ``quantize_dual_stacked``).

    GROUPED (expert-sorted rows): tile row mb is the mb-th 128-row tile of the experts' own tiles
    (row mb of ``expert_tile_table``), so the transposed copy's 128-token tiles never span two
    experts: its column block mb holds that tile's rows, zeros past the expert's end; tiles past
    the last expert's write nothing."""
    pid = tl.program_id(0)
    t = pid // 2
    nkb = K // 128
    mb = t // nkb
    kb = t % nkb
    rm = mb * 128 + tl.arange(0, 128)  # the tile's columns in the transposed copy
    if GROUPED:
        if tl.load(table_ptr + 3 * mb) < 0:
            return
        row0 = tl.load(table_ptr + 3 * mb + 1)
        row_end = tl.load(table_ptr + 3 * mb + 2)
    else:
        row0 = mb * 128
        row_end = M
    if pid % 2 == 0:
        rk_rows = kb * 128 + tl.arange(0, 128)
        for r in tl.static_range(128 // RSUB):
            rm_r = row0 + r * RSUB + tl.arange(0, RSUB)
            x_rows = tl.load(x_ptr + rm_r[:, None].to(tl.int64) * stride_xm + rk_rows[None, :],
                             mask=rm_r[:, None] < row_end, other=0.0)
            q, s = _quantize(x_rows, 1, POW2, FAST_DIV)
            _store_1x128(q_ptr, s_ptr, q, s, rm_r, kb, M, LDQ, row_end)
    elif T_2D:
        amax = 0.0
        for h in tl.static_range(128 // SUB):
            rk_cols = kb * 128 + h * SUB + tl.arange(0, SUB)
            x_cols = _load_rows(x_ptr, mb * 128, rk_cols, M, K, stride_xm, 128, G, "")
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x_cols), axis=0), axis=0).to(tl.float32))
        s_blk = _scale(amax, POW2)
        st = tl.zeros((SUB,), tl.float32) + s_blk
        for h in tl.static_range(128 // SUB):
            rk_cols = kb * 128 + h * SUB + tl.arange(0, SUB)
            x_cols = _load_rows(x_ptr, mb * 128, rk_cols, M, K, stride_xm, 128, G, "")
            qt = _divide(x_cols.to(tl.float32), st, 0, POW2, FAST_DIV)
            _store_128x1_t(qt_ptr, qt, rm, rk_cols, K, Mp)
        _store_block_scale(st_ptr, stp_ptr, kb, mb, Mp // 128, STP_ROW, s_blk)
    else:
        for h in tl.static_range(128 // SUB):
            rk_cols = kb * 128 + h * SUB + tl.arange(0, SUB)
            x_cols = _load_rows(x_ptr, row0, rk_cols, row_end, K, stride_xm, 128, G, "")
            qt, st = _quantize(x_cols, 0, POW2, FAST_DIV)
            _store_128x1_t(qt_ptr, qt, rm, rk_cols, K, Mp)
            tl.store(st_ptr + mb * LDST + rk_cols, st)


@triton.jit
def _block_divide(w, s, POW2: tl.constexpr):
    """w [128, 128] / s (one scale), rounded as div.rn; a multiply by 2^-e for POW2 scales."""
    if POW2:
        q = w * _pow2_reciprocal(s)
    else:
        q = tl.clamp(tl.math.div_rn(w, tl.zeros((128, 128), tl.float32) + s), -448.0, 448.0)
    return q


@triton.jit
def _quant_128x128_kernel(w_ptr, q_ptr, s_ptr, sp_ptr, qt_ptr, st_ptr, stp_ptr, N, K, SP_ROW, STP_ROW,
                          POW2: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Program (e N/128 + nb, kb): one 128x128 block of w [E, N, K] -> q and its scale, into s
    [E, N/128, K/128] and into sp, the same rows padded to SP_ROW (a multiple of 4; the last block
    of a row writes 1 into the padding). With TRANSPOSE also q^T [E, K, N], st and stp likewise."""
    pid = tl.program_id(0)  # over E * N/128 row blocks
    kb = tl.program_id(1)
    nbs = N // 128
    kbs = K // 128
    e = pid // nbs
    nb = pid % nbs
    rn = nb * 128 + tl.arange(0, 128)
    rk = kb * 128 + tl.arange(0, 128)
    offs = e.to(tl.int64) * N * K + rn[:, None].to(tl.int64) * K + rk[None, :]
    w = tl.load(w_ptr + offs).to(tl.float32)
    s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    q = _block_divide(w, s, POW2)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty))
    _store_block_scale(s_ptr, sp_ptr, pid, kb, kbs, SP_ROW, s)
    # q^T: the block read again along N (from L1/L2) and quantized with the same s. Not tl.trans(q):
    # on the H200 (Triton 3.6) that transpose of the e4m3 block wrote corrupt rows here.
    if TRANSPOSE:
        wt = tl.load(w_ptr + e.to(tl.int64) * N * K + rn[None, :].to(tl.int64) * K + rk[:, None]).to(tl.float32)
        qt = _block_divide(wt, s, POW2)
        tl.store(qt_ptr + e.to(tl.int64) * N * K + rk[:, None].to(tl.int64) * N + rn[None, :],
                 qt.to(qt_ptr.dtype.element_ty))
        _store_block_scale(st_ptr, stp_ptr, e * kbs + kb, nb, nbs, STP_ROW, s)


def _row_major_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fast_div(fast_div: bool | None) -> bool:
    return FAST_DIV if fast_div is None else fast_div


def _rows_per_rep(x: torch.Tensor, block_k: int, num_warps: int, rows: int) -> int:
    """G for _load_rows: the rows one repetition of the load layout covers (16-byte vectors along
    the block_k columns, the warp's remaining lanes and the warps down the rows)."""
    lanes_k = min(32, max(1, block_k * x.element_size() // 16))
    return min(rows, 32 // lanes_k * num_warps)


def _alloc_1x128(M: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """q [M, K] and the scales buffer [K/128, M] (returned as its transpose: outer-dim-major)."""
    return (torch.empty(M, K, dtype=FP8, device=device),
            torch.empty(K // BLOCK, M, dtype=torch.float32, device=device))


def _alloc_128x1_t(M: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """q^T [K, M'] and the scales buffer [M'/128, K] (returned as its transpose), M' = M rounded up
    to 128."""
    Mp = -(-M // BLOCK) * BLOCK
    return (torch.empty(K, Mp, dtype=FP8, device=device),
            torch.empty(Mp // BLOCK, K, dtype=torch.float32, device=device))


def quantize_1x128(x: torch.Tensor, pow2_scales: bool, *, block_m: int = 32, num_warps: int = 4,
                   fast_div: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K], s [M, K/128]); one program per block_m rows x 128 columns."""
    x = _row_major_input(x)
    M, K = x.shape
    q, s_buf = _alloc_1x128(M, K, x.device)
    _quant_1x128_kernel[(triton.cdiv(M, block_m), K // BLOCK)](
        x, q, s_buf, M, K, x.stride(0), POW2=pow2_scales, FAST_DIV=_fast_div(fast_div), BM=block_m,
        num_warps=num_warps)
    return q, s_buf.t()


def quantize_128x1_t(x: torch.Tensor, pow2_scales: bool, *, block_k: int = 64, num_warps: int = 4,
                     fast_div: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q^T [K, M'], s [K, M'/128]); one program per 128 rows x block_k columns."""
    x = _row_major_input(x)
    M, K = x.shape
    qt, st_buf = _alloc_128x1_t(M, K, x.device)
    Mp = qt.shape[1]
    _quant_128x1_t_kernel[(Mp // BLOCK, triton.cdiv(K, block_k))](
        x, qt, st_buf, M, K, Mp, x.stride(0), POW2=pow2_scales, FAST_DIV=_fast_div(fast_div), BK=block_k,
        G=_rows_per_rep(x, block_k, num_warps, BLOCK), num_warps=num_warps)
    return qt, st_buf.t()


def quantize_dual(x: torch.Tensor, pow2_scales: bool, *, paired_sub: int | None = 64, num_warps: int = 4,
                  max_registers: int | None = None, fast_div: bool | None = None, t_blocks: str = "128x1",
                  row_sub: int = 64, out: tuple | None = None, offs_E: torch.Tensor | None = None):
    """(quantize_1x128(x), quantize_128x1_t(x)) bit for bit, reading x from DRAM once (K a multiple
    of 128). ``t_blocks="128x128"``: the transposed copy in 128x128 blocks instead, scales
    [K/128, M'/128] (the dy operand of a wgrad on the faster 128x128 x 1x128 cuBLAS kernel; paired
    kernel only).

    ``paired_sub`` (32, 64 or 128): two programs per 128x128 tile, one per quantization, the 128x1
    one in slices of that many columns, the 1x128 one in slices of ``row_sub`` rows
    (``_quant_dual_paired_kernel``); None: one program per tile
    holding it in registers for both (``_quant_dual_tile_kernel``, best with num_warps=8,
    max_registers=128). max_registers caps registers per thread (ptxas maxnreg). The defaults were
    the fastest on the H200 at every measured shape (bench/fp8_probe.py: 32768x7168 0.317 ms vs
    0.354 with whole 128-row tiles in the 1x128 program, 0.371 for the two kernels and 0.41 for the
    tile kernel; 32768x2048 0.096 vs 0.107 / 0.111 / 0.122; power-of-two scales 5% faster than the
    whole tiles; fp8_probe_quant_rows*_h200.json).

    ``offs_E`` (cumulative expert ends of expert-sorted rows): the transposed copy in the
    expert-aligned layout of ``fp8.quantize_act_dual_grouped`` (128x1, paired kernel, own
    outputs); its columns past the last expert's tiles are left unwritten."""
    grouped = offs_E is not None
    if (t_blocks not in WGRAD_GRAD_BLOCKS or (t_blocks == "128x128" and paired_sub is None)
            or (grouped and (t_blocks != "128x1" or paired_sub is None or out is not None))):
        raise ValueError(f"quantize_dual: t_blocks={t_blocks!r} with paired_sub={paired_sub!r}, grouped={grouped}; use "
                         "'128x1', or '128x128' with the paired kernel (grouped: '128x1', paired, no out=)")
    x = _row_major_input(x)
    M, K = x.shape
    t_2d = t_blocks == "128x128"
    if out is not None:  # slices of stacked buffers (quantize_dual_stacked); paired kernel only
        q, s_buf, qt, st_buf, stp_buf = out
    else:
        q, s_buf = _alloc_1x128(M, K, x.device)
        # grouped: room for every expert's partial last tile (M' = 128 (ceil(M / 128) + E))
        qt, st_buf = _alloc_128x1_t(M + BLOCK * offs_E.shape[0] if grouped else M, K, x.device)
        st_buf, stp_buf = _scales_128x128([], K // BLOCK, qt.shape[1] // BLOCK, x.device) if t_2d else (st_buf, st_buf)
    Mp = qt.shape[1]
    table = expert_tile_table(offs_E, Mp // BLOCK) if grouped else q  # (an unused pointer when not grouped)
    args = (x, q, s_buf, qt, st_buf)
    meta = {"POW2": pow2_scales, "FAST_DIV": _fast_div(fast_div), "num_warps": num_warps, "maxnreg": max_registers}
    tiles = (K // BLOCK) * (Mp // BLOCK)
    if paired_sub is not None:
        _quant_dual_paired_kernel[(2 * tiles,)](*args, stp_buf, M, K, Mp, x.stride(0), q.stride(0), st_buf.stride(0),
                                                stp_buf.stride(0), table,
                                                G=_rows_per_rep(x, paired_sub, num_warps, BLOCK), SUB=paired_sub,
                                                T_2D=t_2d, RSUB=row_sub, GROUPED=grouped, **meta)
    else:
        if out is not None:
            raise ValueError("quantize_dual: out= needs the paired kernel (paired_sub)")
        _quant_dual_tile_kernel[(K // BLOCK, Mp // BLOCK)](*args, M, K, Mp, x.stride(0),
                                                           G=_rows_per_rep(x, BLOCK, num_warps, BLOCK), **meta)
    return (q, s_buf.t()), (qt, st_buf if t_2d else st_buf.t())


def quantize_dual_stacked(xs: list[torch.Tensor], pow2_scales: bool, t_blocks: str = "128x1"):
    """``quantize_dual(torch.cat(xs, 1))`` without the concatenation: each x_i [M, K_i] (K_i a
    multiple of 128, so no tile spans two of them) is quantized into its column slice of the
    stacked outputs (q [M, sum K_i], 1x128 scales, q^T [sum K_i, M'] and its 128x1 or 128x128
    scales) by the paired kernel. The stacked output grads of linears that share an input."""
    M, Ks = xs[0].shape[0], [x.shape[1] for x in xs]
    if any(x.shape[0] != M or K % BLOCK for x, K in zip(xs, Ks)):
        raise ValueError(f"quantize_dual_stacked: parts {[list(t.shape) for t in xs]}; need one row count and "
                         "column counts that are multiples of 128")
    Kt, dev = sum(Ks), xs[0].device
    q, s_buf = _alloc_1x128(M, Kt, dev)
    qt, st_buf = _alloc_128x1_t(M, Kt, dev)
    Mp = qt.shape[1]
    t_2d = t_blocks == "128x128"
    if t_2d:
        st_buf, stp_buf = _scales_128x128([], Kt // BLOCK, Mp // BLOCK, dev)
    off = 0
    for x, K in zip(xs, Ks):
        blk = slice(off // BLOCK, (off + K) // BLOCK)
        outs = ((q[:, off:off + K], s_buf[blk], qt[off:off + K], st_buf[blk], stp_buf[blk]) if t_2d else
                (q[:, off:off + K], s_buf[blk], qt[off:off + K], st_buf[:, off:off + K], st_buf[:, off:off + K]))
        quantize_dual(x, pow2_scales, t_blocks=t_blocks, out=outs)
        off += K
    return (q, s_buf.t()), (qt, st_buf if t_2d else st_buf.t())


def _scales_128x128(lead: list[int], rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales [*lead, rows, cols] and a copy with its rows padded to a multiple of 4 (padding
    1), cuBLAS's 128x128 scale layout, attached as ``s._cublas_padded`` for ``fp8_gemm``."""
    s = torch.empty(*lead, rows, cols, dtype=torch.float32, device=device)
    s._cublas_padded = torch.empty(*lead, rows, -(-cols // 4) * 4, dtype=torch.float32, device=device)
    return s, s._cublas_padded


def quantize_128x128(w: torch.Tensor, pow2_scales: bool, with_transpose: bool = False):
    """w [..., N, K] -> (q, s [..., N/128, K/128]); with_transpose also (q^T [..., K, N], s^T) from
    the same read of w (the dgrad operand), returned as ((q, s), (q^T, s^T))."""
    w = w.contiguous()
    *lead, N, K = w.shape
    E = w.shape[0] if lead else 1
    q = torch.empty_like(w, dtype=FP8)
    s, sp = _scales_128x128(lead, N // BLOCK, K // BLOCK, w.device)
    if with_transpose:
        qt = torch.empty(*lead, K, N, dtype=FP8, device=w.device)
        st, stp = _scales_128x128(lead, K // BLOCK, N // BLOCK, w.device)
    else:
        qt, st, stp = q, s, sp  # not written (TRANSPOSE=False)
    _quant_128x128_kernel[(E * (N // BLOCK), K // BLOCK)](w, q, s, sp, qt, st, stp, N, K, sp.shape[-1], stp.shape[-1],
                                                          POW2=pow2_scales, TRANSPOSE=with_transpose, num_warps=8)
    return ((q, s), (qt, st)) if with_transpose else (q, s)


@triton.jit
def _transpose_kernel(x_ptr, y_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """Program (r, c): the [BR, BC] tile of x [R, C] at (r BR, c BC) into y [C, R] (through shared
    memory, so both the load and the store are coalesced)."""
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rr[:, None] < R) & (cc[None, :] < C)
    x = tl.load(x_ptr + rr[:, None].to(tl.int64) * C + cc[None, :], mask=mask)
    tl.store(y_ptr + cc[None, :].to(tl.int64) * R + rr[:, None], x, mask=mask)


def transpose(x: torch.Tensor) -> torch.Tensor:
    """x [R, C] (row-major, 2- or 4-byte elements) -> x^T as a row-major [C, R] tensor; ~4x faster
    than ``x.t().contiguous()`` (a strided elementwise copy) on the H200."""
    x = x.contiguous()
    R, C = x.shape
    y = torch.empty(C, R, dtype=x.dtype, device=x.device)
    _transpose_kernel[(triton.cdiv(R, 64), triton.cdiv(C, 64))](x, y, R, C, BR=64, BC=64, num_warps=4)
    return y


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


def _wgrad_block_shapes(nargs) -> None:
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config's BN / BK."""
    nargs["a_desc"].block_shape = [nargs["BN"], 128]
    nargs["b_desc"].block_shape = [nargs["BK"], 128]


_WG_CONFIGS = [triton.Config(meta, num_warps=w, pre_hook=_wgrad_block_shapes) for meta, w in (
    # PEEL: only the (at most two) token slabs that straddle an expert boundary are masked; faster
    # when experts span several slabs, slower when most slabs are boundaries (bench/fp8_grouped_probe.py)
    [({"BN": 64, "BK": 128, "STAGES": 3, "PEEL": True}, 4)] if _INTERPRET else
    [({"BN": bn, "BK": 128, "STAGES": st, "PEEL": peel}, w)
     for bn, w in ((64, 4), (128, 8)) for st in (3, 4) for peel in (True, False)])]


@triton.jit
def _expert_tile(t, starts_ptr, ends_ptr, E, E_P2: tl.constexpr, BM: tl.constexpr):
    """Row tile t of the expert-sorted rows -> (valid, expert e, its first row, e's end row): a
    prefix sum over the per-expert counts of BM-row tiles (t past the last tile: valid is False)."""
    eidx = tl.arange(0, E_P2)
    starts = tl.load(starts_ptr + eidx, mask=eidx < E, other=0)
    ends = tl.load(ends_ptr + eidx, mask=eidx < E, other=0)
    tiles = (ends - starts + BM - 1) // BM
    cum = tl.cumsum(tiles, axis=0)
    valid = t < tl.sum(tiles, axis=0)
    e = tl.sum((cum <= t).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(eidx < e, tiles, 0), axis=0)
    row0 = tl.sum(tl.where(eidx == e, starts, 0), axis=0) + (t - first_tile) * BM
    row_end = tl.sum(tl.where(eidx == e, ends, 0), axis=0)
    return valid, e, row0, row_end


@triton.autotune(configs=_MM_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_mm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, starts_ptr, ends_ptr, N, K, E,
                       stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k,
                       E_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    valid, e, row0, row_end = _expert_tile(tl.program_id(0), starts_ptr, ends_ptr, E, E_P2, BM)
    if not valid:
        return
    pid_n = tl.program_id(1)
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
def _grouped_wgrad_kernel(a_desc, sa_ptr, b_desc, sb_ptr, c_ptr, starts_ptr, ends_ptr, N, K,
                          stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m,
                          BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, PEEL: tl.constexpr):
    e = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    k0 = tl.program_id(2) * BK
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    rn = n0 + tl.arange(0, BN)
    nmask = rn < N
    rk = k0 + tl.arange(0, BK)
    kmask = rk < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    if PEEL:
        for mb in tl.range((start + 127) // 128, end // 128, num_stages=STAGES):  # slabs inside the expert
            acc = _wgrad_slab(acc, a_desc, b_desc, sa_ptr, sb_ptr, rn, rk, nmask, kmask, mb, start, end,
                              stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, n0, k0, MASK=False)
        head = start // 128
        tail = end // 128
        if (start % 128 != 0) & (end > start):
            acc = _wgrad_slab(acc, a_desc, b_desc, sa_ptr, sb_ptr, rn, rk, nmask, kmask, head, start, end,
                              stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, n0, k0, MASK=True)
        if (end % 128 != 0) & (end > start) & ((tail != head) | (start % 128 == 0)):
            acc = _wgrad_slab(acc, a_desc, b_desc, sa_ptr, sb_ptr, rn, rk, nmask, kmask, tail, start, end,
                              stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, n0, k0, MASK=True)
    else:
        for mb in tl.range(start // 128, (end + 127) // 128, num_stages=STAGES):
            acc = _wgrad_slab(acc, a_desc, b_desc, sa_ptr, sb_ptr, rn, rk, nmask, kmask, mb, start, end,
                              stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, n0, k0, MASK=True)
    c_ptrs = c_ptr + e.to(tl.int64) * N * K + rn[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])


@triton.jit
def _wgrad_slab(acc, a_desc, b_desc, sa_ptr, sb_ptr, rn, rk, nmask, kmask, mb, start, end,
                stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, n0, k0, MASK: tl.constexpr):
    """acc + the 128-token slab mb's product; MASK: zero the tokens outside [start, end) in A."""
    a = a_desc.load([n0, mb * 128])
    if MASK:
        rm = mb * 128 + tl.arange(0, 128)
        a = tl.where(((rm >= start) & (rm < end))[None, :], a, tl.zeros_like(a))
    b = b_desc.load([k0, mb * 128])
    sa = tl.load(sa_ptr + rn * stride_sa_n + mb * stride_sa_m, mask=nmask, other=0.0)
    sb = tl.load(sb_ptr + rk * stride_sb_k + mb * stride_sb_m, mask=kmask, other=0.0)
    return acc + tl.dot(a, b.T) * (sa[:, None] * sb[None, :])


def _starts_ends(offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ends = offs_E.to(torch.int32).contiguous()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    return starts, ends


@triton.jit
def _tile_table_kernel(starts_ptr, ends_ptr, out_ptr, E, E_P2: tl.constexpr, BM: tl.constexpr):
    """Row tile t -> (expert, or -1 past the last tile; first row; the expert's end row)."""
    t = tl.program_id(0)
    valid, e, row0, row_end = _expert_tile(t, starts_ptr, ends_ptr, E, E_P2, BM)
    tl.store(out_ptr + 3 * t, tl.where(valid, e, -1))
    tl.store(out_ptr + 3 * t + 1, row0)
    tl.store(out_ptr + 3 * t + 2, row_end)


def expert_tile_table(offs_E: torch.Tensor, T: int, BM: int = BLOCK) -> torch.Tensor:
    """int32 [T, 3]: the experts' own BM-row tiles in order (T an upper bound, cdiv(M, BM) + E),
    each as (expert or -1 past the last, first row, the expert's end row); computed on the device
    once per call instead of by every program of the kernel that reads it (no host sync)."""
    starts, ends = _starts_ends(offs_E)
    table = torch.empty(T, 3, dtype=torch.int32, device=offs_E.device)
    E = offs_E.shape[0]
    _tile_table_kernel[(T,)](starts, ends, table, E, E_P2=triton.next_power_of_2(E), BM=BM)
    return table


def _mm_output(qa, qb, out_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b contiguous, the uninitialised y [M, N]) for a grouped fprop / dgrad kernel."""
    qa, qb = qa.contiguous(), qb.contiguous()
    return qa, qb, torch.empty(qa.shape[0], qb.shape[1], dtype=out_dtype, device=qa.device)


def grouped_mm(qa, sa, qb, sb, offs_E, out_dtype) -> torch.Tensor:
    """A [M, K] (1x128 scales [M, K/128], any strides) x B [E, N, K] (scales [E, N/128, K/128])."""
    qa, qb, c = _mm_output(qa, qb, out_dtype)
    (M, K), (E, N, _) = qa.shape, qb.shape
    if M == 0:
        return c
    starts, ends = _starts_ends(offs_E)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) + E, triton.cdiv(N, meta["BN"]))

    _grouped_mm_kernel[grid](qa, sa, qb, sb, c, starts, ends, N, K, E,
                             sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), sb.stride(2),
                             E_P2=triton.next_power_of_2(E))
    return c


def _wgrad_output(qa_t, qb_t, offs_E, out_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, b_t contiguous, the uninitialised dW [E, N, K]) for a grouped wgrad kernel."""
    qa_t, qb_t = qa_t.contiguous(), qb_t.contiguous()
    c = torch.empty(offs_E.shape[0], qa_t.shape[0], qb_t.shape[0], dtype=out_dtype, device=qa_t.device)
    return qa_t, qb_t, c


def grouped_wgrad(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype) -> torch.Tensor:
    """a_t [N, M'] and b_t [K, M'] with 1x128 scales along tokens -> dW [E, N, K]."""
    qa_t, qb_t, c = _wgrad_output(qa_t, qb_t, offs_E, out_dtype)
    if qa_t.shape[1] == 0:  # no tokens: a TMA descriptor cannot span an empty dim
        return c.zero_()
    E, N, K = c.shape
    starts, ends = _starts_ends(offs_E)
    # block shapes are placeholders: the autotune pre-hook sets them per config
    a_desc = TensorDescriptor.from_tensor(qa_t, [128, 128])
    b_desc = TensorDescriptor.from_tensor(qb_t, [128, 128])

    def grid(meta):
        return (E, triton.cdiv(N, meta["BN"]), triton.cdiv(K, meta["BK"]))

    _grouped_wgrad_kernel[grid](a_desc, sa_t, b_desc, sb_t, c, starts, ends, N, K,
                                sa_t.stride(0), sa_t.stride(1), sb_t.stride(0), sb_t.stride(1))
    return c
