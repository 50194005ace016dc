"""KL estimators of KL(π_θ || π_ref) per token (Schulman, "Approximating KL divergence", 2020).

With d = logπ_ref - logπ_θ (log-ratio of reference over policy, tokens sampled from π_θ):
    k1 = logπ_θ - logπ_ref = -d
    k2 = ½ (logπ_θ - logπ_ref)² = ½ d²
    k3 = exp(d) - d - 1        ("low_var_kl", unbiased and >= 0), clamped to [-10, 10]
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3", "low_var_kl")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    return KL_ESTIMATORS.get(estimator)(logp, ref_logp)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position (stable for large logits)."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
