"""Reducing a per-token loss to the scalar that is backpropagated.

Shape legend: S samples, R token positions; m_it = mask_SR (0/1, or non-negative token weights).

    token_mean           L = sum_{i,t} m_it l_it / N
    seq_mean_token_mean  L = (1 / S_g) sum_i [ sum_t m_it l_it / sum_t m_it ]
    seq_mean_token_sum   L = (1 / S_g) sum_i [ sum_t m_it l_it ] / C        (Dr.GRPO, Liu et al. 2025)

N = the number of masked tokens, S_g = the number of sequences with at least one masked token, both
of the GLOBAL batch (all micro-batches of one optimizer step on all data-parallel ranks);
C = a constant (config ``seq_token_sum_norm``, Dr.GRPO uses the generation budget, e.g.
max_new_tokens), NOT the padded length, which changes from micro-batch to micro-batch.

Why global normalizers: a rank, or a micro-batch, sees only part of the batch. If each part divided
by its OWN token count, parts with few tokens would be over-weighted and the sum of parts would not be
the full-batch loss: the update would depend on how the batch was split. With every part's numerator
divided by the same global N (or S_g), the parts' losses -- and gradients -- add up to the
full-batch value exactly, for any split and any padding. Callers pass ``global_num_tokens`` /
``global_num_seqs`` (an all-reduced count); without them the local count is used (one part = the
whole batch). Empty masks give 0, not NaN; values at unmasked positions (padding) are ignored even
when they are inf/NaN.

Every mode has one signature and is registered by name in ``AGGREGATIONS``:
    fn(loss_SR, mask_SR, *, global_num_tokens, global_num_seqs, seq_token_sum_norm) -> scalar
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.registry import Registry

AGGREGATIONS: Registry = Registry("loss aggregation mode", params=("loss_SR", "mask_SR"))


def _masked(loss_SR: torch.Tensor, mask_SR: torch.Tensor) -> torch.Tensor:
    """l·m where m != 0, exactly 0 elsewhere (inf/NaN padding never leaks in)."""
    return torch.where(mask_SR != 0, loss_SR * mask_SR.to(loss_SR.dtype), 0.0)


def _num_seqs(mask_SR: torch.Tensor, global_num_seqs, global_num_tokens, mode: str):
    if global_num_seqs is not None:
        return global_num_seqs
    if global_num_tokens is not None:
        raise ValueError(
            f"loss_agg_mode={mode!r} divides by the number of sequences: pass global_num_seqs (the "
            "batch-wide count of sequences with a masked token), not only global_num_tokens, or the "
            "micro-batch/rank losses will not add up to the full-batch loss")
    return (mask_SR != 0).any(-1).sum().clamp(min=1)


@AGGREGATIONS.register("token_mean")
def token_mean(loss_SR, mask_SR, *, global_num_tokens=None, global_num_seqs=None, seq_token_sum_norm=None):
    n = global_num_tokens if global_num_tokens is not None else mask_SR.to(loss_SR.dtype).sum().clamp(min=1)
    return _masked(loss_SR, mask_SR).sum() / n


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss_SR, mask_SR, *, global_num_tokens=None, global_num_seqs=None,
                        seq_token_sum_norm=None):
    seq_tokens = mask_SR.to(loss_SR.dtype).sum(-1).clamp(min=1)
    per_seq = _masked(loss_SR, mask_SR).sum(-1) / seq_tokens
    return per_seq.sum() / _num_seqs(mask_SR, global_num_seqs, global_num_tokens, "seq_mean_token_mean")


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(loss_SR, mask_SR, *, global_num_tokens=None, global_num_seqs=None,
                       seq_token_sum_norm=None):
    if seq_token_sum_norm is None or not seq_token_sum_norm > 0:
        raise ValueError(f"seq_mean_token_sum needs a constant seq_token_sum_norm > 0 (Dr.GRPO uses "
                         f"the generation budget, e.g. max_new_tokens), got {seq_token_sum_norm!r}")
    total = _masked(loss_SR, mask_SR).sum() / seq_token_sum_norm
    return total / _num_seqs(mask_SR, global_num_seqs, global_num_tokens, "seq_mean_token_sum")


def aggregate(loss_SR: torch.Tensor, mask_SR: torch.Tensor, mode: str = "token_mean", *,
              global_num_tokens: float | torch.Tensor | None = None,
              global_num_seqs: float | torch.Tensor | None = None,
              seq_token_sum_norm: float | None = None) -> torch.Tensor:
    """Scalar loss of ``mode`` (see the module docstring for the formulas and the normalizers)."""
    if loss_SR.shape != mask_SR.shape:
        raise ValueError(f"aggregate: loss has shape {tuple(loss_SR.shape)}, mask {tuple(mask_SR.shape)}")
    return AGGREGATIONS.get(mode)(loss_SR, mask_SR, global_num_tokens=global_num_tokens,
                                  global_num_seqs=global_num_seqs, seq_token_sum_norm=seq_token_sum_norm)
