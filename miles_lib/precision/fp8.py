"""Block-scaled FP8 (e4m3) quantization and an FP8 linear layer (DeepSeek-V3 recipe).

Design note.
  * Format: e4m3 (3 mantissa bits, max 448) for every operand; fp32 scales s = amax / 448 per block,
    q = round_to_e4m3(x / s), x ~ q * s. A block of zeros gets s = 1 (any scale reproduces it).
    ``pow2_scales`` rounds s up to a power of two (exact rescaling, slightly coarser).
  * Blocks: activations per 1x128 tile (one token, 128 channels), weights per 128x128 block, and
    128x1 tiles (128 tokens, one channel) for the operand that is contracted over tokens in the
    weight-gradient GEMM. Every contracted dimension must be a multiple of 128 (the tiny model is
    sized so; other shapes raise).
  * The three GEMMs of a linear y = x W^T:  fprop y = Q(x)_{1x128} Q(W)_{128x128}^T,
    dgrad dx = Q(dy)_{1x128} Q(W)_{128x128}, wgrad dW = Q(dy^T)_{1x128 over tokens} Q(x)_{128x1}.
    Accumulation is fp32; the master weight stays in bf16/fp32.
  * CPU: an exact emulation — identical quantization, dequantize, fp32 matmul. GPU (sm90):
    ``torch._scaled_mm`` with block-wise fp32 scales when the installed torch accepts them; the
    emulation otherwise. Quantization is the same code on both devices, so the quantized operands
    and scales agree bit for bit.
  * Error to expect: vs the same quantized operands multiplied in fp32, only accumulation order;
    vs the unquantized fp32 product, e4m3 rounding: ~3-4% relative (Frobenius) on Gaussian data.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def quantize_blockwise(x: torch.Tensor, block_rows: int, block_cols: int, pow2_scales: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``x`` [R, C] -> (e4m3 [R, C], fp32 scales [R / br, C / bc]) with x ~ q * scale per block."""
    R, C = x.shape
    if R % block_rows or C % block_cols:
        raise ValueError(f"FP8 block quantization needs [{R}, {C}] divisible by [{block_rows}, {block_cols}]; "
                         "pad the tensor or size the layer to multiples of 128")
    xb = x.float().reshape(R // block_rows, block_rows, C // block_cols, block_cols)
    amax = xb.abs().amax(dim=(1, 3))
    # amax * (1/448), not amax / 448: CUDA turns division by a Python scalar into multiplication by
    # its reciprocal, so this form is what makes CPU and GPU scales identical to the last bit
    scale = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xb / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(R, C), scale


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    R, C = q.shape
    br, bc = R // scale.shape[0], C // scale.shape[1]
    x = q.float().reshape(scale.shape[0], br, scale.shape[1], bc) * scale[:, None, :, None]
    return x.reshape(R, C)


def quantize_act_1x128(x: torch.Tensor, pow2_scales: bool = False):
    return quantize_blockwise(x, 1, BLOCK, pow2_scales)


def quantize_weight_128x128(w: torch.Tensor, pow2_scales: bool = False):
    return quantize_blockwise(w, BLOCK, BLOCK, pow2_scales)


def fp8_matmul_reference(qa, sa, qb, sb) -> torch.Tensor:
    """A B^T from quantized operands: dequantize both, multiply in fp32 (the exactness reference)."""
    return dequantize_blockwise(qa, sa) @ dequantize_blockwise(qb, sb).T


def _scale_layouts(s: torch.Tensor) -> list[torch.Tensor]:
    return [s, s.t().contiguous().t()]


_LAYOUT: dict[str, tuple[int, int] | None] = {}


def _probe_scaled_mm(device: torch.device) -> tuple[int, int] | None:
    """Find the scale layouts this torch/cuBLAS accepts for A 1x128 x B 128x128 by checking each
    candidate against the dequantized fp32 reference on a small problem; None if none works."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(256, 512, generator=g).to(device)
    b = torch.randn(384, 512, generator=g).to(device)
    qa, sa = quantize_act_1x128(a)
    qb, sb = quantize_weight_128x128(b)
    ref = fp8_matmul_reference(qa, sa, qb, sb)
    for i, la in enumerate(_scale_layouts(sa)):
        for j, lb in enumerate(_scale_layouts(sb.t())):
            try:
                out = torch._scaled_mm(qa, qb.t(), scale_a=la, scale_b=lb, out_dtype=torch.float32)
            except (RuntimeError, TypeError, ValueError):
                continue
            if ((out - ref).norm() / ref.norm()).item() < 1e-3:
                return i, j
    return None


def fp8_gemm(qa, sa, qb, sb, out_dtype=torch.float32) -> torch.Tensor:
    """A B^T for A quantized 1x128 and B quantized 128x128 (cuBLAS on CUDA, emulation otherwise)."""
    if qa.is_cuda:
        key = str(qa.device)
        if key not in _LAYOUT:
            _LAYOUT[key] = _probe_scaled_mm(qa.device)
        layout = _LAYOUT[key]
        if layout is not None:
            la, lb = _scale_layouts(sa)[layout[0]], _scale_layouts(sb.t())[layout[1]]
            return torch._scaled_mm(qa, qb.t(), scale_a=la, scale_b=lb, out_dtype=out_dtype)
    return fp8_matmul_reference(qa, sa, qb, sb).to(out_dtype)


def gpu_blockwise_available(device: torch.device | str = "cuda") -> bool:
    device = torch.device(device)
    if str(device) not in _LAYOUT:
        _LAYOUT[str(device)] = _probe_scaled_mm(device)
    return _LAYOUT[str(device)] is not None


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight):
        qx, sx = quantize_act_1x128(x2d)
        qw, sw = quantize_weight_128x128(weight)
        ctx.save_for_backward(x2d, qw, sw)
        return fp8_gemm(qx, sx, qw, sw, out_dtype=torch.float32).to(x2d.dtype)

    @staticmethod
    def backward(ctx, dy):
        x2d, qw, sw = ctx.saved_tensors
        # dgrad: dx = dy W = dy (W^T)^T; the 128x128 blocks of W^T are W's blocks transposed
        qdy, sdy = quantize_act_1x128(dy)
        dx = fp8_gemm(qdy, sdy, qw.t().contiguous(), sw.t().contiguous())
        # wgrad: dW = dy^T x, contracted over tokens: both operands tiled along tokens (128x1 tiles
        # of dy and x = 1x128 tiles of their transposes); emulated (cuBLAS takes a 128x128 B only)
        qdyt, sdyt = quantize_act_1x128(dy.t().contiguous())
        qxt, sxt = quantize_act_1x128(x2d.t().contiguous())
        dw = fp8_matmul_reference(qdyt, sdyt, qxt, sxt)
        return dx.to(dy.dtype), dw.to(dy.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x W^T with all three GEMMs on block-scaled FP8 operands (see the module note)."""
    shape = x.shape
    y = _Fp8LinearFn.apply(x.reshape(-1, shape[-1]), weight)
    return y.reshape(*shape[:-1], weight.shape[0])
