"""Train-inference mismatch correction. One signature:

    fn(train_logp_SR, rollout_logp_SR, mask_SR, cfg) -> (weights_SR, keep_SR, metrics)

ρ_t = π_train(y_t; θ_old) / π_rollout(y_t; θ_old) = exp(train_logp - rollout_logp): the trainer's
recomputed probability over the engine's for the same weights. Weights are stop-gradient and
multiply the per-token policy loss; ``keep`` zeroes tokens out of the loss (and its token count).

none        w = 1
tis         w_t = clamp(ρ_t, C_low, C)                  truncated IS, token level (Yao et al. 2025,
                                                         "Your efficient RL framework secretly brings you off-policy RL")
tis_seq     w_i = clamp(Π_t ρ_t, C_low, C)  (log space)  sequence level, broadcast to tokens
mis         w_t = ρ_t if C_low <= ρ_t <= C else 0        masked IS, token level (C_low defaults to 0)
mis_seq     w_i = ρ_i if C_low <= ρ_i <= C else 0,  ρ_i = exp(Σ_t log ρ_t)
icepop      w_t = ρ_t if a <= ρ_t <= b else 0           IcePop (Ring-1T, inclusionAI 2025), [a, b] =
                                                         [icepop_low, icepop_high] = [0.5, 5] by default
geo_mean    keep_i = [low <= exp(mean_t log ρ_t) <= high], w = 1   geometric-mean sequence filter
Bounds are inclusive: ρ exactly on a bound is kept / not clipped.
(C = is_upper, C_low = is_lower.)
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.algorithms.registry import Registry

OFF_POLICY: Registry = Registry("off-policy correction")


def _masked_mean(x, mask):
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def _seq_log_rho(log_rho, mask):
    return (log_rho * mask).sum(-1, keepdim=True)


@OFF_POLICY.register("none")
def no_correction(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    ones = torch.ones_like(mask, dtype=torch.float)
    return ones, ones, {}


@OFF_POLICY.register("tis")
def tis(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    rho = torch.exp(train_logp - rollout_logp).detach()
    w = rho.clamp(min=cfg.is_lower or 0.0, max=cfg.is_upper)
    m = mask.float()
    clipped = (rho > cfg.is_upper) | ((rho < cfg.is_lower) if cfg.is_lower is not None else torch.zeros_like(m, dtype=torch.bool))
    return w * m, m, {"is_weight_mean": _masked_mean(w, m), "is_clip_frac": _masked_mean(clipped.float(), m)}


@OFF_POLICY.register("tis_seq")
def tis_seq(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    m = mask.float()
    log_rho_i = _seq_log_rho((train_logp - rollout_logp).detach(), m)
    lo = torch.log(torch.tensor(cfg.is_lower)) if cfg.is_lower else torch.tensor(float("-inf"))
    w = torch.exp(log_rho_i.clamp(min=lo, max=torch.log(torch.tensor(cfg.is_upper)))).expand_as(m)
    clipped = ((log_rho_i > torch.log(torch.tensor(cfg.is_upper))) | (log_rho_i < lo)).float().expand_as(m)
    return w * m, m, {"is_weight_mean": _masked_mean(w, m), "is_clip_frac": _masked_mean(clipped, m)}


def _mask_by_rho(rho, m, low, high):
    inside = ((rho >= low) & (rho <= high)).float()
    w = rho * inside * m
    keep = inside * m
    return w, keep, {"is_weight_mean": _masked_mean(w, m), "is_mask_frac": _masked_mean(1 - inside, m)}


@OFF_POLICY.register("mis")
def mis(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    rho = torch.exp(train_logp - rollout_logp).detach()
    return _mask_by_rho(rho, mask.float(), cfg.is_lower or 0.0, cfg.is_upper)


@OFF_POLICY.register("mis_seq")
def mis_seq(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    m = mask.float()
    rho_i = torch.exp(_seq_log_rho((train_logp - rollout_logp).detach(), m)).expand_as(m)
    return _mask_by_rho(rho_i, m, cfg.is_lower or 0.0, cfg.is_upper)


@OFF_POLICY.register("icepop")
def icepop(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    rho = torch.exp(train_logp - rollout_logp).detach()
    return _mask_by_rho(rho, mask.float(), cfg.icepop_low, cfg.icepop_high)


@OFF_POLICY.register("geo_mean")
def geo_mean(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    m = mask.float()
    n = m.sum(-1, keepdim=True).clamp(min=1)
    geo = torch.exp(_seq_log_rho((train_logp - rollout_logp).detach(), m) / n)
    keep = ((geo >= cfg.geo_mean_low) & (geo <= cfg.geo_mean_high)).float().expand_as(m) * m
    return keep, keep, {"is_mask_frac": _masked_mean(1 - keep, m)}


def off_policy_weights(train_logp, rollout_logp, mask, cfg: AlgorithmConfig):
    """(weights, keep, metrics) for cfg.off_policy; 'none' when rollout log-probs are absent."""
    if rollout_logp is None:
        if cfg.off_policy != "none":
            raise ValueError(f"off_policy={cfg.off_policy!r} needs rollout log-probs, and the samples have none")
        return no_correction(train_logp, train_logp, mask, cfg)
    return OFF_POLICY.get(cfg.off_policy)(train_logp, rollout_logp, mask, cfg)


def mismatch_metrics(train_logp, rollout_logp, mask) -> dict[str, float]:
    """Train-inference mismatch on response tokens (DESIGN §5):
    train_rollout_logprob_abs_diff = mean |Δ|, train_rollout_exp_abs_diff = mean exp|Δ|,
    train_rollout_k3_kl = mean k3(train || rollout) = mean exp(-Δ) + Δ - 1, Δ = train_logp - rollout_logp."""
    m = mask.float()
    d = (train_logp - rollout_logp).detach().float()
    return {"train_rollout_logprob_abs_diff": _masked_mean(d.abs(), m),
            "train_rollout_logprob_abs_diff_max": float((d.abs() * m).max()) if m.sum() > 0 else 0.0,
            "train_rollout_exp_abs_diff": _masked_mean(torch.exp(d.abs()), m),
            "train_rollout_k3_kl": _masked_mean(torch.exp(-d) + d - 1, m)}


def choose_old_logp(train_old_logp, rollout_logp, cfg: AlgorithmConfig):
    """π_old for the PPO ratio: the trainer's recompute, or the rollout's log-probs (bypass)."""
    if cfg.use_rollout_logprobs_as_old:
        if rollout_logp is None:
            raise ValueError("use_rollout_logprobs_as_old needs rollout log-probs, and the samples have none")
        return rollout_logp
    return train_old_logp
