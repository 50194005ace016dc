"""Block-scaled FP8 GEMMs: C = A B^T from quantized operands, dense and grouped (MoE experts).

Design note.
  * Every GEMM takes quantized operands (q e4m3, s fp32) from ``fp8.py`` and contracts over the
    last dim of both, K, with K a multiple of 128, so each 128-wide K slab of A and B has ONE
    scale per row of A and one per row-block of B:
        C[m, n] = sum_kb  s_A[m, kb] * s_B[n, kb] * sum_{k in kb} q_A[m, k] q_B[n, k]
    (fp32 accumulation; the inner sum runs on FP8 tensor cores on the GPU).
  * A has 1x128 tiles ([M, K/128] scales), or 128x128 blocks ([M/128, K/128]; dy^T in a wgrad
    with ``wgrad_grad_blocks="128x128"``). B has 128x128 blocks (a weight; fprop and dgrad) or 1x128
    tiles ([N, K/128] scales; the wgrad GEMM, whose K is the token dim). cuBLAS takes 1x128 x
    128x128, 128x128 x 1x128 and 1x128 x 1x128; the block sizes are read off the scale shapes.
  * Backends. ``reference``: dequantize both operands, multiply in fp32 — the CPU path and the
    exactness reference. CUDA dense: cuBLAS block-wise scaling, through ``torch._scaled_mm`` (the
    recipe inferred from the scale shapes) or ``torch.nn.functional.scaled_mm`` (ScalingType
    BlockWise1x128 / BlockWise128x128), whichever reproduces the reference (see ``_apis``). cuBLAS wants A row-major, B column-major
    (B^T row-major, i.e. our [N, K] tensor), 1x128 scales outer-dim-major (stride (1, M)) and
    128x128 scales row-major; the exact layout a given torch accepts is found once per device by
    checking the candidates against the reference on a small problem (so torch 2.11 and 2.13
    both work). CUDA grouped: one launch for all experts (a per-expert loop of GEMMs is ~10x
    slower than a grouped GEMM at MoE shapes): the sm90 Gluon kernels of ``gluon_fp8`` where
    they run, else the Triton kernels of ``triton_fp8``.
  * Accuracy on the GPU: vs the reference only the accumulation differs. Hopper FP8 tensor cores
    accumulate a 128-deep slab with reduced precision before the fp32 promotion (DeepSeek-V3
    reports ~14 bits); measured relative Frobenius error vs the fp32 reference is ~1.3e-4, the
    tests bound it by 1e-3.
"""

from __future__ import annotations

import functools

import torch

from miles_lib.precision.fp8 import BLOCK, dequantize_blockwise, triton_available

_USE_FAST_PATHS = True  # tests flip this to compare the GPU kernels with the reference on the GPU
_USE_GLUON = True  # grouped GEMMs on sm90: the Gluon kernels (False: the Triton kernels)


# ---------------------------------------------------------------------------------------------
# reference (CPU, and the exactness check)
# ---------------------------------------------------------------------------------------------
def fp8_mm_reference(qa, sa, qb, sb, out_dtype=torch.float32) -> torch.Tensor:
    """A B^T: dequantize both operands, multiply in fp32."""
    return (dequantize_blockwise(qa, sa) @ dequantize_blockwise(qb, sb).T).to(out_dtype)


def _segments(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_fp8_mm_reference(qa, sa, qb, sb, offs_E, out_dtype=torch.float32) -> torch.Tensor:
    """Rows a[offs[e-1]:offs[e]] times b[e]^T for each expert e (b [E, N, K]), dequantized, fp32."""
    a = dequantize_blockwise(qa, sa)
    b = dequantize_blockwise(qb, sb)
    out = a.new_zeros(a.shape[0], b.shape[1])
    for e, (i, j) in enumerate(_segments(offs_E)):
        if j > i:
            out[i:j] = a[i:j] @ b[e].T
    return out.to(out_dtype)


def grouped_fp8_wgrad_reference(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype=torch.float32) -> torch.Tensor:
    """dW[e] = A_e B_e^T contracted over the tokens of expert e: a_t [N, M'], b_t [K, M'] (1x128
    tiles along tokens) -> [E, N, K]."""
    a, b = dequantize_blockwise(qa_t, sa_t), dequantize_blockwise(qb_t, sb_t)
    segs = _segments(offs_E)
    out = a.new_zeros(len(segs), a.shape[0], b.shape[0])
    for e, (i, j) in enumerate(segs):
        if j > i:
            out[e] = a[:, i:j] @ b[:, i:j].T
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# cuBLAS (dense)
# ---------------------------------------------------------------------------------------------
def _outer_major(s: torch.Tensor) -> torch.Tensor:
    """[R, C] with stride (1, R) (column-major), the 1x128 scale layout cuBLAS reads."""
    return s if s.stride() == (1, s.shape[0]) or s.shape[1] == 1 else s.t().contiguous().t()


def _row_major_padded(s: torch.Tensor, keep_padding: bool) -> torch.Tensor:
    """[R, C] row-major with the row length rounded up to 4 (torch 2.11 wants the K blocks of a
    128x128 scale padded so); the padding columns are kept in the shape or only in the stride.
    The weight quantization kernel writes this copy next to the scales (``s._cublas_padded``);
    other scales are copied here."""
    buf = getattr(s, "_cublas_padded", None)
    if buf is None:
        buf = s.new_ones(s.shape[0], -(-s.shape[1] // 4) * 4)
        buf[:, : s.shape[1]] = s
    return buf if keep_padding else buf[:, : s.shape[1]]


_NUM_CANDIDATES = {"a_tiles": 1, "a_blocks": 4, "b_tiles": 2, "b_blocks": 4}


def _candidate_a(sa: torch.Tensor, blocks: bool, i: int) -> torch.Tensor:
    """Candidate ``i`` of the scale_a layouts for a = A [M, K] row-major."""
    if not blocks:  # 1x128 tiles: outer-dim-major [M, K/128]
        return _outer_major(sa)
    return (sa.contiguous(), _row_major_padded(sa, True), _row_major_padded(sa, False), _outer_major(sa))[i]


def _candidate_b(sb: torch.Tensor, rowwise: bool, i: int) -> torch.Tensor:
    """Candidate ``i`` of the scale_b layouts for b = B^T ([K, N], column-major); only the one the
    probe picked is built per GEMM (each candidate costs kernels and host time)."""
    if rowwise:  # 1x128 tiles of B [N, K]: scale_b^T must be [N, K/128] outer-dim-major
        return sb.t() if i == 1 else _outer_major(sb).t()
    if i == 0:
        return _row_major_padded(sb, True).t()
    if i == 1:
        return sb.contiguous().t()
    if i == 2:
        return _row_major_padded(sb, False).t()
    return sb.t().contiguous()


def _call(api: str, a, b, scale_a, scale_b, blocks_a: bool, rowwise_b: bool, out_dtype):
    if api == "F.scaled_mm":
        import torch.nn.functional as F
        st = F.ScalingType
        return F.scaled_mm(a, b, scale_a, st.BlockWise128x128 if blocks_a else st.BlockWise1x128, scale_b,
                           st.BlockWise1x128 if rowwise_b else st.BlockWise128x128, output_dtype=out_dtype)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


_CUBLAS: dict[tuple[str, bool, bool], tuple[str, int, int] | None] = {}


def _apis() -> list[str]:
    """Entry points in the order the probe tries them. ``torch._scaled_mm`` infers the recipe from
    the scale shapes: on torch 2.11 (H200) it serves the 1x128 x 1x128 wgrad, and it accepts
    128x128 weight scales without an error but computes something else, so the probe's reference
    check, not the absence of an error, decides (there ``F.scaled_mm`` is picked)."""
    import torch.nn.functional as F
    return ["_scaled_mm"] + (["F.scaled_mm"] if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType") else [])


def _probe(device: torch.device, blocks_a: bool, rowwise_b: bool) -> tuple[str, int, int] | None:
    """(api, scale_a layout index, scale_b layout index) that reproduces the reference on a small
    problem, or None."""
    from miles_lib.precision.fp8 import quantize_blockwise
    g = torch.Generator().manual_seed(0)
    K = 768  # 6 K blocks: not a multiple of 4, so a layout that needs padding shows itself
    qa, sa = quantize_blockwise(torch.randn(256, K, generator=g).to(device), BLOCK if blocks_a else 1, BLOCK)
    qb, sb = quantize_blockwise(torch.randn(384, K, generator=g).to(device), 1 if rowwise_b else BLOCK, BLOCK)
    ref = fp8_mm_reference(qa, sa, qb, sb)
    for api in _apis():
        for i in range(_NUM_CANDIDATES["a_blocks" if blocks_a else "a_tiles"]):
            for j in range(_NUM_CANDIDATES["b_tiles" if rowwise_b else "b_blocks"]):
                try:
                    out = _call(api, qa, qb.t(), _candidate_a(sa, blocks_a, i), _candidate_b(sb, rowwise_b, j),
                                blocks_a, rowwise_b, torch.float32)
                except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError):
                    continue
                if ((out.float() - ref).norm() / ref.norm()).item() < 1e-3:
                    return api, i, j
    return None


def cublas_blockwise(device: torch.device | str, rowwise_b: bool = False, blocks_a: bool = False
                     ) -> tuple[str, int, int] | None:
    """The working cuBLAS call for this device and recipe (cached), or None."""
    device = torch.device(device)
    if device.type != "cuda" or (blocks_a and not rowwise_b):
        return None
    key = (str(device), blocks_a, rowwise_b)
    if key not in _CUBLAS:
        _CUBLAS[key] = _probe(device, blocks_a, rowwise_b)
    return _CUBLAS[key]


def _cublas_mm(qa, sa, qb, sb, blocks_a: bool, rowwise_b: bool, how: tuple[str, int, int], out_dtype) -> torch.Tensor:
    M = qa.shape[0]
    pad = -M % 16  # FP8 cuBLAS wants every dim a multiple of 16 (and 16-byte aligned scale columns)
    if pad:  # (128x128 blocks of A: M is a multiple of 128 already)
        qa = torch.cat([qa, qa.new_zeros(pad, qa.shape[1])])
        sa = torch.cat([sa, sa.new_ones(pad, sa.shape[1])])
    api, i, j = how
    out = _call(api, qa.contiguous(), qb.contiguous().t(), _candidate_a(sa, blocks_a, i),
                _candidate_b(sb, rowwise_b, j), blocks_a, rowwise_b, out_dtype)
    return out[:M] if pad else out


def fp8_mm(qa, sa, qb, sb, out_dtype=torch.float32) -> torch.Tensor:
    """C = A B^T; A [M, K] 1x128- or 128x128-quantized, B [N, K] 128x128- or 1x128-quantized (from
    the scale shapes; not both 128x128).

    cuBLAS on CUDA when this torch accepts the recipe, the reference otherwise. A 128x128 x 1x128
    product that cuBLAS does not take directly runs as (B A^T)^T on the 1x128 x 128x128 kernel."""
    (M, K), N = qa.shape, qb.shape[0]
    blocks_a = M > 0 and sa.shape == (M // BLOCK, K // BLOCK) and M % BLOCK == 0
    rowwise_b = sb.shape[0] == N  # 1x128 tiles: one scale row per row of B
    if qb.shape[1] != K or not (blocks_a or sa.shape == (M, K // BLOCK)) or (blocks_a and not rowwise_b):
        raise ValueError(f"fp8_mm: A {list(qa.shape)} with scales {list(sa.shape)} does not match B {list(qb.shape)} "
                         f"with scales {list(sb.shape)} (1x128 or 128x128 blocks, not both 128x128)")
    if _USE_FAST_PATHS and qa.is_cuda and out_dtype in (torch.float32, torch.bfloat16):
        how = cublas_blockwise(qa.device, rowwise_b, blocks_a)
        if how is not None:
            return _cublas_mm(qa, sa, qb, sb, blocks_a, rowwise_b, how, out_dtype)
        if blocks_a and cublas_blockwise(qa.device, False) is not None:
            out_t = fp8_mm(qb, sb, qa, sa, out_dtype)
            if triton_available():
                from miles_lib.precision import triton_fp8
                return triton_fp8.transpose(out_t)
            return out_t.t().contiguous()
    return fp8_mm_reference(qa, sa, qb, sb, out_dtype)


# ---------------------------------------------------------------------------------------------
# grouped (MoE experts)
# ---------------------------------------------------------------------------------------------
def _triton_ok(t: torch.Tensor) -> bool:
    return _USE_FAST_PATHS and t.is_cuda and triton_available()


@functools.cache
def gluon_available() -> bool:
    """``gluon_fp8`` can run here: Triton with Gluon, and an sm90 GPU (its wgmma kernels)."""
    if not (triton_available() and torch.cuda.get_device_capability() == (9, 0)):
        return False
    try:
        import miles_lib.precision.gluon_fp8  # noqa: F401
    except ImportError:
        return False
    return True


def grouped_fp8_mm(qa, sa, qb, sb, offs_E, out_dtype=torch.float32) -> torch.Tensor:
    """y[offs[e-1]:offs[e]] = A[rows of e] B[e]^T; A [M, K] 1x128, B [E, N, K] 128x128 -> [M, N]."""
    if _USE_GLUON and _triton_ok(qa) and gluon_available():
        from miles_lib.precision import gluon_fp8
        return gluon_fp8.grouped_mm(qa, sa, qb, sb, offs_E, out_dtype)
    if _triton_ok(qa):
        from miles_lib.precision import triton_fp8
        return triton_fp8.grouped_mm(qa, sa, qb, sb, offs_E, out_dtype)
    return grouped_fp8_mm_reference(qa, sa, qb, sb, offs_E, out_dtype)


def grouped_fp8_wgrad(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype=torch.float32) -> torch.Tensor:
    """dW[e] = sum over the tokens m of expert e of a_t[:, m] b_t[:, m]^T -> [E, N, K]. Any expert
    boundaries; with the expert-aligned operands of ``fp8.quantize_act_dual_grouped`` and
    ``fp8.aligned_expert_offsets`` no 128-token slab is shared, so the kernels mask nothing."""
    if _USE_GLUON and _triton_ok(qa_t) and gluon_available():
        from miles_lib.precision import gluon_fp8
        return gluon_fp8.grouped_wgrad(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype)
    if _triton_ok(qa_t):
        from miles_lib.precision import triton_fp8
        return triton_fp8.grouped_wgrad(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype)
    return grouped_fp8_wgrad_reference(qa_t, sa_t, qb_t, sb_t, offs_E, out_dtype)
