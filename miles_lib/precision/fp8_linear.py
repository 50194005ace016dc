"""FP8 linear layers (autograd): dense ``Fp8Linear`` and the grouped expert GEMM of the MoE.

Design note. A linear y = x W^T has three GEMMs; each runs on block-scaled e4m3 operands with
fp32 accumulation (shape legend: M tokens, K in-features, N out-features, E experts):
    fprop  y_MN  = Q1x128(x_MK)    . Q128x128(W_NK)^T          contract K
    dgrad  dx_MK = Q1x128(dy_MN)   . Q128x128(W_NK)^T-blocks   contract N  (W's blocks transposed)
    wgrad  dW_NK = Q128x1(dy_MN)^T . Q128x1(x_MK)              contract M  (tiles along tokens)
With ``wgrad_grad_blocks="128x128"`` dy's wgrad operand has 128x128 blocks instead,
    wgrad  dW_NK = Q128x128(dy_MN)^T . Q128x1(x_MK)
which runs on fprop's cuBLAS kernel (as (x^T dy)^T where cuBLAS lacks the 128x128 x 1x128 order;
~1.4x the speed of the 1x128 x 1x128 kernel on the H200); dy's entries
lose precision only where their block spans more than e4m3's ~4.5 decades. Dense layers only; the
grouped expert wgrad keeps 128x1.
The forward saves the dgrad operand (W's FP8 blocks transposed, written by the same kernel that
quantizes W for fprop, from one read of W) and the 128x1-quantized x (half the bytes of a bf16 x),
so the backward never re-reads x or W in high precision. The master weight stays in its own dtype
(bf16/fp32) and its gradient is returned in that dtype. Outputs are in x's dtype. Inference (no grad needed)
skips the wgrad operand. Grouped: the same three GEMMs per expert over the expert-sorted rows
(``offs_E``), run by one grouped kernel per GEMM on the GPU (``fp8_gemm.grouped_fp8_mm`` /
``grouped_fp8_wgrad``) and by the dequantized reference on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_lib.precision.fp8 import (WGRAD_GRAD_BLOCKS, quantize_act_1x128, quantize_act_dual, quantize_act_t,
                                     quantize_weight_128x128)
from miles_lib.precision.fp8_gemm import fp8_mm, grouped_fp8_mm, grouped_fp8_wgrad


def _cache_allowed() -> bool:
    # FSDP refills unsharded parameters through collectives; do not trust version counters there
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)


def quantized_weight(w: torch.Tensor, pow2_scales: bool, for_dgrad: bool = False):
    """Q128x128(w) (and, for_dgrad, also the dgrad operand: the same blocks transposed, as
    ``(q, s), (q^T, s^T)``), computed once per weight value: cached on the tensor and reused while
    its storage and version counter are unchanged (an optimizer step or a weight sync bumps the
    version). So the rollout engine quantizes each weight once per weight sync, and the trainer
    once per optimizer step instead of once per micro-batch. Both orientations come from one
    kernel reading w once; inference never asks for (or stores) the transpose."""
    if not _cache_allowed() or not isinstance(w, nn.Parameter):
        return quantize_weight_128x128(w, pow2_scales, for_dgrad)
    key = (w.data_ptr(), w._version, pow2_scales, w.dtype)
    cache = getattr(w, "_fp8_cache", None)
    if cache is None or cache["key"] != key or (for_dgrad and cache["qt"] is None):
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: autograd may save them
            out = quantize_weight_128x128(w.detach(), pow2_scales, for_dgrad)
        q, qt = out if for_dgrad else (out, None)
        cache = w._fp8_cache = {"key": key, "q": q, "qt": qt}
    return (cache["q"], cache["qt"]) if for_dgrad else cache["q"]


def _grad_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.dtype in (torch.float32, torch.bfloat16) else torch.float32


def _weight_operands(w, pow2: bool, need_dgrad: bool):
    """(fprop operand, dgrad operand or (None, None))."""
    if need_dgrad:
        return quantized_weight(w, pow2, for_dgrad=True)
    return quantized_weight(w, pow2), (None, None)


def _quantize_input(x, pow2: bool, need_wgrad: bool):
    """(1x128 quantization for fprop, 128x1 transposed for wgrad or (None, None))."""
    if need_wgrad:
        return quantize_act_dual(x, pow2)
    return quantize_act_1x128(x, pow2), (None, None)


def _quantize_grad(dy, pow2: bool, needs: tuple[bool, bool], t_blocks: str = "128x1"):
    """dy quantized 1x128 (dgrad) and transposed in t_blocks (wgrad), each only if needed."""
    if needs[0] and needs[1]:
        return quantize_act_dual(dy, pow2, t_blocks)
    return (quantize_act_1x128(dy, pow2) if needs[0] else (None, None),
            quantize_act_t(dy, pow2, t_blocks) if needs[1] else (None, None))


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_NK, pow2_scales: bool, wgrad_grad_blocks: str):
        (qx, sx), (qxt, sxt) = _quantize_input(x_MK, pow2_scales, ctx.needs_input_grad[1])
        (qw, sw), (qwt, swt) = _weight_operands(w_NK, pow2_scales, ctx.needs_input_grad[0])
        y = fp8_mm(qx, sx, qw, sw, out_dtype=x_MK.dtype)
        ctx.save_for_backward(qwt, swt, qxt, sxt)
        ctx.pow2, ctx.t_blocks, ctx.w_dtype = pow2_scales, wgrad_grad_blocks, _grad_dtype(w_NK)
        return y

    @staticmethod
    def backward(ctx, dy_MN):
        qwt, swt, qxt, sxt = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        (qdy, sdy), (qdyt, sdyt) = _quantize_grad(dy_MN, ctx.pow2, ctx.needs_input_grad[:2], ctx.t_blocks)
        if ctx.needs_input_grad[0]:
            dx = fp8_mm(qdy, sdy, qwt, swt, out_dtype=dy_MN.dtype)
        if ctx.needs_input_grad[1]:
            dw = fp8_mm(qdyt, sdyt, qxt, sxt, out_dtype=ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               pow2_scales: bool = False, wgrad_grad_blocks: str = "128x1") -> torch.Tensor:
    """y = x W^T (+ b) with all three GEMMs on block-scaled FP8 operands (see the module note).

    x [..., K], weight [N, K] with K and N multiples of 128; the bias is added in x's dtype."""
    if wgrad_grad_blocks not in WGRAD_GRAD_BLOCKS:
        raise ValueError(f"fp8_linear: wgrad_grad_blocks={wgrad_grad_blocks!r}, expected one of "
                         f"{list(WGRAD_GRAD_BLOCKS)}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y = _Fp8LinearFn.apply(x2, weight, pow2_scales, wgrad_grad_blocks)
    else:
        qx, sx = quantize_act_1x128(x2, pow2_scales)
        qw, sw = quantized_weight(weight, pow2_scales)
        y = fp8_mm(qx, sx, qw, sw, out_dtype=x.dtype)
    y = y.reshape(*shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose matmuls run in block-scaled FP8; same parameters and state-dict keys."""

    pow2_scales: bool = False
    wgrad_grad_blocks: str = "128x1"

    @classmethod
    def from_linear(cls, lin: nn.Linear, pow2_scales: bool = False, wgrad_grad_blocks: str = "128x1") -> "Fp8Linear":
        if lin.in_features % 128 or lin.out_features % 128:
            raise ValueError(f"Fp8Linear needs in/out features that are multiples of 128, got "
                             f"[{lin.out_features}, {lin.in_features}]; keep this layer in high precision")
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight = lin.weight
        new.bias = lin.bias
        new.pow2_scales = pow2_scales
        new.wgrad_grad_blocks = wgrad_grad_blocks
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.pow2_scales, self.wgrad_grad_blocks)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", fp8=e4m3 1x128/128x128, pow2_scales={self.pow2_scales}, "
                f"wgrad_grad_blocks={self.wgrad_grad_blocks}")


# ---------------------------------------------------------------------------------------------
# grouped (MoE experts)
# ---------------------------------------------------------------------------------------------
class _Fp8GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_ENK, offs_E, pow2_scales: bool):
        (qx, sx), (qxt, sxt) = _quantize_input(x_MK, pow2_scales, ctx.needs_input_grad[1])
        (qw, sw), (qwt, swt) = _weight_operands(w_ENK, pow2_scales, ctx.needs_input_grad[0])
        y = grouped_fp8_mm(qx, sx, qw, sw, offs_E, out_dtype=x_MK.dtype)
        ctx.save_for_backward(qwt, swt, qxt, sxt, offs_E)
        ctx.pow2, ctx.w_dtype = pow2_scales, _grad_dtype(w_ENK)
        return y

    @staticmethod
    def backward(ctx, dy_MN):
        qwt, swt, qxt, sxt, offs_E = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        (qdy, sdy), (qdyt, sdyt) = _quantize_grad(dy_MN, ctx.pow2, ctx.needs_input_grad[:2])
        if ctx.needs_input_grad[0]:
            dx = grouped_fp8_mm(qdy, sdy, qwt, swt, offs_E, out_dtype=dy_MN.dtype)
        if ctx.needs_input_grad[1]:
            dw = grouped_fp8_wgrad(qdyt, sdyt, qxt, sxt, offs_E, out_dtype=ctx.w_dtype)
        return dx, dw, None, None


def fp8_grouped_linear(x_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor,
                       pow2_scales: bool = False) -> torch.Tensor:
    """Rows x[offs[e-1]:offs[e]] times w[e]^T for every expert e, in block-scaled FP8 -> [M, N].

    Same contract as ``miles_lib.model.moe.grouped_linear`` (rows sorted by expert, int32
    cumulative ``offs_E``), so it can be set as ``GroupedExperts.linear_fn``."""
    if torch.is_grad_enabled() and (x_MK.requires_grad or w_ENK.requires_grad):
        return _Fp8GroupedFn.apply(x_MK, w_ENK, offs_E, pow2_scales)
    qx, sx = quantize_act_1x128(x_MK, pow2_scales)
    qw, sw = quantized_weight(w_ENK, pow2_scales)
    return grouped_fp8_mm(qx, sx, qw, sw, offs_E, out_dtype=x_MK.dtype)

