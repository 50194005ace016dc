"""Hopper (sm90) grouped block-scaled FP8 GEMMs in Gluon (fprop / dgrad and wgrad): warp-specialized,
persistent.

Imported only when ``fp8_gemm.gluon_available()`` (Triton with Gluon, an sm90 GPU); otherwise the
grouped experts run on the Triton kernels of ``triton_fp8``.

Design note.
  * Same contract as ``triton_fp8.grouped_mm`` (fprop y = x W_e^T and dgrad dx = dy W_e over the
    expert-sorted rows): C[m, n] = sum_kb sA[m, kb] sB[e, n/128, kb] (qA[m, kb] . qB[e, n, kb]),
    the fp32 promotion after every 128-deep K slab (DeepSeek-V3's recipe).
  * Why not plain Triton: there, each slab's ``tl.dot`` is waited for before its product can be
    scaled, and every warp of the CTA moves in lockstep (the shared-memory ring is recycled behind
    a CTA-wide barrier), so the tensor cores idle while the scaling, the waits and the loads run;
    the pointer-load version is not even software-pipelined (a 128x128 tile of 64-bit pointers per
    operand does not fit the registers). Both reach ~460-510 TFLOP/s, no faster than bf16.
  * Here (the DeepGEMM arrangement, written with Gluon's explicit TMA / mbarrier / wgmma):
      - one producer warp streams A [64, 128] x 2 and B [BN, 128] slabs through a STAGES-deep
        shared-memory ring with TMA (``ready[s]``: the bytes landed);
      - two consumer warpgroups, 64 rows of the 128-row tile each, issue the slab's wgmma
        (m64 n128 k32 x 4), wait for it, release the stage (``empty[s]``, two arrivals) and
        promote: acc += P * sA[rows] * sB;
      - split products (``SPLIT``, the default for fprop / dgrad): each slab's product is two
        column halves (m64 n64, own commit groups), so a warpgroup always has one half in flight
        while it promotes the other (wait(1), not wait(0)). Both warpgroups wait on the same ring
        slot, so without this they drift into lockstep and promote while the tensor cores idle.
        The slabs go in unrolled chunks of 8 (then 4, 2, 1): in a run-time loop whose back-edge
        carries in-flight wgmmas ptxas serializes every wgmma (advisory C7514), and each
        promotion is pinned before the next wgmma into its product's registers (else LLVM sinks
        it, the product needs two register sets and the copy of in-flight registers serializes
        them too). Halves cost A's shared-memory reads twice; measured faster at every expert
        shape but the smallest;
      - persistent: one CTA per SM walks the (row tile, column tile) list; the producer runs
        ahead into the next tile while the consumers store the previous one.
  * Row tiles: each expert's rows are cut into 128-row tiles; a tiny Triton kernel writes the
    table (expert, first row, expert end row) on the device (no host sync). A tile's TMA loads may
    read rows of the next expert (or zeros past M); those rows are computed and not stored.
  * Scales: each consumer thread loads its two rows' sA and the tile's sB one slab ahead.
  * Output: a 64-row block that lies inside its expert (or runs past M, which TMA clips) goes out
    by an asynchronous TMA store, overlapping the next tile; an expert's last block, whose rows
    past the expert belong to the next one, by masked 16-byte stores.
  * Wgrad (``grouped_wgrad``, same contract as ``triton_fp8.grouped_wgrad``): tile (expert, 128
    rows of dW, 128 columns); the ring carries the 128-token slabs that overlap the expert; the
    promotion multiplies by the slab's row (dy) and column (x) scales. A slab shared with the
    neighbouring expert (its 128x1 scales cover both) has the other expert's tokens zeroed in the
    consumer's own shared-memory copy of A before the wgmma (the expert-aligned operands of
    ``fp8.quantize_act_dual_grouped``, which the FP8 grouped linear uses, share none); an expert
    without tokens stores zeros. The output blocks never cross experts, so all of them leave
    through TMA.
  * Measured (H200, bench/results/README.md "Grouped experts: split products ..."): fprop / dgrad
    with split products 650-820 TFLOP/s at the expert shapes (550-720 whole), 960-1070 with one
    expert of 32768 rows (cuBLAS's dense block-scaled GEMM: 1080-1250); the wgrad on the
    expert-aligned operands ``fp8_grouped_linear`` gives it (nothing masked) 440-610, vs 425-580
    for bf16 ``torch._grouped_mm``. Tried and dropped: a second whole-width product
    register set (spills; C7515), 256-wide tiles (two 128-column products; spills, slower for
    dgrad), the two warpgroups issuing their wgmmas strictly in turn through a pair of mbarriers
    (5-8% slower: the tensor cores do not run one warpgroup's queued wgmmas before the other's),
    split products in the wgrad (slower: its per-column x scales cost 32 registers more).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from miles_lib.precision.triton_fp8 import (
    _mm_output,
    _starts_ends,
    _wgrad_output,
    expert_tile_table,
)

_BM = 128  # rows per tile: two consumer warpgroups of 64
_BN = 128  # one weight-block column per tile (one sB per slab)


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, tile_ptr, num_tiles, NT, N, KB):
    """One warp: the A (two 64-row halves) and B slabs of every tile of this CTA into the ring."""
    STAGES: gl.constexpr = b_bufs.shape[0]
    BN: gl.constexpr = b_bufs.shape[1]
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        t = tile // NT
        j = tile - t * NT
        e = gl.load(tile_ptr + 3 * t)
        row0 = gl.load(tile_ptr + 3 * t + 1)
        if e >= 0:
            for kb in range(KB):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [row0, kb * 128], ready.index(s), a_bufs.index(2 * s))
                tma.async_copy_global_to_shared(a_desc, [row0 + 64, kb * 128], ready.index(s),
                                                a_bufs.index(2 * s + 1))
                tma.async_copy_global_to_shared(b_desc, [e * N + j * BN, kb * 128], ready.index(s),
                                                b_bufs.index(s))
                it += 1


@gluon.jit
def _store_rows(c_ptr, acc, row0, row_end, col0, N):
    """acc [64, C] (wgmma layout) into c[row0 : row0 + 64, col0 : col0 + C], rows < row_end only;
    through a layout where each thread holds 8 consecutive columns (vector stores, 8 addresses
    per thread instead of one per 2 elements)."""
    C: gl.constexpr = acc.shape[1]
    out: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // C, C // 8], [4, 1], [1, 0])
    vals = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out)
    rows = row0 + gl.arange(0, 64, gl.SliceLayout(1, out))
    cols = col0 + gl.arange(0, C, gl.SliceLayout(0, out))
    ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * N, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, vals, mask=gl.expand_dims(rows < row_end, 1))


@gluon.jit
def _store_block(c_desc, c_bufs, c_ptr, acc, buf, r0, col0, row_end, M, N):
    """acc [64, C] into c[r0 : r0 + 64, col0 : col0 + C]: by an asynchronous TMA store from
    c_bufs[buf] when every row is this expert's (or past M, where TMA clips), else masked."""
    if (r0 + 64 <= row_end) | (row_end == M):
        tma.store_wait(0)  # this warpgroup's previous stores have left their buffers
        c_bufs.index(buf).store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [r0, col0], c_bufs.index(buf))
    else:  # the expert's last tile: rows past row_end belong to the next expert
        _store_rows(c_ptr, acc, r0, row_end, col0, N)


@gluon.jit
def _issue(a_bufs, b_bufs, ready, p, it, WG: gl.constexpr):
    """Wait for ring slot it's data, start its wgmma into p's registers (use_acc=False: p's values
    are not read) and return the in-flight product."""
    STAGES: gl.constexpr = b_bufs.shape[0]
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(2 * s + WG), b_bufs.index(s).permute((1, 0)), p, use_acc=False,
                         is_async=True)


@gluon.jit
def _retire(p, acc, scale, empty, it):
    """Wait for slot it's product p, release the slot to the producer and promote: acc + p * scale."""
    STAGES: gl.constexpr = empty.shape[0]
    p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
    mbarrier.arrive(empty.index(it % STAGES), count=1)
    return p, acc + p * scale


@gluon.jit
def _slab_scale(sa_ptrs, rmask, sb_ptr_e, kb, KB, stride_sa_k, stride_sb_k):
    """sA[rows, kb] sB[e, n-block, kb] as a [64, 1] column (zeros for kb >= KB: nothing is read)."""
    sa = gl.load(sa_ptrs + kb * stride_sa_k, mask=rmask & (kb < KB), other=0.0)
    return gl.expand_dims(sa, 1) * gl.load(sb_ptr_e + kb * stride_sb_k, mask=kb < KB, other=0.0)


@gluon.jit
def _mm_tile(tile, NT, tile_ptr, sa_ptr, sb_ptr, stride_sa_m, stride_sb_e, stride_sb_n, layout: gl.constexpr,
             WG: gl.constexpr):
    """Tile -> (expert or -1, column tile j, first row, the expert's end row, this warpgroup's row
    mask, its rows' sA pointers, the tile's sB pointer); rows in ``layout``'s row slice."""
    t = tile // NT
    j = tile - t * NT
    e = gl.load(tile_ptr + 3 * t)
    row0 = gl.load(tile_ptr + 3 * t + 1)
    row_end = gl.load(tile_ptr + 3 * t + 2)
    rows = row0 + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, layout))
    return (e, j, row0, row_end, rows < row_end, sa_ptr + rows * stride_sa_m,
            sb_ptr + e * stride_sb_e + j * stride_sb_n)


@gluon.jit
def _consumer(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M, N,
              KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k, WG: gl.constexpr):
    """Rows [64 WG, 64 WG + 64) of every tile of this CTA: per slab, issue its wgmma, wait, release
    the slot, promote; then store the 64 x BN block."""
    BN: gl.constexpr = b_bufs.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    p = gl.zeros([64, BN], gl.float32, mma)  # the product's registers
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        e, j, row0, row_end, rmask, sa_ptrs, sb_ptr_e = _mm_tile(tile, NT, tile_ptr, sa_ptr, sb_ptr, stride_sa_m,
                                                                 stride_sb_e, stride_sb_n, mma, WG)
        if e >= 0:
            acc = gl.zeros([64, BN], gl.float32, mma)
            sc = _slab_scale(sa_ptrs, rmask, sb_ptr_e, 0, KB, stride_sa_k, stride_sb_k)
            for kb in range(KB):
                # the next slab's scales are loaded a whole slab ahead (masked past the last one)
                sc_nxt = _slab_scale(sa_ptrs, rmask, sb_ptr_e, kb + 1, KB, stride_sa_k, stride_sb_k)
                p = _issue(a_bufs, b_bufs, ready, p, it, WG)
                p, acc = _retire(p, acc, sc, empty, it)
                sc = sc_nxt
                it += 1
            _store_block(c_desc, c_bufs, c_ptr, acc, WG, row0 + WG * 64, j * BN, row_end, M, N)
    tma.store_wait(0)


# the partitions' arguments lose constexpr-ness, so the warpgroup index is bound per function
@gluon.jit
def _consumer0(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M,
               N, KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k):
    _consumer(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M, N,
              KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k, 0)


@gluon.jit
def _consumer1(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M,
               N, KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k):
    _consumer(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M, N,
              KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k, 1)


@gluon.jit
def _retire_half(p, acc, sc, pending: gl.constexpr):
    """Wait until at most ``pending`` wgmma groups are in flight (p's is then done) and promote:
    acc + p * sc. The promotion goes through an already satisfied wait on its result, which pins
    it before the next wgmma into p's registers: sunk below that issue, p's old and new values
    would need two register sets and a copy of in-flight registers (ptxas would then serialize
    every wgmma, its C7514 advisory)."""
    p = warpgroup_mma_wait(num_outstanding=pending, deps=(p,))
    return p, warpgroup_mma_wait(num_outstanding=pending, deps=(acc + p * sc,))


@gluon.jit
def _issue_half(a_bufs, b_bufs, p, s, WG: gl.constexpr, HALF: gl.constexpr):
    """Start the wgmma of slot s's column half HALF into p (its own commit group)."""
    H: gl.constexpr = b_bufs.shape[1] // 2
    return warpgroup_mma(a_bufs.index(2 * s + WG), b_bufs.index(s).slice(HALF * H, H).permute((1, 0)), p,
                         use_acc=False, is_async=True)


@gluon.jit
def _split_slabs(a_bufs, b_bufs, ready, empty, p0, p1, acc0, acc1, sc, sa_ptrs, rmask, sb_ptr_e, kb0, KB,
                 stride_sa_k, stride_sb_k, it, WG: gl.constexpr, COUNT: gl.constexpr):
    """COUNT slabs (kb0, kb0 + 1, ...; ring positions it, it + 1, ...) with each product in two
    column halves, so that one half's wgmma is in flight while the other half is promoted:
        issue lo, hi of slab 0; [wait lo; promote; issue lo of the next slab; wait hi; release
        the slot; promote; issue hi of the next slab] x (COUNT - 1); drain
    Unrolled (COUNT is a constexpr): in a run-time loop whose back-edge carries in-flight wgmmas,
    ptxas cannot tell which group a wait retires and serializes them all (C7514). sc: slab kb0's
    scales; returns the next slab's (loaded a slab ahead, zeros past the last) with the results."""
    STAGES: gl.constexpr = b_bufs.shape[0]
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    p0 = _issue_half(a_bufs, b_bufs, p0, s, WG, 0)
    p1 = _issue_half(a_bufs, b_bufs, p1, s, WG, 1)
    for c in gl.static_range(COUNT - 1):
        sc_nxt = _slab_scale(sa_ptrs, rmask, sb_ptr_e, kb0 + c + 1, KB, stride_sa_k, stride_sb_k)
        s1 = (it + c + 1) % STAGES
        p0, acc0 = _retire_half(p0, acc0, sc, 1)  # lo of slab c done (its hi may still run)
        mbarrier.wait(ready.index(s1), ((it + c + 1) // STAGES) & 1)
        p0 = _issue_half(a_bufs, b_bufs, p0, s1, WG, 0)
        p1, acc1 = _retire_half(p1, acc1, sc, 1)  # hi of slab c done (lo of c + 1 may run)
        mbarrier.arrive(empty.index((it + c) % STAGES), count=1)
        p1 = _issue_half(a_bufs, b_bufs, p1, s1, WG, 1)
        sc = sc_nxt
    sc_nxt = _slab_scale(sa_ptrs, rmask, sb_ptr_e, kb0 + COUNT, KB, stride_sa_k, stride_sb_k)
    p0, acc0 = _retire_half(p0, acc0, sc, 1)
    p1, acc1 = _retire_half(p1, acc1, sc, 0)
    mbarrier.arrive(empty.index((it + COUNT - 1) % STAGES), count=1)
    return p0, p1, acc0, acc1, sc_nxt


_CHUNK = gl.constexpr(8)  # slabs per unrolled chunk of the split consumer (one drain per chunk)


@gluon.jit
def _consumer_split(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M,
                    N, KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k, WG: gl.constexpr):
    """``_consumer`` with each slab's product in two column halves (``_split_slabs``): the K slabs
    go in unrolled chunks of _CHUNK, the remainder in chunks of 4, 2 and 1; registers: two
    [64, BN/2] products and two [64, BN/2] accumulators."""
    BN: gl.constexpr = b_bufs.shape[1]
    H: gl.constexpr = BN // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, H, 32])
    p0 = gl.zeros([64, H], gl.float32, mma)
    p1 = gl.zeros([64, H], gl.float32, mma)
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        e, j, row0, row_end, rmask, sa_ptrs, sb_ptr_e = _mm_tile(tile, NT, tile_ptr, sa_ptr, sb_ptr, stride_sa_m,
                                                                 stride_sb_e, stride_sb_n, mma, WG)
        if e >= 0:
            acc0 = gl.zeros([64, H], gl.float32, mma)
            acc1 = gl.zeros([64, H], gl.float32, mma)
            sc = _slab_scale(sa_ptrs, rmask, sb_ptr_e, 0, KB, stride_sa_k, stride_sb_k)
            for ch in range(KB // _CHUNK):
                p0, p1, acc0, acc1, sc = _split_slabs(a_bufs, b_bufs, ready, empty, p0, p1, acc0, acc1, sc, sa_ptrs,
                                                      rmask, sb_ptr_e, ch * _CHUNK, KB, stride_sa_k, stride_sb_k, it,
                                                      WG, _CHUNK)
                it += _CHUNK
            # the remainder as chunks of 4, 2, 1 (each unrolled; nothing in flight between them)
            kb = KB - KB % _CHUNK
            for size in gl.static_range(2, -1, -1):
                if (KB - kb) >= (1 << size):
                    p0, p1, acc0, acc1, sc = _split_slabs(a_bufs, b_bufs, ready, empty, p0, p1, acc0, acc1, sc,
                                                          sa_ptrs, rmask, sb_ptr_e, kb, KB, stride_sa_k, stride_sb_k,
                                                          it, WG, 1 << size)
                    it += 1 << size
                    kb += 1 << size
            r0 = row0 + WG * 64
            _store_block(c_desc, c_bufs, c_ptr, acc0, 2 * WG, r0, j * BN, row_end, M, N)
            _store_block(c_desc, c_bufs, c_ptr, acc1, 2 * WG + 1, r0, j * BN + H, row_end, M, N)
    tma.store_wait(0)


@gluon.jit
def _consumer_split0(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT,
                     M, N, KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k):
    _consumer_split(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M,
                    N, KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k, 0)


@gluon.jit
def _consumer_split1(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT,
                     M, N, KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k):
    _consumer_split(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M,
                    N, KB, stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k, 1)


@gluon.jit
def _ring(a_desc, b_desc, c_desc, STAGES: gl.constexpr, BN: gl.constexpr):
    """Shared memory of both kernels: STAGES ring slots (A as two 64-row halves, B [BN, 128]),
    their ready / empty barriers (empty: one arrival per consumer warpgroup) and one output block
    per consumer."""
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, 64, 128], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, 128], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    CB: gl.constexpr = c_desc.block_type.shape[1]  # output block width: BN, or BN / 2 (split)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2 * (BN // CB), 64, CB], c_desc.layout)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    return a_bufs, b_bufs, ready, empty, c_bufs


@gluon.jit
def _grouped_mm_kernel(a_desc, b_desc, c_desc, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M, N, KB,
                       stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k,
                       STAGES: gl.constexpr, BN: gl.constexpr, SPLIT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr):
    a_bufs, b_bufs, ready, empty, c_bufs = _ring(a_desc, b_desc, c_desc, STAGES, BN)
    cargs = (a_bufs, b_bufs, ready, empty, c_desc, c_bufs, c_ptr, sa_ptr, sb_ptr, tile_ptr, num_tiles, NT, M, N, KB,
             stride_sa_m, stride_sa_k, stride_sb_e, stride_sb_n, stride_sb_k)
    gl.warp_specialize([
        (_consumer_split0 if SPLIT else _consumer0, cargs),
        (_consumer_split1 if SPLIT else _consumer1, cargs),
        (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, tile_ptr, num_tiles, NT, N, KB)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------
# grouped wgrad: dW[e] = A_e B_e^T over expert e's tokens (128x1 tiles along the tokens)
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _wgrad_tile(tile, NT, KT, starts_ptr, ends_ptr):
    """Tile -> (expert, n block, k block, the expert's first token, its end token)."""
    e = tile // (NT * KT)
    r = tile - e * (NT * KT)
    nb = r // KT
    return e, nb, r - nb * KT, gl.load(starts_ptr + e), gl.load(ends_ptr + e)


@gluon.jit
def _wgrad_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, starts_ptr, ends_ptr, num_tiles, NT, KT):
    """One warp: for every tile, the token slabs overlapping its expert: A [64, 128] x 2 (rows of
    dy^T) and B [128, 128] (rows of x^T) into the ring."""
    STAGES: gl.constexpr = b_bufs.shape[0]
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        _, nb, kb, start, end = _wgrad_tile(tile, NT, KT, starts_ptr, ends_ptr)
        for mb in range(start // 128, (end + 127) // 128):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [nb * 128, mb * 128], ready.index(s), a_bufs.index(2 * s))
            tma.async_copy_global_to_shared(a_desc, [nb * 128 + 64, mb * 128], ready.index(s), a_bufs.index(2 * s + 1))
            tma.async_copy_global_to_shared(b_desc, [kb * 128, mb * 128], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _wgrad_consumer(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, sa_ptr, sb_ptr, starts_ptr, ends_ptr, num_tiles,
                    NT, KT, N, stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, WG: gl.constexpr):
    """Rows [64 WG, 64 WG + 64) of every tile: per slab, wgmma, wait, release, promote with the
    row (dy) and column (x) scales of the slab; TMA-store the block (an expert without tokens
    stores zeros)."""
    STAGES: gl.constexpr = b_bufs.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
    a_regs: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])  # 16-byte rows of A
    p = gl.zeros([64, 128], gl.float32, mma)  # the product's registers
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        e, nb, kb, start, end = _wgrad_tile(tile, NT, KT, starts_ptr, ends_ptr)
        rows = nb * 128 + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, mma))
        cols = kb * 128 + gl.arange(0, 128, gl.SliceLayout(0, mma))
        acc = gl.zeros([64, 128], gl.float32, mma)
        for mb in range(start // 128, (end + 127) // 128):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a = a_bufs.index(2 * s + WG)
            b = b_bufs.index(s).permute((1, 0))
            if (mb * 128 < start) | (mb * 128 + 128 > end):
                # a slab shared with another expert: zero that expert's tokens in this warpgroup's
                # own shared-memory copy of A before the wgmma reads it
                tok = mb * 128 + gl.arange(0, 128, gl.SliceLayout(0, a_regs))
                a_in = a.load(a_regs)
                a.store(gl.where(gl.expand_dims((tok >= start) & (tok < end), 0), a_in, gl.zeros_like(a_in)))
                fence_async_shared()
            p = warpgroup_mma(a, b, p, use_acc=False, is_async=True)
            # the scales load while the wgmma runs (not live across the A operand's registers)
            sa = gl.load(sa_ptr + rows * stride_sa_n + mb * stride_sa_m)
            sb = gl.load(sb_ptr + cols * stride_sb_k + mb * stride_sb_m)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
            mbarrier.arrive(empty.index(s), count=1)
            acc = acc + (p * gl.expand_dims(sa, 1)) * gl.expand_dims(sb, 0)
            it += 1
        tma.store_wait(0)  # this warpgroup's previous store has left its buffer
        c_bufs.index(WG).store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [e * N + nb * 128 + WG * 64, kb * 128], c_bufs.index(WG))
    tma.store_wait(0)


@gluon.jit
def _wgrad_consumer0(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, sa_ptr, sb_ptr, starts_ptr, ends_ptr, num_tiles,
                     NT, KT, N, stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m):
    _wgrad_consumer(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, sa_ptr, sb_ptr, starts_ptr, ends_ptr, num_tiles,
                    NT, KT, N, stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, 0)


@gluon.jit
def _wgrad_consumer1(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, sa_ptr, sb_ptr, starts_ptr, ends_ptr, num_tiles,
                     NT, KT, N, stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m):
    _wgrad_consumer(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, sa_ptr, sb_ptr, starts_ptr, ends_ptr, num_tiles,
                    NT, KT, N, stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, 1)


@gluon.jit
def _grouped_wgrad_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, starts_ptr, ends_ptr, num_tiles, NT, KT, N,
                          stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m, STAGES: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    a_bufs, b_bufs, ready, empty, c_bufs = _ring(a_desc, b_desc, c_desc, STAGES, 128)
    cargs = (a_bufs, b_bufs, ready, empty, c_desc, c_bufs, sa_ptr, sb_ptr, starts_ptr, ends_ptr, num_tiles, NT, KT, N,
             stride_sa_n, stride_sa_m, stride_sb_k, stride_sb_m)
    gl.warp_specialize([
        (_wgrad_consumer0, cargs),
        (_wgrad_consumer1, cargs),
        (_wgrad_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, starts_ptr, ends_ptr, num_tiles, NT, KT)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


STAGES = 5  # ring slots of 32 KB (A 2 x [64, 128] + B [128, 128] e4m3); three with an fp32 output
SPLIT = True  # fprop / dgrad products in two column halves (``_consumer_split``)
_REGS = (232, 40)  # per-thread registers: consumer warpgroup, producer warp (setmaxnreg)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_GL_DTYPES = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of the 2-D tensor t with the default (widest) swizzle for its block."""
    dtype = gl.float8e4nv if t.dtype == torch.float8_e4m3fn else _GL_DTYPES[t.dtype]
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def _launch_params(c: torch.Tensor, stages: int, num_tiles: int, num_programs: int | None) -> tuple[int, int]:
    """(ring depth, persistent grid size): the two 64 KB fp32 output blocks leave room for three
    ring slots; one CTA per SM unless told otherwise, never more than the tiles."""
    if c.dtype == torch.float32:
        stages = min(stages, 3)
    return stages, min(num_programs or _num_sms(c.device.index or 0), num_tiles)


def grouped_mm(qa, sa, qb, sb, offs_E, out_dtype, stages: int = STAGES, num_programs: int | None = None,
               split: bool | None = None) -> torch.Tensor:
    """A [M, K] (1x128 scales [M, K/128], any strides) x B [E, N, K] (128x128 scales
    [E, N/128, K/128]) per expert -> [M, N]; N and K multiples of 128."""
    qa, qb, c = _mm_output(qa, qb, out_dtype)
    (M, K), (E, N, _) = qa.shape, qb.shape
    split = SPLIT if split is None else split
    if M == 0:
        return c
    T = triton.cdiv(M, _BM) + E  # an upper bound on the row tiles
    table = expert_tile_table(offs_E, T, _BM)
    NT = N // _BN
    num_tiles = T * NT
    stages, nprog = _launch_params(c, stages, num_tiles, num_programs)
    _grouped_mm_kernel[(nprog,)](_desc(qa, [64, 128]), _desc(qb.view(E * N, K), [_BN, 128]),
                                 _desc(c, [64, _BN // 2 if split else _BN]), c,
                                 sa, sb, table, num_tiles, NT, M, N, K // 128,
                                 sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), sb.stride(2),
                                 STAGES=stages, BN=_BN, SPLIT=split, CONSUMER_REGS=_REGS[0], PRODUCER_REGS=_REGS[1],
                                 num_warps=4)
    return c


def grouped_wgrad(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype, stages: int = STAGES,
                  num_programs: int | None = None) -> torch.Tensor:
    """a_t [N, M'] and b_t [K, M'] (128x1 scales along the tokens: [N, M'/128], [K, M'/128]) ->
    dW [E, N, K], dW[e] = sum over expert e's tokens m of a_t[:, m] b_t[:, m]^T (zeros for an expert
    without tokens); N and K multiples of 128. A slab shared by two experts is masked per expert;
    with 128-aligned expert boundaries (``fp8.aligned_expert_offsets``) none is."""
    qa_t, qb_t, c = _wgrad_output(qa_t, qb_t, offs_E, out_dtype)
    if qa_t.shape[1] == 0:  # no tokens: a TMA descriptor cannot span an empty dim
        return c.zero_()
    (E, N, K), starts_ends = c.shape, _starts_ends(offs_E)
    NT, KT = N // 128, K // 128
    stages, nprog = _launch_params(c, stages, E * NT * KT, num_programs)
    _grouped_wgrad_kernel[(nprog,)](_desc(qa_t, [64, 128]), _desc(qb_t, [128, 128]),
                                    _desc(c.view(E * N, K), [64, 128]),
                                    sa_t, sb_t, *starts_ends, E * NT * KT, NT, KT, N,
                                    sa_t.stride(0), sa_t.stride(1), sb_t.stride(0), sb_t.stride(1),
                                    STAGES=stages, CONSUMER_REGS=_REGS[0], PRODUCER_REGS=_REGS[1], num_warps=4)
    return c
