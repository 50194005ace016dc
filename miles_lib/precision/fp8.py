"""Block-scaled FP8 (e4m3) quantization: the tensor formats of the DeepSeek-V3 recipe.

Design note.
  * Format: e4m3 (1 sign, 4 exponent, 3 mantissa bits; finite max 448) for every GEMM operand —
    weights, activations and gradients alike (fine-grained blocks give gradients their range, so
    e5m2 is not needed). Per block b:  s_b = amax_b * (1/448) in fp32,  q = e4m3(clamp(x / s_b)),
    x ~ q * s_b. A block of zeros gets s_b = 1 (any scale reproduces it). ``pow2_scales`` rounds
    s_b up to a power of two (exact rescaling, slightly coarser), done on the fp32 bits so it is
    exact on every device.
  * Blocks (shape legend: M tokens, K contracted dim, N output dim, E experts):
      act_1x128    x_MK  -> q_MK,  s [M, K/128]         one token x 128 channels (fprop, dgrad)
      weight_128   w_NK  -> q_NK,  s [N/128, K/128]     (also [E, N, K] -> s [E, N/128, K/128])
      act_128x1_t  x_MK  -> q_KM', s [K, M'/128]        128 tokens x one channel, returned
                   TRANSPOSED (it is the operand of the wgrad GEMM, contracted over tokens);
                   M' = M rounded up to 128, the padding tokens are zeros (they change neither
                   an amax nor a sum).
      act_128x128_t x_MK -> q_KM', s [K/128, M'/128]   the same with one scale per 128x128 block
                   (optional wgrad operand for dy, ``Fp8Config.wgrad_grad_blocks``).
  * Bit-identity: CPU (torch ops) and GPU (the Triton kernels in ``triton_fp8``, or the same torch
    ops) compute the same fp32 arithmetic — exact max, one rounded multiply for the scale, an IEEE
    division, round-to-nearest-even into e4m3 — so q and s agree to the last bit (GPU test).
    ``amax * (1/448)`` and not ``amax / 448``: CUDA turns division by a Python scalar into a
    multiplication by its reciprocal; spelling the multiplication keeps CPU and GPU identical.
  * Layout: scales are returned in their logical shape; memory layout is free (the Triton kernels
    write the outer-dim-major layout cuBLAS wants for 1x128 scales, the torch path row-major).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch

from miles_lib.config import ConfigBase, check

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128

_USE_TRITON = True  # tests flip this to compare the Triton kernels with the torch ops on GPU
WGRAD_GRAD_BLOCKS = ("128x1", "128x128")  # how dy is tiled for the weight-gradient GEMM (Fp8Config)
_DUAL_IMPL = "fused"  # "fused" | "two_kernels": how quantize_act_dual runs on CUDA (see there)


def round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s for positive normal fp32 s (exact: mantissa bits rounded up)."""
    bits = s.contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def block_scale(amax: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """s = amax * (1/448) (1 for an all-zero block), optionally rounded up to a power of two."""
    s = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    return round_up_pow2(s) if pow2_scales else s


@functools.cache
def triton_available() -> bool:
    """Triton is installed and the GPU has FP8 tensor cores (sm89+; the H200 is sm90)."""
    return (importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (8, 9))


def _triton_ok(x: torch.Tensor) -> bool:
    return _USE_TRITON and x.is_cuda and triton_available()


def _check_divisible(shape, br: int, bc: int, what: str) -> None:
    R, C = shape[-2], shape[-1]
    if R % br or C % bc:
        raise ValueError(f"FP8 {what} quantization needs the last two dims {list(shape[-2:])} divisible by "
                         f"[{br}, {bc}]; size the layer to multiples of 128 or pad it explicitly")


def quantize_blockwise(x: torch.Tensor, block_rows: int, block_cols: int, pow2_scales: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., R, C] -> (e4m3 [..., R, C], fp32 scales [..., R/br, C/bc]) with x ~ q * s per block.

    The reference implementation (torch ops, any device)."""
    _check_divisible(x.shape, block_rows, block_cols, f"{block_rows}x{block_cols}")
    *lead, R, C = x.shape
    xb = x.float().reshape(*lead, R // block_rows, block_rows, C // block_cols, block_cols)
    s = block_scale(xb.abs().amax(dim=(-3, -1)), pow2_scales)
    q = (xb / s[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(x.shape), s


def dequantize_blockwise(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., R, C] e4m3 with scales [..., R/br, C/bc] -> q * s per block (block shape from the shapes)."""
    *lead, R, C = q.shape
    nr, nc = s.shape[-2], s.shape[-1]
    x = q.float().reshape(*lead, nr, R // nr, nc, C // nc) * s.float()[..., :, None, :, None]
    return x.reshape(q.shape).to(dtype)


def quantize_act_1x128(x: torch.Tensor, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K], s [M, K/128]): one scale per token per 128 channels."""
    if x.dim() != 2:
        raise ValueError(f"quantize_act_1x128 expects a 2-D [tokens, channels] tensor, got {list(x.shape)}")
    _check_divisible(x.shape, 1, BLOCK, "1x128")
    if _triton_ok(x):
        from miles_lib.precision import triton_fp8
        return triton_fp8.quantize_1x128(x, pow2_scales)
    return quantize_blockwise(x, 1, BLOCK, pow2_scales)


def quantize_weight_128x128(w: torch.Tensor, pow2_scales: bool = False, with_transpose: bool = False):
    """w [N, K] or [E, N, K] -> (q, s [..., N/128, K/128]): one scale per 128x128 block.

    ``with_transpose``: ((q, s), (q^T, s^T)), also the dgrad operand (the last two dims swapped; a
    block's scale does not depend on the orientation, so it is the transpose of the first, bit for
    bit). On CUDA one kernel writes both from one read of w."""
    _check_divisible(w.shape, BLOCK, BLOCK, "128x128")
    if _triton_ok(w) and w.dim() in (2, 3):
        from miles_lib.precision import triton_fp8
        return triton_fp8.quantize_128x128(w, pow2_scales, with_transpose)
    q, s = quantize_blockwise(w, BLOCK, BLOCK, pow2_scales)
    if with_transpose:
        return (q, s), (q.transpose(-2, -1).contiguous(), s.transpose(-2, -1).contiguous())
    return q, s


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x [M, ...] with zero rows appended up to a multiple of ``multiple``."""
    extra = -x.shape[0] % multiple
    return x if extra == 0 else torch.cat([x, x.new_zeros(extra, *x.shape[1:])], 0)


def quantize_act_128x1_t(x: torch.Tensor, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q^T [K, M'], s [K, M'/128]): one scale per 128 tokens per channel, transposed.

    M' = M rounded up to 128 (zero tokens appended). This is the operand layout of the
    weight-gradient GEMM dW = dy^T x, which contracts over tokens."""
    if x.dim() != 2:
        raise ValueError(f"quantize_act_128x1_t expects a 2-D [tokens, channels] tensor, got {list(x.shape)}")
    if _triton_ok(x):
        from miles_lib.precision import triton_fp8
        return triton_fp8.quantize_128x1_t(x, pow2_scales)
    return quantize_blockwise(pad_rows(x, BLOCK).t(), 1, BLOCK, pow2_scales)


def quantize_act_128x128_t(x: torch.Tensor, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q^T [K, M'], s [K/128, M'/128]): one scale per 128 tokens x 128 channels,
    transposed (M' = M rounded up to 128, zero tokens appended). The coarser wgrad operand of
    ``WGRAD_GRAD_BLOCKS`` "128x128"."""
    if x.dim() != 2:
        raise ValueError(f"quantize_act_128x128_t expects a 2-D [tokens, channels] tensor, got {list(x.shape)}")
    if _triton_ok(x):  # the fused kernel; its 1x128 half is dropped
        _check_divisible(x.shape, 1, BLOCK, "1x128")
        from miles_lib.precision import triton_fp8
        return triton_fp8.quantize_dual(x, pow2_scales, t_blocks="128x128")[1]
    return quantize_blockwise(pad_rows(x, BLOCK).t(), BLOCK, BLOCK, pow2_scales)


def quantize_act_dual(x: torch.Tensor, pow2_scales: bool = False, t_blocks: str = "128x1"):
    """(quantize_act_1x128(x), quantize_act_128x1_t(x)): both operands of x's GEMMs in a training
    step (fprop and wgrad for an input, dgrad and wgrad for an output grad). On CUDA, ``_DUAL_IMPL``
    picks ``triton_fp8.quantize_dual`` (x read from DRAM once; the faster at every shape the H200
    probe measured, see there) or the two Triton kernels (x read twice). Same bits either way.
    ``t_blocks="128x128"``: the transposed copy is ``quantize_act_128x128_t(x)`` instead."""
    if (_DUAL_IMPL == "fused" or t_blocks == "128x128") and _triton_ok(x) and x.dim() == 2:
        _check_divisible(x.shape, 1, BLOCK, "1x128")
        from miles_lib.precision import triton_fp8
        return triton_fp8.quantize_dual(x, pow2_scales, t_blocks=t_blocks)
    return quantize_act_1x128(x, pow2_scales), quantize_act_t(x, pow2_scales, t_blocks)


def aligned_expert_offsets(offs_E: torch.Tensor) -> torch.Tensor:
    """Cumulative expert ends (int32) -> the same with every expert's token count rounded up to a
    multiple of 128: the expert segments of the expert-aligned transposed operands
    (``quantize_act_dual_grouped``), which the grouped wgrad contracts over."""
    counts = torch.diff(offs_E.to(torch.int64), prepend=offs_E.new_zeros(1, dtype=torch.int64))
    return ((counts + BLOCK - 1) // BLOCK * BLOCK).cumsum(0).to(torch.int32)


def quantize_act_dual_grouped(x: torch.Tensor, offs_E: torch.Tensor, pow2_scales: bool = False):
    """Expert-sorted rows x [M, K] (expert e: rows [offs[e-1], offs[e])) -> (quantize_act_1x128(x),
    (q^T [K, M'], s [K, M'/128])): the wgrad operand transposed in 128x1 tiles that never span two
    experts. Expert e's tokens start at column ``aligned_expert_offsets(offs_E)[e - 1]`` (a multiple
    of 128) and are followed by zeros up to the next multiple of 128, so each expert is quantized
    as if alone and the grouped wgrad needs no masking. M' = 128 (ceil(M / 128) + E), room for
    every expert's partial tile without reading the counts on the host (the MoE layer stays
    CUDA-graph capturable); the columns past the last expert's tiles are unused (zeros on the
    CPU, not written on the GPU). Memory: the forward saves x's copy for the backward, at 32768
    tokens and 128 experts 1.5x the unaligned width (64 experts: 1.25x), still 0.75x (0.63x) the
    bytes of the bf16 x that bf16 training saves. The CPU path checks that
    offs_E is non-decreasing and ends at M; on the GPU that would cost a host sync, and the MoE
    router's offsets are trusted."""
    if x.dim() != 2 or offs_E.dim() != 1:
        raise ValueError(f"quantize_act_dual_grouped: x {list(x.shape)} must be [tokens, channels] and offs_E "
                         f"{list(offs_E.shape)} the experts' cumulative ends")
    _check_divisible(x.shape, 1, BLOCK, "1x128")
    if _triton_ok(x):
        from miles_lib.precision import triton_fp8
        return triton_fp8.quantize_dual(x, pow2_scales, offs_E=offs_E)
    M, K = x.shape
    ends = offs_E.tolist()
    if any(b < a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] != M):
        raise ValueError(f"quantize_act_dual_grouped: offs_E {ends} must be non-decreasing cumulative expert ends "
                         f"reaching the {M} rows of x")
    Mp = BLOCK * (-(-M // BLOCK) + offs_E.shape[0])
    xp = x.new_zeros(Mp, K)
    start = 0
    for end, aligned_start in zip(ends, [0] + aligned_expert_offsets(offs_E).tolist()[:-1]):
        xp[aligned_start:aligned_start + end - start] = x[start:end]
        start = end
    return quantize_act_1x128(x, pow2_scales), quantize_act_128x1_t(xp, pow2_scales)


def quantize_act_dual_stacked(xs: list[torch.Tensor], pow2_scales: bool = False, t_blocks: str = "128x1"):
    """``quantize_act_dual(torch.cat(xs, dim=1))``: the output grads of linears that share an input,
    stacked. Every x_i's width is a multiple of 128, so no tile spans two parts and the result is
    their separate quantizations side by side; on CUDA each part is quantized into its slice of the
    stacked buffers (no concatenated copy of the parts)."""
    for x in xs:
        _check_divisible(x.shape, 1, BLOCK, "1x128")
    if _triton_ok(xs[0]) and all(x.dim() == 2 for x in xs):
        from miles_lib.precision import triton_fp8
        return triton_fp8.quantize_dual_stacked(xs, pow2_scales, t_blocks)
    return quantize_act_dual(torch.cat(xs, dim=1), pow2_scales, t_blocks)


def quantize_act_t(x: torch.Tensor, pow2_scales: bool = False, t_blocks: str = "128x1"):
    """The transposed wgrad operand of x in ``t_blocks``: ``quantize_act_128x1_t`` or
    ``quantize_act_128x128_t``."""
    if t_blocks not in WGRAD_GRAD_BLOCKS:
        raise ValueError(f"quantize_act_t: t_blocks={t_blocks!r}, expected one of {list(WGRAD_GRAD_BLOCKS)}")
    return (quantize_act_128x1_t if t_blocks == "128x1" else quantize_act_128x128_t)(x, pow2_scales)


def every_bf16_block() -> torch.Tensor:
    """[R, 128] bf16 rows [amax, 127 values with |v| <= amax] over every bf16 amax mantissa (at
    2^0, 2^-100, 2^100, and every subnormal amax) and every finite bf16 value under it: all the
    (scale, value) pairs a bf16 1x128 block can hold, up to the exponent shift the GPU kernels'
    division normalizes away. The exhaustive input the GPU quantization is checked on against
    ``quantize_blockwise`` (tests, bench/fp8_probe.py)."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    values = values[torch.isfinite(values)]
    mantissas = 1 + torch.arange(128, dtype=torch.float32) / 128
    amaxes = torch.cat([mantissas * 2.0 ** e for e in (0, -100, 100)] + [torch.arange(1, 128) * 2.0 ** -133])
    rows = []
    for amax in amaxes.tolist():
        v = values[values.abs() <= amax]
        v = torch.cat([v, v.new_zeros(-v.numel() % 127)]).view(-1, 127)
        rows.append(torch.cat([v.new_full((v.shape[0], 1), amax), v], 1))
    return torch.cat(rows).bfloat16()


@dataclasses.dataclass
class Fp8Config(ConfigBase):
    """Block-scaled FP8 training / rollout (DeepSeek-V3 recipe)."""

    pow2_scales: bool = False  # round every block scale up to a power of two
    # tiles of the output gradient dy in the weight-gradient GEMM of the dense layers: "128x1" (one
    # scale per channel per 128 tokens, DeepSeek-V3) or "128x128" blocks (coarser; the GEMM then runs
    # on fprop's ~1.4x faster cuBLAS kernel). The grouped experts always use 128x1.
    wgrad_grad_blocks: str = "128x1"
    # which parts of the decoder run FP8 GEMMs; router, norms, embeddings and lm_head never do
    modules: list[str] = dataclasses.field(default_factory=lambda: list(FP8_MODULES))
    # linears that read the same input (q/k/v, dense gate/up) run as one FP8 linear over their
    # stacked weights: x and dy quantized once, one GEMM per direction (False: each alone)
    share_input: bool = True

    def __post_init__(self) -> None:
        check(isinstance(self.pow2_scales, bool), "Fp8Config", "pow2_scales", self.pow2_scales, "a bool")
        check(isinstance(self.share_input, bool), "Fp8Config", "share_input", self.share_input, "a bool")
        check(self.wgrad_grad_blocks in WGRAD_GRAD_BLOCKS, "Fp8Config", "wgrad_grad_blocks", self.wgrad_grad_blocks,
              f"one of {list(WGRAD_GRAD_BLOCKS)}")
        bad = [m for m in self.modules if m not in FP8_MODULES]
        check(not bad and len(set(self.modules)) == len(self.modules), "Fp8Config", "modules", self.modules,
              f"distinct names from {list(FP8_MODULES)}")


FP8_MODULES = ("attention", "dense_mlp", "experts")
