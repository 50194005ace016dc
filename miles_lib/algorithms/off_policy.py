"""Train-inference mismatch: correction weights, the old-policy choice, and mismatch metrics.

The rollout engine and the trainer compute the "same" probabilities with different kernels (and,
for MoE, possibly different routing), so the samples come from π_rollout, not from π_train:

    ρ_t = π_train(y_t; θ_old) / π_rollout(y_t; θ_old) = exp(Δ_t),  Δ_t = train_logp_t - rollout_logp_t

Shape legend: S samples, R token positions; mask_SR marks response tokens (nonzero = a response
token; here it is a 0/1 selector, not a weight).

Every correction has ONE signature and is registered by name in ``OFF_POLICY``:

    fn(train_logp_SR, rollout_logp_SR, mask_SR, cfg) -> (weights_SR, keep_mask_SR, metrics)

weights are detached (stop-gradient) and multiply the per-token policy-gradient loss; keep_mask
(a subset of mask) marks the tokens left in the loss; both are 0 outside the mask. metrics are Python
floats over the masked tokens, same keys for every mode: is_weight_mean, is_clip_frac (tokens whose
weight was truncated), is_mask_frac (tokens dropped). Sequence modes count the tokens of affected
sequences.

    none      w_t = 1
    tis       w_t = clamp(ρ_t, C_low, C)               truncated IS, token level (Yao et al. 2025, "Your
                                                      Efficient RL Framework Secretly Brings You Off-Policy RL Training")
    tis_seq   w_i = clamp(Π_t ρ_t, C_low, C)           sequence level, in log space, broadcast to tokens
    mis       w_t = ρ_t if C_low <= ρ_t <= C else 0    masked IS, token level
    mis_seq   w_i = ρ_i if C_low <= ρ_i <= C else 0,  ρ_i = exp(Σ_t Δ_t)
    icepop    w_t = ρ_t if a <= ρ_t <= b else 0        IcePop (inclusionAI 2025, Ring-1T): two-sided
                                                      token mask; our choice: the kept tokens keep their
                                                      IS weight ρ_t (the write-up's M(k) = k inside [a, b])
    geo_mean  keep_i = [g_low <= exp(mean_t Δ_t) <= g_high], w = keep (a filter: no re-weighting)

Config fields: C = is_upper (2.0), C_low = is_lower (None: no lower clip / bound), [a, b] =
[icepop_low, icepop_high] ([0.5, 5]), [g_low, g_high] = [geo_mean_low, geo_mean_high] ([0.999, 1.001]).

Bounds are INCLUSIVE and decided in log space, Δ against log(bound) rounded to Δ's dtype: a ρ equal
to a bound is kept / not clipped. (Comparing exp(Δ) instead would let rounding decide.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from miles_lib.algorithms.registry import Registry

if TYPE_CHECKING:
    from miles_lib.algorithms.config import AlgorithmConfig

OFF_POLICY: Registry = Registry(
    "off-policy correction", params=("train_logp_SR", "rollout_logp_SR", "mask_SR", "cfg"))


# ---- helpers ------------------------------------------------------------------------------------
def _delta(train_logp_SR, rollout_logp_SR, mask_SR) -> torch.Tensor:
    """Δ = train - rollout on masked tokens (0 elsewhere), detached, at least float32."""
    dtype = torch.promote_types(train_logp_SR.dtype, torch.float32)
    d = train_logp_SR.detach().to(dtype) - rollout_logp_SR.detach().to(dtype)
    return torch.where(mask_SR != 0, d, 0.0)


def _log_bound(value: float | None, like: torch.Tensor, default: float) -> torch.Tensor:
    v = math.log(value) if value else default  # None or 0 -> default (-inf: no lower bound)
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _seq_sum(d_SR: torch.Tensor) -> torch.Tensor:
    return d_SR.sum(-1, keepdim=True)  # Δ is 0 outside the mask


def _mean(x: torch.Tensor, m: torch.Tensor) -> float:
    return float(torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1))


def _result(w, keep, clipped, m) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    w = torch.where(m, w, 0.0).expand(m.shape).detach()
    keep = (keep & m).to(w.dtype)
    metrics = {"is_weight_mean": _mean(w, m), "is_clip_frac": _mean(clipped.expand(m.shape).to(w.dtype), m),
               "is_mask_frac": _mean((~keep.bool()).to(w.dtype), m)}
    return w, keep, metrics


def _truncate(log_rho, lo, hi):
    """clamp(exp(log_rho), exp(lo), exp(hi)) with the bound values exact when clipped."""
    w = torch.where(log_rho > hi, hi.exp(), log_rho.exp())
    w = torch.where(log_rho < lo, lo.exp(), w)
    return w, (log_rho > hi) | (log_rho < lo)


# ---- corrections --------------------------------------------------------------------------------
@OFF_POLICY.register("none")
def no_correction(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    m = mask_SR != 0
    ones = torch.ones(m.shape, dtype=torch.float32, device=m.device)
    return _result(ones, m, torch.zeros_like(m), m)


@OFF_POLICY.register("tis")
def tis(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    d, m = _delta(train_logp_SR, rollout_logp_SR, mask_SR), mask_SR != 0
    w, clipped = _truncate(d, _log_bound(cfg.is_lower, d, -math.inf), _log_bound(cfg.is_upper, d, math.inf))
    return _result(w, m, clipped, m)


@OFF_POLICY.register("tis_seq")
def tis_seq(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    d, m = _delta(train_logp_SR, rollout_logp_SR, mask_SR), mask_SR != 0
    w, clipped = _truncate(_seq_sum(d), _log_bound(cfg.is_lower, d, -math.inf),
                           _log_bound(cfg.is_upper, d, math.inf))
    return _result(w, m, clipped, m)


def _mask_outside(log_rho, m, lo, hi):
    inside = (log_rho >= lo) & (log_rho <= hi)
    w = torch.where(inside, log_rho.exp(), 0.0)
    return _result(w, inside.expand(m.shape), torch.zeros_like(m), m)


@OFF_POLICY.register("mis")
def mis(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    d, m = _delta(train_logp_SR, rollout_logp_SR, mask_SR), mask_SR != 0
    return _mask_outside(d, m, _log_bound(cfg.is_lower, d, -math.inf), _log_bound(cfg.is_upper, d, math.inf))


@OFF_POLICY.register("mis_seq")
def mis_seq(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    d, m = _delta(train_logp_SR, rollout_logp_SR, mask_SR), mask_SR != 0
    return _mask_outside(_seq_sum(d), m, _log_bound(cfg.is_lower, d, -math.inf),
                         _log_bound(cfg.is_upper, d, math.inf))


@OFF_POLICY.register("icepop")
def icepop(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    d, m = _delta(train_logp_SR, rollout_logp_SR, mask_SR), mask_SR != 0
    return _mask_outside(d, m, _log_bound(cfg.icepop_low, d, -math.inf), _log_bound(cfg.icepop_high, d, math.inf))


@OFF_POLICY.register("geo_mean")
def geo_mean_filter(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    d, m = _delta(train_logp_SR, rollout_logp_SR, mask_SR), mask_SR != 0
    mean_log_rho = _seq_sum(d) / m.sum(-1, keepdim=True).clamp(min=1)
    keep = ((mean_log_rho >= _log_bound(cfg.geo_mean_low, d, -math.inf))
            & (mean_log_rho <= _log_bound(cfg.geo_mean_high, d, math.inf))).expand(m.shape)
    return _result(keep.to(d.dtype), keep, torch.zeros_like(m), m)


# ---- entry points the trainer calls -------------------------------------------------------------
def off_policy_weights(train_logp_SR, rollout_logp_SR, mask_SR, cfg: AlgorithmConfig):
    """(weights, keep_mask, metrics) of cfg.off_policy. Without rollout log-probs only 'none' works."""
    if rollout_logp_SR is None:
        if cfg.off_policy != "none":
            raise ValueError(f"off_policy={cfg.off_policy!r} needs rollout log-probs and the samples have "
                             "none: make the rollout engine return them, or set off_policy='none'")
        return no_correction(train_logp_SR, train_logp_SR, mask_SR, cfg)
    return OFF_POLICY.get(cfg.off_policy)(train_logp_SR, rollout_logp_SR, mask_SR, cfg)


def choose_old_logp(train_old_logp_SR, rollout_logp_SR, cfg: AlgorithmConfig) -> torch.Tensor:
    """logπ_old for the PPO ratio: the trainer's recompute, or -- with use_rollout_logprobs_as_old --
    the rollout engine's log-probs (skips the recompute; the ratio then also absorbs the mismatch)."""
    if cfg.use_rollout_logprobs_as_old:
        if rollout_logp_SR is None:
            raise ValueError("use_rollout_logprobs_as_old=True needs rollout log-probs and the samples "
                             "have none: make the rollout engine return them, or turn the flag off")
        return rollout_logp_SR
    if train_old_logp_SR is None:
        raise ValueError("no old log-probs: recompute them with the trainer, or set "
                         "use_rollout_logprobs_as_old=True")
    return train_old_logp_SR


def mismatch_metrics(train_logp_SR, rollout_logp_SR, mask_SR) -> dict[str, float]:
    """Train-inference mismatch over masked tokens (DESIGN §5), with Δ_t = train_logp_t - rollout_logp_t:

        train_rollout_logprob_abs_diff      mean |Δ_t|
        train_rollout_logprob_abs_diff_max  max |Δ_t|
        train_rollout_exp_abs_diff          mean exp(|Δ_t|) = mean max(ρ_t, 1/ρ_t)   (>= 1; 1 = aligned)
        train_rollout_prob_abs_diff         mean |π_train(y_t) - π_rollout(y_t)|     (probability space)
        train_rollout_k3_kl                 mean (ρ_t - Δ_t - 1): k3 estimate of KL(π_rollout || π_train)
                                            from the rollout's own samples (>= 0)
    All 0 for an empty mask.
    """
    m = mask_SR != 0
    d = _delta(train_logp_SR, rollout_logp_SR, mask_SR)
    a = d.abs()
    probs = (train_logp_SR.detach().to(d.dtype).exp() - rollout_logp_SR.detach().to(d.dtype).exp()).abs()
    return {
        "train_rollout_logprob_abs_diff": _mean(a, m),
        "train_rollout_logprob_abs_diff_max": float(a.max()) if a.numel() else 0.0,
        "train_rollout_exp_abs_diff": _mean(a.exp(), m),
        "train_rollout_prob_abs_diff": _mean(probs, m),
        "train_rollout_k3_kl": _mean(d.clamp(max=20).exp() - d - 1, m),
    }
