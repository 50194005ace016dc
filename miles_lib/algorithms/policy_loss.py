"""Policy-gradient losses. One signature:

    fn(logp_SR, old_logp_SR, advantages_SR, mask_SR, cfg) -> (per_token_loss_SR, metrics)

ppo_clip (Schulman et al. 2017; clip-higher from DAPO, Yu et al. 2025; dual clip from Ye et al. 2020):
    r_t = exp(logπ_θ - logπ_old)
    l_t = max(-r_t A_t, -clip(r_t, 1 - ε_low, 1 + ε_high) A_t)
    dual clip (A_t < 0, c = dual_clip_c):  l_t = min(l_t, -c A_t)
gspo (Zheng et al. 2025, Group Sequence Policy Optimization):
    s_i = exp( mean_{t in y_i} (logπ_θ - logπ_old) )         sequence-level ratio
    s_it = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]                 same value, token-level gradient
    l_t = max(-s_it A_t, -clip(s_it, 1 - ε_low, 1 + ε_high) A_t)
Metrics: clip fractions (low side, high side, dual) over masked tokens and approx KL(old||θ) = mean(-log r).
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.algorithms.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _clipped_objective(ratio, advantages, mask, cfg: AlgorithmConfig):
    surr1 = -ratio * advantages
    surr2 = -ratio.clamp(1 - cfg.eps_clip_low, 1 + cfg.eps_clip_high) * advantages
    loss = torch.maximum(surr1, surr2)
    m = mask.to(loss.dtype)
    metrics = {
        "clip_frac_low": _masked_mean(((ratio < 1 - cfg.eps_clip_low) & (advantages < 0)).to(m.dtype), m),
        "clip_frac_high": _masked_mean(((ratio > 1 + cfg.eps_clip_high) & (advantages > 0)).to(m.dtype), m),
    }
    if cfg.dual_clip_c is not None:
        bound = -cfg.dual_clip_c * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        metrics["clip_frac_dual"] = _masked_mean(dual.to(m.dtype), m)
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    return loss, metrics


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp, old_logp, advantages, mask, cfg: AlgorithmConfig):
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss, metrics = _clipped_objective(ratio, advantages, mask, cfg)
    metrics["ppo_kl"] = _masked_mean(-log_ratio.detach(), mask.to(logp.dtype))
    metrics["ratio_mean"] = _masked_mean(ratio.detach(), mask.to(logp.dtype))
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo(logp, old_logp, advantages, mask, cfg: AlgorithmConfig):
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    seq_log_ratio = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)  # [S]
    token_ratio = torch.exp(seq_log_ratio.detach()[:, None] + logp - logp.detach())
    loss, metrics = _clipped_objective(token_ratio, advantages, mask, cfg)
    metrics["ppo_kl"] = _masked_mean(-log_ratio.detach(), m)
    metrics["ratio_mean"] = _masked_mean(token_ratio.detach(), m)
    return loss, metrics
