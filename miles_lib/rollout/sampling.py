"""Sampling parameters and a vectorized, batch-invariant sampler.

Design note. Every request carries its own seed; its random stream must not depend on which other
requests share the batch. Instead of one torch.Generator per request (a Python loop per step), the
sampler draws Gumbel noise from a counter-based hash of (seed, position, token id):

    u = splitmix64(seed, position, v) / 2^64 in (0, 1),   g = -log(-log u)
    y = argmax_v (logits_v / T + g_v)   over the tokens top-k / top-p keep

which is an exact sample from softmax(logits / T) restricted to the kept tokens (Gumbel-max trick),
identical for a request whatever the batch, on CPU and GPU alike. T = 0 is greedy (argmax).

Log-probability returned with each token (DESIGN §4): log_softmax(logits / T) over the FULL
vocabulary at the chosen token, whatever top-p / top-k did; for greedy decoding T = 1 is used.
"""

from __future__ import annotations

import dataclasses

import torch



def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= (1 << 63) else c


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 16
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    seed: int | None = None  # None: the engine draws one

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            problems.append(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not (0 < self.top_p <= 1):
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0):
            problems.append(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            problems.append(f"seed={self.seed!r} must be a non-negative integer or None")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (wrap-around arithmetic; logical shifts emulated)."""
    def srl(v: torch.Tensor, n: int) -> torch.Tensor:  # logical right shift of int64
        return (v >> n) & ((1 << (64 - n)) - 1)

    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ srl(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ srl(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ srl(x, 31)


def gumbel_noise(seeds_B: torch.Tensor, positions_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] float64 Gumbel(0, 1) noise, a pure function of (seed, position, token id)."""
    v = torch.arange(vocab, device=seeds_B.device, dtype=torch.int64)
    key = _splitmix64(seeds_B.to(torch.int64))[:, None] ^ _splitmix64(positions_B.to(torch.int64) * 0x100000001B3 + 1)[:, None]
    bits = _splitmix64(key + v[None, :] * _signed(0xD6E8FEB86659FD93))
    u = ((bits >> 11) & ((1 << 53) - 1)).double().add_(0.5) * (1.0 / (1 << 53))  # (0, 1)
    return -torch.log(-torch.log(u))


def filter_logits(scaled_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside the top-k and outside the smallest top-p nucleus."""
    B, V = scaled_BV.shape
    sorted_vals, order = scaled_BV.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=scaled_BV.device)[None, :]
    k = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, V))[:, None]
    keep_sorted = ranks < k
    probs = sorted_vals.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    keep_sorted &= mass_before < top_p_B[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return scaled_BV.masked_fill(~keep, float("-inf"))


def sample_tokens(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                  top_p_B: torch.Tensor, seeds_B: torch.Tensor, positions_B: torch.Tensor,
                  any_filter: bool = True, all_greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B], log-probs [B]) for one decoding step. ``any_filter`` / ``all_greedy`` let the
    caller skip the top-k/top-p sort and the noise when no request in the batch needs them."""
    logits = logits_BV.float()
    greedy = temperature_B <= 0
    T = torch.where(greedy, torch.ones_like(temperature_B), temperature_B)[:, None].float()
    scaled = logits / T
    logp_full = scaled.log_softmax(-1)
    if all_greedy:
        tokens = logits.argmax(-1)
        return tokens, logp_full.gather(-1, tokens[:, None]).squeeze(-1)
    filtered = filter_logits(scaled, top_k_B, top_p_B) if any_filter else scaled
    noise = gumbel_noise(seeds_B, positions_B, logits.shape[-1])
    sampled = (filtered.double() + noise).argmax(-1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    return tokens, logp_full.gather(-1, tokens[:, None]).squeeze(-1)
