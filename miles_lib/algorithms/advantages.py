"""Advantage estimators: one scalar reward per sample -> one advantage per response token.

Shape legend: S samples (responses), R token positions (a response layout, or the trainer's [S, L]
layout: only the mask says which positions are response tokens), G groups (one per prompt).

Every estimator has ONE signature and is registered by name in ``ADVANTAGES``:

    fn(rewards_S, group_ids_S, response_mask_SR, cfg, *, kl_SR=None) -> advantages_SR

``group_ids_S`` are arbitrary integers tying the samples of one prompt together; the result is 0
outside the mask. Group statistics are taken in float64, so a group of identical rewards gets an
advantage of exactly 0 (it carries no learning signal), as does a group of one sample.

Symbols -> config fields (``AlgorithmConfig``):  ε = adv_std_eps (1e-6),  β_r = kl_in_reward_coef,
γ = gamma,  kl_t = kl_SR (per-token KL(π_old || π_ref) from ``kl.kl_penalty`` with cfg.kl_estimator).

grpo  (GRPO, Shao et al. 2024, "DeepSeekMath"):
    A_i = (R_i - mean_g R) / (std_g R + ε)
    std_g is the UNBIASED sample std (divides by n_g - 1; torch.std's default, as in verl).
dr_grpo  (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"):
    A_i = R_i - mean_g R                       (no std division: no difficulty re-weighting)
rloo  (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization ..."):
    A_i = R_i - mean_{j in g, j != i} R_j  =  n_g / (n_g - 1) · (R_i - mean_g R)
reinforce_plus_plus  (Hu 2025, "REINFORCE++"):
    r_it = -β_r · kl_it + [t = last response token of i] · R_i       token rewards
    G_it = sum_{t' >= t} γ^(t' - t) r_it'                              return-to-go
    A_it = (G_it - μ) / (σ + ε),   μ, σ = mean and unbiased std of G over ALL masked tokens of the batch
reinforce_plus_plus_baseline  (same paper, the group-baseline variant):
    as reinforce_plus_plus with R_i replaced by R_i - mean_g R.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from miles_lib.algorithms.registry import Registry

if TYPE_CHECKING:
    from miles_lib.algorithms.config import AlgorithmConfig

ADVANTAGES: Registry = Registry(
    "advantage estimator", params=("rewards_S", "group_ids_S", "response_mask_SR", "cfg"))


# ---- group statistics ---------------------------------------------------------------------------
class _Groups:
    """Per-sample views of per-group statistics of ``rewards_S`` (float64)."""

    def __init__(self, rewards_S: torch.Tensor, group_ids_S: torch.Tensor) -> None:
        r = rewards_S.double()
        _, inv = torch.unique(group_ids_S, return_inverse=True)
        G = int(inv.max()) + 1 if inv.numel() else 0
        zeros = torch.zeros(G, dtype=torch.float64, device=r.device)
        count = zeros.index_add(0, inv, torch.ones_like(r))
        total = zeros.index_add(0, inv, r)
        mean = total / count
        sq = zeros.index_add(0, inv, (r - mean[inv]) ** 2)
        var = torch.where(count > 1, sq / (count - 1).clamp(min=1), zeros)
        lo = zeros.scatter_reduce(0, inv, r, "amin", include_self=False)
        hi = zeros.scatter_reduce(0, inv, r, "amax", include_self=False)
        self.rewards, self.count, self.total = r, count[inv], total[inv]
        self.mean, self.std = mean[inv], var.sqrt()[inv]
        # no signal: one sample, or all rewards equal (mean may differ from them by an ulp)
        self.degenerate = (count[inv] < 2) | (lo[inv] == hi[inv])


def _check_inputs(rewards_S, group_ids_S, response_mask_SR) -> None:
    if rewards_S.dim() != 1:
        raise ValueError(f"rewards_S must be 1-D [num_samples], got shape {tuple(rewards_S.shape)}")
    if tuple(group_ids_S.shape) != tuple(rewards_S.shape):
        raise ValueError(f"group_ids_S has shape {tuple(group_ids_S.shape)}, rewards_S "
                         f"{tuple(rewards_S.shape)}: give one group id per sample")
    if group_ids_S.is_floating_point():
        raise ValueError("group_ids_S must be an integer tensor (one prompt id per sample)")
    if response_mask_SR.dim() != 2 or response_mask_SR.shape[0] != rewards_S.shape[0]:
        raise ValueError(f"response_mask_SR must be [num_samples={rewards_S.shape[0]}, positions], "
                         f"got shape {tuple(response_mask_SR.shape)}")
    bad = (~torch.isfinite(rewards_S.double())).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards_S is not finite at samples {bad[:10]}: fix the reward function "
                         "(a NaN reward would poison its whole group)")


def _broadcast(adv_S: torch.Tensor, mask_SR: torch.Tensor) -> torch.Tensor:
    """A_i on every masked token of sample i, 0 elsewhere."""
    return torch.where(mask_SR > 0, adv_S[:, None], torch.zeros((), dtype=adv_S.dtype, device=adv_S.device))


# ---- group estimators ---------------------------------------------------------------------------
@ADVANTAGES.register("grpo")
def grpo(rewards_S, group_ids_S, response_mask_SR, cfg: AlgorithmConfig, *, kl_SR=None):
    """A_i = (R_i - mean_g R) / (std_g R + ε), unbiased std; 0 for degenerate groups."""
    g = _Groups(rewards_S, group_ids_S)
    adv = (g.rewards - g.mean) / (g.std + cfg.adv_std_eps)
    return _broadcast(torch.where(g.degenerate, 0.0, adv), response_mask_SR)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards_S, group_ids_S, response_mask_SR, cfg: AlgorithmConfig, *, kl_SR=None):
    """A_i = R_i - mean_g R; 0 for degenerate groups."""
    g = _Groups(rewards_S, group_ids_S)
    return _broadcast(torch.where(g.degenerate, 0.0, g.rewards - g.mean), response_mask_SR)


@ADVANTAGES.register("rloo")
def rloo(rewards_S, group_ids_S, response_mask_SR, cfg: AlgorithmConfig, *, kl_SR=None):
    """A_i = R_i - (sum_g R - R_i) / (n_g - 1); 0 for degenerate groups (incl. n_g = 1)."""
    g = _Groups(rewards_S, group_ids_S)
    loo_mean = (g.total - g.rewards) / (g.count - 1).clamp(min=1)
    return _broadcast(torch.where(g.degenerate, 0.0, g.rewards - loo_mean), response_mask_SR)


# ---- token-level estimators (REINFORCE++) -------------------------------------------------------
def discounted_returns(rewards_SR: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{t' >= t} γ^(t' - t) r_t' along the last axis (positions outside the response
    should carry r = 0; the discount counts positions)."""
    if gamma == 1.0:
        return rewards_SR.flip(-1).cumsum(-1).flip(-1)
    out = torch.empty_like(rewards_SR)
    running = torch.zeros_like(rewards_SR[..., 0])
    for t in reversed(range(rewards_SR.shape[-1])):
        running = rewards_SR[..., t] + gamma * running
        out[..., t] = running
    return out


def masked_whiten(x_SR: torch.Tensor, mask_SR: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - μ) / (σ + eps) on masked positions (0 elsewhere); μ, σ = mean, unbiased std over the
    masked positions of the whole tensor (σ = 0 with fewer than two of them)."""
    m = mask_SR > 0
    n = m.sum()
    xm = torch.where(m, x_SR, 0.0)
    mu = xm.sum() / n.clamp(min=1)
    var = torch.where(m, (x_SR - mu) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
    return torch.where(m, (x_SR - mu) / (var.sqrt() + eps), 0.0)


def _reinforce_pp(scalar_S: torch.Tensor, response_mask_SR, cfg: AlgorithmConfig, kl_SR):
    m = response_mask_SR > 0
    S, R = m.shape
    token_rewards = torch.zeros(S, R, dtype=torch.float64, device=m.device)
    if cfg.kl_in_reward_coef > 0:
        if kl_SR is None:
            raise ValueError(f"{cfg.advantage_estimator} with kl_in_reward_coef="
                             f"{cfg.kl_in_reward_coef} needs kl_SR (per-token KL to the reference)")
        if tuple(kl_SR.shape) != (S, R):
            raise ValueError(f"kl_SR has shape {tuple(kl_SR.shape)}, response_mask_SR {(S, R)}")
        token_rewards -= cfg.kl_in_reward_coef * torch.where(m, kl_SR.double(), 0.0)
    positions = torch.arange(R, device=m.device).expand(S, R)
    last = torch.where(m, positions, -1).amax(-1)  # last masked position, -1 for an empty row
    has = last >= 0
    rows = torch.arange(S, device=m.device)[has]
    token_rewards[rows, last[has]] += scalar_S.double()[has]
    returns = discounted_returns(token_rewards, cfg.gamma)
    return masked_whiten(returns, m, cfg.adv_std_eps)


@ADVANTAGES.register("reinforce_plus_plus")
def reinforce_plus_plus(rewards_S, group_ids_S, response_mask_SR, cfg: AlgorithmConfig, *, kl_SR=None):
    """Token rewards (-β_r kl_t, R_i at the last token) -> returns-to-go -> batch whitening."""
    return _reinforce_pp(rewards_S.double(), response_mask_SR, cfg, kl_SR)


@ADVANTAGES.register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(rewards_S, group_ids_S, response_mask_SR, cfg: AlgorithmConfig, *,
                                 kl_SR=None):
    """As reinforce_plus_plus with the group-mean baseline subtracted from R_i first."""
    g = _Groups(rewards_S, group_ids_S)
    centered = torch.where(g.degenerate, 0.0, g.rewards - g.mean)
    return _reinforce_pp(centered, response_mask_SR, cfg, kl_SR)


def compute_advantages(rewards_S: torch.Tensor, group_ids_S: torch.Tensor, response_mask_SR: torch.Tensor,
                       cfg: AlgorithmConfig, *, kl_SR: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages of ``cfg.advantage_estimator`` (float32, or float64 for float64 rewards)."""
    _check_inputs(rewards_S, group_ids_S, response_mask_SR)
    out_dtype = torch.float64 if rewards_S.dtype == torch.float64 else torch.float32
    fn = ADVANTAGES.get(cfg.advantage_estimator)
    return fn(rewards_S, group_ids_S, response_mask_SR, cfg, kl_SR=kl_SR).to(out_dtype)
