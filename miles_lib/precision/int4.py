"""INT4 weight quantization of MoE experts: QAT fake quantization (training) and packed int4 (rollout).

Design note. Symmetric group-wise int4 over the input channels (the last dim of a [.., O, I]
weight), groups of G = 32 or 128 channels:
    scale_g = max(max_{i in g} |w_i| / 7, 1e-5)          (rounded to the storage dtype of scales)
    code_i  = clamp(round(w_i / scale_g), -7, 7)          round half to even; 15 levels, no -8
    w'_i    = code_i * scale_g                            (computed in fp32, then cast to w's dtype)
Training runs w' in the forward and passes the gradient straight through (d w'/d w := 1, the
straight-through estimator), so the model learns weights that survive the rounding. The rollout
engine stores the codes packed 8 per int32 (nibble j of word k holds code 8k+j, as code + 8 in
[1, 15]) plus the scales, and dequantizes with the same formula at run time — so its expert
weights are bit-identical to what the QAT forward used. Scales are kept in fp32 by default
(bytes per weight: 0.5 + 4/G, 3.76x smaller than bf16 for G=128); bf16 scales give 3.56x at G=32.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from miles_lib.config import ConfigBase, check

QMAX = 7
MIN_SCALE = 1e-5
_SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class Int4Config(ConfigBase):
    """INT4 QAT of the MoE expert weights."""

    group_size: int = 128  # input channels per scale: 32 or 128
    scale_dtype: str = "float32"  # storage dtype of the scales: float32 | bfloat16

    def __post_init__(self) -> None:
        check(self.group_size in (32, 128), "Int4Config", "group_size", self.group_size, "32 or 128")
        check(self.scale_dtype in _SCALE_DTYPES, "Int4Config", "scale_dtype", self.scale_dtype,
              f"one of {sorted(_SCALE_DTYPES)}")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    if w.shape[-1] % group_size:
        raise ValueError(f"INT4 groups of {group_size} need the input dim {w.shape[-1]} of {list(w.shape)} "
                         "to be a multiple of the group size")
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def int4_scales(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale [..., I/G] = max(max|w| / 7, 1e-5) per group, rounded to ``scale_dtype``."""
    amax = _groups(w, group_size).abs().amax(dim=-1)
    # tensor / tensor: an IEEE division on every device (CUDA would turn "/ 7" into "* (1/7)")
    return torch.clamp(amax / torch.full_like(amax, QMAX), min=MIN_SCALE).to(scale_dtype)


def int4_codes(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 codes in [-7, 7]: clamp(round(w / scale), -7, 7) per group."""
    q = torch.round(_groups(w, group_size) / scales.float()[..., None]).clamp(-QMAX, QMAX)
    return q.to(torch.int8).reshape(w.shape)


def int4_dequant(codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """w' = code * scale in fp32, cast to ``dtype``."""
    g = codes.float().reshape(*codes.shape[:-1], codes.shape[-1] // group_size, group_size)
    return (g * scales.float()[..., None]).reshape(codes.shape).to(dtype)


class _FakeQuantInt4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, group_size: int, scale_dtype: torch.dtype):
        s = int4_scales(w, group_size, scale_dtype)
        return int4_dequant(int4_codes(w, s, group_size), s, group_size, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None  # straight-through estimator


def fake_quant_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w' = clamp(round(w/scale), -7, 7) * scale per group of the last dim; gradient passes straight through."""
    return _FakeQuantInt4.apply(w, group_size, scale_dtype)


# ---------------------------------------------------------------------------------------------
# packing: 8 codes per int32
# ---------------------------------------------------------------------------------------------
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., I] -> (packed int32 [..., I/8], scales [..., I/G]); I a multiple of 8 and of G."""
    s = int4_scales(w, group_size, scale_dtype)
    nib = (int4_codes(w, s, group_size).to(torch.int64) + 8).reshape(*w.shape[:-1], w.shape[-1] // 8, 8)
    word = (nib << _SHIFTS.to(w.device)).sum(dim=-1)  # in [0, 2^32)
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)  # reinterpret as two's-complement int32
    return word.to(torch.int32), s


def unpack_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """packed int32 [..., I/8] -> int8 codes [..., I] in [-7, 7]."""
    nib = (packed.to(torch.int64)[..., None] >> _SHIFTS.to(packed.device)) & 0xF
    return (nib - 8).to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantized weight [..., I] from packed codes and scales (the same values fake_quant_int4 gives)."""
    return int4_dequant(unpack_int4_codes(packed), scales, group_size, dtype)


# ---------------------------------------------------------------------------------------------
# model pieces
# ---------------------------------------------------------------------------------------------
def int4_qat_grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor,
                            group_size: int = 128, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``GroupedExperts.linear_fn`` for QAT: the grouped GEMM on fake-quantized expert weights."""
    from miles_lib.model.moe import grouped_linear
    return grouped_linear(x_MI, fake_quant_int4(w_EOI, group_size, scale_dtype), offs_E)


def int4_qat_linear_fn(cfg: Int4Config):
    return functools.partial(int4_qat_grouped_linear, group_size=cfg.group_size,
                             scale_dtype=_SCALE_DTYPES[cfg.scale_dtype])


class Int4Experts(nn.Module):
    """Rollout-side experts: packed int4 gate_up / down weights + scales, dequantized per forward.

    Drop-in for ``GroupedExperts`` (same forward signature and math, ``experts_forward``)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, cfg: Int4Config,
                 dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        super().__init__()
        self.num_experts, self.ffn, self.cfg, self.dtype = num_experts, ffn, cfg, dtype
        G, sd = cfg.group_size, _SCALE_DTYPES[cfg.scale_dtype]
        E = num_experts
        self.register_buffer("gate_up_packed", torch.zeros(E, 2 * ffn, hidden // 8, dtype=torch.int32, device=device))
        self.register_buffer("gate_up_scales", torch.zeros(E, 2 * ffn, hidden // G, dtype=sd, device=device))
        self.register_buffer("down_packed", torch.zeros(E, hidden, ffn // 8, dtype=torch.int32, device=device))
        self.register_buffer("down_scales", torch.zeros(E, hidden, ffn // G, dtype=sd, device=device))

    @classmethod
    def from_experts(cls, experts: nn.Module, cfg: Int4Config) -> "Int4Experts":
        E, F2, D = experts.gate_up_proj.shape
        new = cls(E, D, F2 // 2, cfg, dtype=experts.gate_up_proj.dtype, device=experts.gate_up_proj.device)
        new.load_weights(experts.gate_up_proj, experts.down_proj)
        return new

    @torch.no_grad()
    def load_weights(self, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor) -> None:
        """Pack new high-precision expert weights (a weight update from the trainer)."""
        G, sd = self.cfg.group_size, _SCALE_DTYPES[self.cfg.scale_dtype]
        for name, w in (("gate_up", gate_up_E2FD), ("down", down_EDF)):
            packed, scales = pack_int4(w.detach(), G, sd)
            getattr(self, f"{name}_packed").copy_(packed)
            getattr(self, f"{name}_scales").copy_(scales)

    @torch.no_grad()
    def load_weight(self, name: str, w: torch.Tensor) -> None:
        """Pack one high-precision expert weight by its ``GroupedExperts`` name (``gate_up_proj`` or
        ``down_proj``): what the rollout engine calls for a trainer tensor during a weight sync."""
        G, sd = self.cfg.group_size, _SCALE_DTYPES[self.cfg.scale_dtype]
        prefix = {"gate_up_proj": "gate_up", "down_proj": "down"}.get(name)
        if prefix is None:
            raise ValueError(f"Int4Experts.load_weight: unknown expert weight {name!r}; expected gate_up_proj or down_proj")
        packed_buf = getattr(self, f"{prefix}_packed")
        want = (*packed_buf.shape[:-1], packed_buf.shape[-1] * 8)
        if tuple(w.shape) != want:
            raise ValueError(f"Int4Experts.load_weight: {name} has shape {tuple(w.shape)}, expected {want}")
        packed, scales = pack_int4(w.detach().to(packed_buf.device), G, sd)
        packed_buf.copy_(packed)
        getattr(self, f"{prefix}_scales").copy_(scales)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        G = self.cfg.group_size
        return (unpack_int4(self.gate_up_packed, self.gate_up_scales, G, self.dtype),
                unpack_int4(self.down_packed, self.down_scales, G, self.dtype))

    def weight_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        from miles_lib.model.moe import experts_forward
        gate_up, down = self.dequantized()
        return experts_forward(x_ND, ids_NK, w_NK, gate_up.to(x_ND.dtype), down.to(x_ND.dtype))
