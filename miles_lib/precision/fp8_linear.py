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
Linears that read the same input (q/k/v, gate/up: ``fp8_linear_shared_input``, reached from the
model through ``Fp8Linear.forward_shared_input``) run as ONE such linear over their weights stacked
along N: x is quantized once instead of once per linear, the output grads into one stacked
operand (each into its column slice, never concatenated in high precision), and each direction is
one GEMM (the dgrad sums the linears' contributions in its fp32 accumulator, not in bf16
afterwards). An output no loss reads gets a zero grad, so its weight's gradient is zeros, not None. Stacking is exact: every N_i is a multiple of 128, so no
128x128 weight block and no 1x128 dy tile spans two linears; each output column is computed from
the same operands as alone.
The forward saves the dgrad operand (W's FP8 blocks transposed, written by the same kernel that
quantizes W for fprop, from one read of W) and the 128x1-quantized x (half the bytes of a bf16 x),
so the backward never re-reads x or W in high precision. The master weight stays in its own dtype
(bf16/fp32) and its gradient is returned in that dtype. Outputs are in x's dtype. Inference (no grad needed)
skips the wgrad operand. Grouped: the same three GEMMs per expert over the expert-sorted rows
(``offs_E``), run by one grouped kernel per GEMM on the GPU (``fp8_gemm.grouped_fp8_mm`` /
``grouped_fp8_wgrad``) and by the dequantized reference on the CPU; the wgrad's operands are
quantized in 128-token tiles per expert (``fp8.quantize_act_dual_grouped``), so no tile, and no
scale, is shared by two experts.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_lib.precision.fp8 import (
    WGRAD_GRAD_BLOCKS,
    aligned_expert_offsets,
    quantize_act_1x128,
    quantize_act_dual,
    quantize_act_dual_grouped,
    quantize_act_dual_stacked,
    quantize_act_t,
    quantize_weight_128x128,
)
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
    return quantized_weights((w,), pow2_scales, for_dgrad)


def quantized_weights(ws: tuple[torch.Tensor, ...], pow2_scales: bool, for_dgrad: bool = False):
    """``quantized_weight`` of the weights stacked along N (their rows): the weight operand of the
    linears that share an input. Cached on the first weight (``_fp8_cache``, or
    ``_fp8_shared_cache`` for a stack, so a layer used alone and in a stack keeps both), keyed on
    every weight's storage and version; only the stack is stored, not each weight's blocks."""
    w0 = ws[0]
    attr = "_fp8_cache" if len(ws) == 1 else "_fp8_shared_cache"
    cacheable = _cache_allowed() and all(isinstance(w, nn.Parameter) for w in ws)
    key = (tuple((w.data_ptr(), w._version) for w in ws), pow2_scales, w0.dtype)
    cache = getattr(w0, attr, None) if cacheable else None
    if cache is None or cache["key"] != key or (for_dgrad and cache["qt"] is None):
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: autograd may save them
            w = w0.detach() if len(ws) == 1 else torch.cat([w.detach() for w in ws])
            out = quantize_weight_128x128(w, pow2_scales, for_dgrad)
        q, qt = out if for_dgrad else (out, None)
        cache = {"key": key, "q": q, "qt": qt}
        if cacheable:
            setattr(w0, attr, cache)
    return (cache["q"], cache["qt"]) if for_dgrad else cache["q"]


def _grad_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.dtype in (torch.float32, torch.bfloat16) else torch.float32


def _weight_operands(ws, pow2: bool, need_dgrad: bool):
    """(fprop operand, dgrad operand or (None, None)) of the weights stacked along N."""
    if need_dgrad:
        return quantized_weights(ws, pow2, for_dgrad=True)
    return quantized_weights(ws, pow2), (None, None)


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
    """y = x [W_1; ...; W_n]^T for one or more weights (stacked along N; see the module note); with
    several weights the outputs are y's column slices, one per weight, and their grads arrive
    separately (quantized into one stacked operand without concatenating them)."""

    @staticmethod
    def forward(ctx, x_MK, pow2_scales: bool, wgrad_grad_blocks: str, *ws_NK):
        (qx, sx), (qxt, sxt) = _quantize_input(x_MK, pow2_scales, any(ctx.needs_input_grad[3:]))
        (qw, sw), (qwt, swt) = _weight_operands(ws_NK, pow2_scales, ctx.needs_input_grad[0])
        y = fp8_mm(qx, sx, qw, sw, out_dtype=x_MK.dtype)
        ctx.save_for_backward(qwt, swt, qxt, sxt)
        ctx.pow2, ctx.t_blocks, ctx.w_dtype = pow2_scales, wgrad_grad_blocks, _grad_dtype(ws_NK[0])
        ctx.rows = [w.shape[0] for w in ws_NK]
        return y if len(ws_NK) == 1 else y.split(ctx.rows, dim=1)

    @staticmethod
    def backward(ctx, *dys_MN):
        qwt, swt, qxt, sxt = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        dx, dws = None, [None] * len(ctx.rows)
        ref = next(d for d in dys_MN if d is not None)
        dys = [d.contiguous() if d is not None else ref.new_zeros(ref.shape[0], n)  # an unused output: None
               for d, n in zip(dys_MN, ctx.rows)]
        if len(dys) > 1 and need_dx and any(need_dw):
            (qdy, sdy), (qdyt, sdyt) = quantize_act_dual_stacked(dys, ctx.pow2, ctx.t_blocks)
        else:
            dy = dys[0] if len(dys) == 1 else torch.cat(dys, dim=1)
            (qdy, sdy), (qdyt, sdyt) = _quantize_grad(dy, ctx.pow2, (need_dx, any(need_dw)), ctx.t_blocks)
        if need_dx:
            dx = fp8_mm(qdy, sdy, qwt, swt, out_dtype=ref.dtype)
        if any(need_dw):
            dw = fp8_mm(qdyt, sdyt, qxt, sxt, out_dtype=ctx.w_dtype)
            dws = [d if need else None for d, need in zip(dw.split(ctx.rows), need_dw)]
        return dx, None, None, *dws


def _check_recipe(wgrad_grad_blocks: str, who: str) -> None:
    if wgrad_grad_blocks not in WGRAD_GRAD_BLOCKS:
        raise ValueError(f"{who}: wgrad_grad_blocks={wgrad_grad_blocks!r}, expected one of {list(WGRAD_GRAD_BLOCKS)}")


def _fp8_linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...], pow2_scales: bool,
                 wgrad_grad_blocks: str) -> list[torch.Tensor]:
    """x [..., K] times the stacked weights: one [M, N_i] output per weight (column slices of one
    [M, sum N_i] product; M = the flattened leading dims)."""
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        y = _Fp8LinearFn.apply(x2, pow2_scales, wgrad_grad_blocks, *weights)
        return [y] if len(weights) == 1 else list(y)
    qx, sx = quantize_act_1x128(x2, pow2_scales)
    qw, sw = quantized_weights(weights, pow2_scales)
    return list(fp8_mm(qx, sx, qw, sw, out_dtype=x.dtype).split([w.shape[0] for w in weights], dim=1))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               pow2_scales: bool = False, wgrad_grad_blocks: str = "128x1") -> torch.Tensor:
    """y = x W^T (+ b) with all three GEMMs on block-scaled FP8 operands (see the module note).

    x [..., K], weight [N, K] with K and N multiples of 128; the bias is added in x's dtype."""
    _check_recipe(wgrad_grad_blocks, "fp8_linear")
    y = _fp8_linears(x, (weight,), pow2_scales, wgrad_grad_blocks)[0].reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def fp8_linear_shared_input(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                            pow2_scales: bool = False, wgrad_grad_blocks: str = "128x1") -> list[torch.Tensor]:
    """[fp8_linear(x, w_i, b_i) for each i] as one linear over the weights stacked along N: x and dy
    quantized once, one GEMM per direction (see the module note). Every w_i is [N_i, K] with the
    same K, dtype and device, N_i a multiple of 128. The outputs are column slices (views) of one
    [..., sum N_i] tensor."""
    _check_recipe(wgrad_grad_blocks, "fp8_linear_shared_input")
    K = weights[0].shape[1]
    if len(weights) != len(biases) or any(w.shape[1] != K or w.dtype != weights[0].dtype for w in weights):
        raise ValueError(f"fp8_linear_shared_input: weights {[list(w.shape) for w in weights]} "
                         f"({[str(w.dtype) for w in weights]}) with {len(biases)} biases; need one bias "
                         "(or None) per weight and one in-features size and dtype")
    outs = _fp8_linears(x, tuple(weights), pow2_scales, wgrad_grad_blocks)
    return [(o if b is None else o + b.to(o.dtype)).reshape(*x.shape[:-1], -1) for o, b in zip(outs, biases)]


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose matmuls run in block-scaled FP8; same parameters and state-dict keys."""

    pow2_scales: bool = False
    wgrad_grad_blocks: str = "128x1"
    share_input: bool = True  # run with the linears that read the same input as one (forward_shared_input)

    @classmethod
    def from_linear(cls, lin: nn.Linear, pow2_scales: bool = False, wgrad_grad_blocks: str = "128x1",
                    share_input: bool = True) -> "Fp8Linear":
        if lin.in_features % 128 or lin.out_features % 128:
            raise ValueError(f"Fp8Linear needs in/out features that are multiples of 128, got "
                             f"[{lin.out_features}, {lin.in_features}]; keep this layer in high precision")
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight = lin.weight
        new.bias = lin.bias
        new.pow2_scales = pow2_scales
        new.wgrad_grad_blocks = wgrad_grad_blocks
        new.share_input = share_input
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.pow2_scales, self.wgrad_grad_blocks)

    @classmethod
    def forward_shared_input(cls, x: torch.Tensor, linears) -> list[torch.Tensor] | None:
        """The model's hook for linears that read one input (``model.layers.shared_input_linears``):
        one ``fp8_linear_shared_input`` when they agree on the recipe, dtype and device and all
        have ``share_input`` set; None (each runs alone) otherwise."""
        first = linears[0]
        if not all(lin.share_input and lin.pow2_scales == first.pow2_scales
                   and lin.wgrad_grad_blocks == first.wgrad_grad_blocks and lin.in_features == first.in_features
                   and lin.weight.dtype == first.weight.dtype and lin.weight.device == first.weight.device
                   for lin in linears):
            return None
        return fp8_linear_shared_input(x, [lin.weight for lin in linears], [lin.bias for lin in linears],
                                       first.pow2_scales, first.wgrad_grad_blocks)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", fp8=e4m3 1x128/128x128, pow2_scales={self.pow2_scales}, "
                f"wgrad_grad_blocks={self.wgrad_grad_blocks}, share_input={self.share_input}")


# ---------------------------------------------------------------------------------------------
# grouped (MoE experts)
# ---------------------------------------------------------------------------------------------
def _quantize_grouped(x, offs_E, pow2: bool, needs: tuple[bool, bool]):
    """x quantized 1x128 (fprop / dgrad) and in the expert-aligned 128x1 layout (wgrad), each only
    if needed."""
    if needs[1]:
        rowwise, aligned = quantize_act_dual_grouped(x, offs_E, pow2)
        return rowwise if needs[0] else (None, None), aligned
    return quantize_act_1x128(x, pow2) if needs[0] else (None, None), (None, None)


class _Fp8GroupedFn(torch.autograd.Function):
    """The wgrad operands (x, dy) are transposed in 128-token tiles per expert
    (``quantize_act_dual_grouped``): an expert's tokens never share a scale with another's, and
    the grouped wgrad runs over 128-aligned segments without masking."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, offs_E, pow2_scales: bool):
        (qx, sx), (qxt, sxt) = _quantize_grouped(x_MK, offs_E, pow2_scales, (True, ctx.needs_input_grad[1]))
        (qw, sw), (qwt, swt) = _weight_operands((w_ENK,), pow2_scales, ctx.needs_input_grad[0])
        y = grouped_fp8_mm(qx, sx, qw, sw, offs_E, out_dtype=x_MK.dtype)
        ctx.save_for_backward(qwt, swt, qxt, sxt, offs_E)
        ctx.pow2, ctx.w_dtype = pow2_scales, _grad_dtype(w_ENK)
        return y

    @staticmethod
    def backward(ctx, dy_MN):
        qwt, swt, qxt, sxt, offs_E = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        (qdy, sdy), (qdyt, sdyt) = _quantize_grouped(dy_MN, offs_E, ctx.pow2, ctx.needs_input_grad[:2])
        if ctx.needs_input_grad[0]:
            dx = grouped_fp8_mm(qdy, sdy, qwt, swt, offs_E, out_dtype=dy_MN.dtype)
        if ctx.needs_input_grad[1]:
            dw = grouped_fp8_wgrad(qdyt, sdyt, qxt, sxt, aligned_expert_offsets(offs_E), out_dtype=ctx.w_dtype)
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

