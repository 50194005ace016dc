"""The whole actor objective in one function: the scalar a trainer backpropagates, and its metrics.

    L = agg(w ⊙ l^PG) + β·agg(kl(logπ_θ, logπ_ref)) - α·agg(H)

    l^PG  per-token policy loss of cfg.policy_loss (ppo_clip | gspo), from logπ_θ, logπ_old, A
    w     off-policy correction weights (stop-gradient; off_policy.off_policy_weights), or 1
    kl    per-token KL of cfg.kl_estimator, β = cfg.kl_loss_coef (term present iff β > 0)
    H     per-token entropy (kl.entropy_from_logits), α = cfg.entropy_coef (term present iff α > 0)
    agg   cfg.loss_agg_mode with the GLOBAL normalizers ``global_num_tokens`` / ``global_num_seqs``
          (aggregation.py): the micro-batch / rank losses of one optimizer step then sum to the
          full-batch loss.

Metrics (detached 0-d tensors) are this call's own means -- aggregated with LOCAL normalizers so a
logger can average them over micro-batches -- : pg_loss (after the off-policy weights), the policy
loss's clip fractions / ppo_kl / ratio_mean, kl_loss (when reference log-probs are given) and entropy
(when given). The exact total is the returned scalar (no "loss" key, so a caller's own is not shadowed).
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.aggregation import aggregate
from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.algorithms.kl import kl_penalty
from miles_lib.algorithms.policy_loss import POLICY_LOSSES


def compute_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cfg: AlgorithmConfig, *,
                        is_weights: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                        entropy: torch.Tensor | None = None,
                        global_num_tokens: float | torch.Tensor | None = None,
                        global_num_seqs: float | torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(scalar loss, metrics) for one micro-batch; all tensors [S, R] aligned with ``mask``."""
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("is_weights", is_weights),
                    ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"compute_policy_loss: {name} has shape {tuple(t.shape)}, logp {tuple(logp.shape)}")
    if cfg.kl_loss_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_loss_coef={cfg.kl_loss_coef} needs ref_logp (reference-model log-probs); "
                         "load a reference model or set kl_loss_coef=0")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={cfg.entropy_coef} needs the token entropies (entropy=...)")

    def agg(x: torch.Tensor, local: bool = False) -> torch.Tensor:
        return aggregate(x, mask, cfg.loss_agg_mode, seq_token_sum_norm=cfg.seq_token_sum_norm,
                         global_num_tokens=None if local else global_num_tokens,
                         global_num_seqs=None if local else global_num_seqs)

    pg_SR, metrics = POLICY_LOSSES.get(cfg.policy_loss)(logp, old_logp, advantages, mask, cfg)
    if is_weights is not None:
        pg_SR = pg_SR * is_weights.detach()
    loss = agg(pg_SR)
    metrics["pg_loss"] = agg(pg_SR.detach(), local=True)
    if ref_logp is not None:
        kl_SR = kl_penalty(logp, ref_logp, cfg.kl_estimator)
        metrics["kl_loss"] = agg(kl_SR.detach(), local=True)
        if cfg.kl_loss_coef > 0:
            loss = loss + cfg.kl_loss_coef * agg(kl_SR)
    if entropy is not None:
        metrics["entropy"] = agg(entropy.detach(), local=True)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * agg(entropy)
    return loss, {k: v.detach() for k, v in metrics.items()}
