"""Policy-gradient losses: per-token surrogate losses, to be aggregated by ``aggregation.aggregate``.

Shape legend: S samples, R token positions; ``mask_SR`` marks the trained response tokens.

Every loss has ONE signature and is registered by name in ``POLICY_LOSSES``:

    fn(logp_SR, old_logp_SR, advantages_SR, mask_SR, cfg) -> (per_token_loss_SR, metrics)

per_token_loss is 0 outside the mask. metrics are detached 0-d tensors, masked means over this call's
tokens, with the same keys for every loss:
    clip_frac_low   A < 0 and r < 1 - ε_low     (lower clip active: no gradient)
    clip_frac_high  A > 0 and r > 1 + ε_high    (upper clip active: no gradient)
    clip_frac       clip_frac_low + clip_frac_high
    clip_frac_dual  A < 0 and the dual-clip bound -c·A is active (0 when dual clip is off)
    ppo_kl          mean(logπ_old - logπ_θ): k1 estimate of KL(π_old || π_θ)
    ratio_mean      mean of the ratio the loss used (r_t, or s_i for GSPO)

Symbols -> config fields: ε_low = eps_clip_low, ε_high = eps_clip_high, c = dual_clip_c.

ppo_clip  (PPO, Schulman et al. 2017; asymmetric "clip-higher" ε_high > ε_low from DAPO, Yu et al. 2025;
           dual clip from Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"):
    r_t = exp(logπ_θ(y_t) - logπ_old(y_t))
    l_t = max(-r_t·A_t, -clip(r_t, 1 - ε_low, 1 + ε_high)·A_t)
    dual clip, A_t < 0:  l_t = min(l_t, -c·A_t)        (a huge r_t cannot blow up a negative-A loss)
    d l_t / d logπ_θ(y_t) = -r_t·A_t where no clip is active, else 0.
gspo  (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization"), the paper's GSPO-token form:
    s_i  = exp( mean_{t in y_i} (logπ_θ(y_t) - logπ_old(y_t)) )       sequence-level ratio
    s_it = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]                          value s_i, d s_it/d logπ_θ(y_t) = s_i
    l_t  = max(-s_it·A_t, -clip(s_it, 1 - ε_low, 1 + ε_high)·A_t)      clipped per sequence
    With A_t = A_i and seq_mean_token_mean aggregation this has exactly the gradient of the
    sequence-level GSPO objective. The paper clips with ε_low = 3e-4, ε_high = 4e-4 (sequence ratios
    sit much closer to 1 than token ratios); set eps_clip_low/high accordingly. No dual clip.

Log-ratios are clamped to [-20, 20] before exp (no overflow; such a token is clipped anyway), and
padding positions never reach the exp, so garbage there cannot turn into NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from miles_lib.algorithms.registry import Registry

if TYPE_CHECKING:
    from miles_lib.algorithms.config import AlgorithmConfig

POLICY_LOSSES: Registry = Registry(
    "policy loss", params=("logp_SR", "old_logp_SR", "advantages_SR", "mask_SR", "cfg"))

LOG_RATIO_CLAMP = 20.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x·m) / sum(m) over mask != 0; 0 (not NaN) for an empty mask."""
    m = mask.to(x.dtype)
    return torch.where(mask != 0, x * m, 0.0).sum() / m.sum().clamp(min=1)


def _clipped_surrogate(ratio_SR, advantages_SR, mask_SR, cfg: AlgorithmConfig, dual_clip_c):
    m = mask_SR != 0
    adv = torch.where(m, advantages_SR, 0.0)
    unclipped = -ratio_SR * adv
    clipped = -ratio_SR.clamp(1 - cfg.eps_clip_low, 1 + cfg.eps_clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    r = ratio_SR.detach()
    low = (adv < 0) & (r < 1 - cfg.eps_clip_low)
    high = (adv > 0) & (r > 1 + cfg.eps_clip_high)
    dual = torch.zeros_like(m)
    if dual_clip_c is not None:
        bound = -dual_clip_c * adv
        dual = (adv < 0) & (loss.detach() > bound)
        loss = torch.where(dual, bound, loss)
    loss = torch.where(m, loss, 0.0)
    f = mask_SR.to(r.dtype)
    metrics = {
        "clip_frac_low": masked_mean(low.to(r.dtype), f),
        "clip_frac_high": masked_mean(high.to(r.dtype), f),
        "clip_frac_dual": masked_mean(dual.to(r.dtype), f),
        "ratio_mean": masked_mean(r, f),
    }
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    return loss, metrics


def _log_ratio(logp_SR, old_logp_SR, mask_SR):
    d = torch.where(mask_SR != 0, logp_SR - old_logp_SR.detach(), 0.0)
    return d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp_SR, old_logp_SR, advantages_SR, mask_SR, cfg: AlgorithmConfig):
    """Token-ratio PPO clip (clip-higher bounds, optional dual clip); see the module docstring."""
    log_ratio = _log_ratio(logp_SR, old_logp_SR, mask_SR)
    loss, metrics = _clipped_surrogate(log_ratio.exp(), advantages_SR, mask_SR, cfg, cfg.dual_clip_c)
    metrics["ppo_kl"] = masked_mean(-log_ratio.detach(), mask_SR)
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo(logp_SR, old_logp_SR, advantages_SR, mask_SR, cfg: AlgorithmConfig):
    """Sequence-ratio clip (GSPO-token form with stop-gradients); see the module docstring."""
    log_ratio = _log_ratio(logp_SR, old_logp_SR, mask_SR)
    m = (mask_SR != 0).to(log_ratio.dtype)
    seq_log_ratio_S = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)
    # value: s_i; gradient w.r.t. logp_t: s_i (the logp - sg[logp] term is 0 in value)
    own = torch.where(mask_SR != 0, logp_SR - logp_SR.detach(), 0.0)
    log_s = (seq_log_ratio_S.detach()[:, None] + own).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss, metrics = _clipped_surrogate(log_s.exp(), advantages_SR, mask_SR, cfg, None)
    metrics["ppo_kl"] = masked_mean(-log_ratio.detach(), mask_SR)
    return loss, metrics
