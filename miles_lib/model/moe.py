"""Mixture-of-Experts block: top-k softmax router, grouped SwiGLU experts, routing replay (R3).

Shape legend: N tokens (B*T flattened), D hidden, E experts, K experts per token, F expert ffn dim.

Router (HF Qwen3-MoE numerics):
    p_NE = softmax(x_ND W_ED^T) in fp32
    natural routing:  ids_NK = topk(p_NE, K).indices,  w_NK = p_NE[ids_NK]
    replay (R3):      ids_NK = given ids,               w_NK = p_NE[ids_NK]   (gradients still
                      reach W_ED through p_NE, only the discrete choice is replayed)
    if norm_topk_prob: w_NK /= sum_K w_NK
Experts:
    y_N = sum_k w_Nk * down_e(silu(gate_e(x_N)) * up_e(x_N)),  e = ids_Nk
Token-expert pairs are sorted by expert and run as one grouped GEMM (``torch._grouped_mm``, CPU
and CUDA); the per-expert loop ``experts_forward_loop`` is the slow, obviously-correct reference.
The K contributions of a token are summed in k order, independent of how tokens are batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miles_lib.model import native_cpu
from miles_lib.model.config import ModelConfig


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows x[offs[e-1]:offs[e]] times w[e]^T for every expert e -> [M, O].

    ``offs_E`` are the int32 cumulative row counts (rows must be sorted by expert). Under
    ``torch.compile`` (the rollout engine's compiled steps) the same computation runs as an opaque op
    so the rest of the step compiles around it: on the CPU the native ``miles_cpu::grouped_linear``
    once ``native_cpu.load()`` has built it (experts spread over threads; bitwise the same result on one),
    otherwise the Python custom op ``miles::grouped_linear``.
    """
    if torch.compiler.is_compiling():
        if x_MI.device.type == "cpu" and native_cpu.available():
            return native_cpu.grouped_linear(x_MI, w_EOI, offs_E)
        return _grouped_linear_op(x_MI, w_EOI, offs_E)
    return _grouped_linear_eager(x_MI, w_EOI, offs_E)


def _grouped_linear_eager(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_ok(x_MI):
        return torch._grouped_mm(x_MI, w_EOI.transpose(-2, -1), offs=offs_E)
    if x_MI.is_cuda and torch.cuda.is_current_stream_capturing():
        return _grouped_linear_masked(x_MI, w_EOI, offs_E)
    outs, start = [], 0
    for e, end in enumerate(offs_E.tolist()):
        outs.append(x_MI[start:end] @ w_EOI[e].transpose(0, 1))
        start = end
    return torch.cat(outs, 0)


def _grouped_linear_masked(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """The loop's result without reading ``offs_E`` on the host (a CUDA graph is being captured):
    every expert's GEMM over all rows, each row keeping its own expert's (E x the FLOPs; used only
    where ``torch._grouped_mm`` has no kernel, i.e. fp32 on CUDA)."""
    rows = torch.arange(x_MI.shape[0], device=x_MI.device, dtype=offs_E.dtype)
    expert_M = torch.searchsorted(offs_E, rows, right=True)
    y = x_MI.new_zeros(x_MI.shape[0], w_EOI.shape[1])
    for e in range(w_EOI.shape[0]):
        y = torch.where((expert_M == e)[:, None], x_MI @ w_EOI[e].transpose(0, 1), y)
    return y


@torch.library.custom_op("miles::grouped_linear", mutates_args=())
def _grouped_linear_op(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Inference-only (no autograd formula): the engine compiles its no-grad decode step."""
    return _grouped_linear_eager(x_MI, w_EOI, offs_E)


@_grouped_linear_op.register_fake
def _(x_MI, w_EOI, offs_E):
    return x_MI.new_empty(x_MI.shape[0], w_EOI.shape[1])


def expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert (int64 [E]); an index_add rather than bincount so it also compiles."""
    return torch.zeros(num_experts, dtype=torch.long, device=flat_ids.device).index_add_(
        0, flat_ids, torch.ones_like(flat_ids))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x_ND: torch.Tensor, replay_ids_NK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights_NK in x dtype, used ids_NK, the router's own top-k ids_NK).

        Without replay the used and own ids are the same tensor; with replay the own top-k is what
        the router would have chosen (for routing-agreement metrics)."""
        probs_NE = F.linear(x_ND, self.weight).float().softmax(dim=-1)
        w_NK, own_NK = torch.topk(probs_NE, self.top_k, dim=-1)
        ids_NK = own_NK
        if replay_ids_NK is not None:
            ids_NK = replay_ids_NK.to(device=x_ND.device, dtype=torch.long)
            w_NK = probs_NE.gather(-1, ids_NK)
        if self.norm_topk_prob:
            w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
        return w_NK.to(x_ND.dtype), ids_NK, own_NK


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""

    def __init__(self, num_experts: int, hidden: int, ffn: int) -> None:
        super().__init__()
        self.num_experts, self.ffn = num_experts, ffn
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        # the grouped GEMM (x_MI, w_EOI, offs_E) -> y_MO; precision converters (FP8, INT4 QAT)
        # replace it on a built model, the model itself stays high precision
        self.linear_fn = grouped_linear

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        return experts_forward(x_ND, ids_NK, w_NK, self.gate_up_proj, self.down_proj, self.linear_fn)


def experts_forward(x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor, gate_up_E2FD: torch.Tensor,
                    down_EDF: torch.Tensor, linear_fn=grouped_linear) -> torch.Tensor:
    """sum_k w_Nk * down_e(silu(gate_e(x_N)) * up_e(x_N)) with one grouped GEMM per projection.

    Compiled on the CPU in fp32 with the plain grouped GEMM (the rollout engine's compiled steps), the
    whole function is one native call, ``miles_cpu::moe_experts`` (model/native_cpu.py): the same
    steps and kernels, without the per-step glue between them."""
    if linear_fn is grouped_linear and torch.compiler.is_compiling() and native_cpu.fp32_ops_ok(x_ND):
        return native_cpu.moe_experts(x_ND, ids_NK, w_NK, gate_up_E2FD, down_EDF)
    N, K = ids_NK.shape
    E, F2 = gate_up_E2FD.shape[0], gate_up_E2FD.shape[1] // 2
    flat_ids = ids_NK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # token-expert pairs sorted by expert
    offs_E = expert_counts(flat_ids, E).cumsum(0).to(torch.int32)
    x_MD = x_ND[order // K]
    h_M2F = linear_fn(x_MD, gate_up_E2FD, offs_E)
    a_MF = F.silu(h_M2F[:, :F2]) * h_M2F[:, F2:]
    y_MD = linear_fn(a_MF.contiguous(), down_EDF, offs_E)
    y_NKD = torch.empty_like(y_MD).index_copy(0, order, y_MD).view(N, K, -1)
    return (y_NKD * w_NK[..., None]).sum(dim=1)


def experts_forward_loop(experts: GroupedExperts, x_ND: torch.Tensor, ids_NK: torch.Tensor,
                         w_NK: torch.Tensor) -> torch.Tensor:
    """Reference implementation: one plain matmul per (token, k) pair's expert."""
    y = torch.zeros_like(x_ND)
    F_ = experts.ffn
    for e in range(experts.num_experts):
        tok, kk = torch.where(ids_NK == e)
        if tok.numel() == 0:
            continue
        h = x_ND[tok] @ experts.gate_up_proj[e].T
        a = F.silu(h[:, :F_]) * h[:, F_:]
        y.index_add_(0, tok, (a @ experts.down_proj[e].T) * w_NK[tok, kk, None])
    return y


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x_BTD: torch.Tensor, replay_ids_BTK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output [B, T, D], used expert ids [B, T, K], router's own top-k [B, T, K])."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        replay = None if replay_ids_BTK is None else replay_ids_BTK.reshape(B * T, -1)
        w_NK, ids_NK, own_NK = self.gate(x_ND, replay)
        y_ND = self.experts(x_ND, ids_NK, w_NK)
        return y_ND.view(B, T, D), ids_NK.view(B, T, -1), own_NK.view(B, T, -1)
