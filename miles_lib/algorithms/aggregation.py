"""Reducing per-token losses to one scalar.

token_mean:            L = sum_{i,t} m_it l_it / N          N = number of masked tokens in the GLOBAL batch
seq_mean_token_mean:   L = (1 / S) sum_i [ sum_t m_it l_it / sum_t m_it ]      S = global sequence count
seq_mean_token_sum:    L = (1 / S) sum_i [ sum_t m_it l_it ] / norm            (Dr.GRPO: a constant
                       norm, seq_token_sum_norm, or the padded response length when it is 0)

Why global normalizers: a rank (or a micro-batch) sees only part of the batch. If each part
divides by its OWN token count, the sum of parts is not the full-batch loss (parts with few tokens
get overweighted). Dividing every part's sum by the global N (or S) makes the parts add up to the
full-batch value exactly, so gradient accumulation and data parallelism do not change the update.
Callers pass ``global_tokens`` / ``global_seqs``; without them the local counts are used.
"""

from __future__ import annotations

import torch


def aggregate(loss_SR: torch.Tensor, mask_SR: torch.Tensor, mode: str, global_tokens: float | None = None,
              global_seqs: float | None = None, seq_token_sum_norm: float = 0.0) -> torch.Tensor:
    mask = mask_SR.to(loss_SR.dtype)
    if mode == "token_mean":
        n = global_tokens if global_tokens is not None else mask.sum().clamp(min=1)
        return (loss_SR * mask).sum() / n
    seq_tokens = mask.sum(-1)
    has = (seq_tokens > 0).to(loss_SR.dtype)
    S = global_seqs if global_seqs is not None else has.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        per_seq = (loss_SR * mask).sum(-1) / seq_tokens.clamp(min=1)
        return (per_seq * has).sum() / S
    if mode == "seq_mean_token_sum":
        norm = seq_token_sum_norm if seq_token_sum_norm > 0 else float(mask_SR.shape[-1])
        return ((loss_SR * mask).sum(-1) / norm).sum() / S
    raise ValueError(f"unknown loss_agg_mode {mode!r}")
