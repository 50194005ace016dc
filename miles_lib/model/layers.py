"""Dense building blocks of the decoder: RMSNorm, rotary embedding, GQA attention, SwiGLU MLP.

Shape legend: B batch, T query length, S key length, D hidden, H query heads, G kv heads, Hd head dim.

Numerics follow HF Qwen3 so logits match ``transformers`` to fp32 rounding:
  * RMSNorm: y = w * (x_f32 / sqrt(mean(x_f32^2) + eps)).to(x.dtype), computed with the fused
    ``F.rms_norm`` (batch-invariant on GPU, unlike ``x.pow(2).mean``);
  * RoPE (rotate-half layout): inv_freq_j = theta^(-2j/Hd); q' = q*cos + rotate_half(q)*sin, with
    cos/sin computed in fp32 and cast to the activation dtype;
  * attention: softmax(q k^T / sqrt(Hd) + mask) v with causal + key-padding mask; every query may
    attend to itself so a fully padded row stays finite.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from miles_lib.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, Hd] for integer ``position_ids`` [B, T]."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # [B, T, Hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.no_grad()
    def table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [length, Hd] of positions [0, length): the same ops as ``forward``, so a
        gathered row equals what ``forward`` computes for that position."""
        cos, sin = self.forward(torch.arange(length, device=self.inv_freq.device)[None], torch.float32)
        return cos[0], sin[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTd[:, None], sin_BTd[:, None]
    return x_BHTd * cos + rotate_half(x_BHTd) * sin


class KVCache(Protocol):
    """What the attention layer needs from a rollout engine's KV cache.

    ``attend`` stores this step's keys/values for ``layer_idx`` and returns the attention output of
    the step's queries over everything cached for their sequences (causal within the step).
    q: [B, H, T, Hd], k/v: [B, G, T, Hd] (RoPE applied) -> [B, H, T, Hd].
    ``rope_tables``: None, or fp32 (cos, sin) [L, Hd] of positions [0, L) (``RotaryEmbedding.table``)
    that the model gathers instead of evaluating cos / sin every forward.
    """

    rope_tables: tuple[torch.Tensor, torch.Tensor] | None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def causal_padding_mask(attention_mask: torch.Tensor | None, B: int, T: int,
                        device: torch.device) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask (True = may attend): causal, key padding removed, diagonal kept."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal[None, None].expand(B, 1, T, T)
    keys = attention_mask.bool()[:, None, None, :]  # [B,1,1,S]
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return (causal & keys) | eye


def shared_input_linears(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """[lin(x) for lin in linears] — the projections that read the same input (q/k/v, gate/up).

    A linear class may run them as one: ``forward_shared_input(x, linears)`` (a classmethod) returns
    the outputs, or None where it cannot (then each runs alone). FP8 layers use it to quantize x
    once and run one GEMM per direction over the stacked weights (``Fp8Linear``); the model
    itself stays free of precision code."""
    fused = getattr(type(linears[0]), "forward_shared_input", None)
    if fused is not None and all(type(lin) is type(linears[0]) for lin in linears):
        out = fused(x, linears)
        if out is not None:
            return out
    return [lin(x) for lin in linears]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim ** -0.5

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = shared_input_linears(x_BTD, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_idx, q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLUMLP(nn.Module):
    """Dense MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)
