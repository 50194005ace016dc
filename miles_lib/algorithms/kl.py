"""Per-token KL estimators and the token entropy.

KL estimators of KL(π_θ || π_ref) from tokens sampled from π_θ (Schulman 2020, "Approximating KL
Divergence"), as functions of (logp, ref_logp) = (logπ_θ(y_t), logπ_ref(y_t)); registered by name in
``KL_ESTIMATORS`` with one signature ``fn(logp, ref_logp) -> kl`` (same shape):

    k1 = logπ_θ - logπ_ref                          unbiased, high variance, can be negative
    k2 = ½ (logπ_θ - logπ_ref)²                     biased, low variance, >= 0
    k3 = exp(d) - d - 1,  d = logπ_ref - logπ_θ     unbiased, low variance, >= 0   (alias low_var_kl)
         d is clamped to [-20, 20] before exp (no overflow / inf - inf), k3 to [-10, 10]  (as verl).

Used (a) as a loss term β·agg(kl_t) with β = kl_loss_coef (gradient flows through logp), and
(b) in REINFORCE++ reward shaping r_t -= β_r·kl_t with β_r = kl_in_reward_coef (on detached
log-probs of the old policy); the estimator is cfg.kl_estimator for both.

Entropy of the next-token distribution, for the entropy bonus -α·agg(H_t), α = entropy_coef:
    H = logsumexp(z) - sum_v softmax(z)_v · z_v        (z shifted by its max first)
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator", params=("logp", "ref_logp"))


@KL_ESTIMATORS.register("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3", "low_var_kl")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL by estimator name (k1, k2, k3, low_var_kl); ref_logp is not differentiated."""
    return KL_ESTIMATORS.get(estimator)(logp, ref_logp.detach())


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy over the last axis, in float32: [..., V] -> [...].

    Stable for large logits (logsumexp) and for -inf logits (masked vocabulary entries contribute 0,
    and their gradient is 0, not NaN). ``chunk_size`` rows at a time bounds the forward's float32
    temporaries to chunk_size·V (useful for a no-grad pass over a long batch; under autograd each
    chunk still keeps its softmax for backward).
    """
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])
    if chunk_size is None or chunk_size >= z.shape[0]:
        return _entropy(z).reshape(lead)
    parts = [_entropy(z[s:s + chunk_size]) for s in range(0, z.shape[0], chunk_size)]
    return torch.cat(parts).reshape(lead)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    # H is shift-invariant; shifting by the row max keeps both terms O(log V) instead of O(max z),
    # so they do not cancel catastrophically (in fp32 at |z| ~ 1e4 the ulp alone is 1e-3)
    z = z.float()
    z = z - z.detach().amax(-1, keepdim=True)
    p = z.softmax(-1)
    z_finite = torch.where(torch.isfinite(z), z, 0.0)  # p = 0 exactly where z = -inf
    return torch.logsumexp(z, -1) - (p * z_finite).sum(-1)
