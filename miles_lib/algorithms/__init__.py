"""GRPO-family math: pure tensor functions chosen by name (no I/O, no model).

    advantages.py    grpo, dr_grpo, rloo, reinforce_plus_plus(_baseline)
    policy_loss.py   ppo_clip (clip-higher, dual clip), gspo
    kl.py            k1, k2, k3/low_var_kl, entropy
    off_policy.py    tis, tis_seq, mis, mis_seq, icepop, geo_mean; mismatch metrics
    aggregation.py   token_mean, seq_mean_token_mean, seq_mean_token_sum
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.advantages import ADVANTAGES, compute_advantages
from miles_lib.algorithms.aggregation import aggregate
from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.algorithms.kl import KL_ESTIMATORS, entropy_from_logits, kl_penalty
from miles_lib.algorithms.off_policy import OFF_POLICY, choose_old_logp, mismatch_metrics, off_policy_weights
from miles_lib.algorithms.policy_loss import POLICY_LOSSES


def compute_policy_loss(logp, old_logp, advantages, mask, cfg: AlgorithmConfig, is_weights=None,
                        ref_logp=None, entropy=None, global_num_tokens: float | None = None,
                        global_num_seqs: float | None = None):
    """The scalar a trainer backpropagates, and its metrics:

        L = agg( w_t · l_t^{PG} + β · kl_t - α · H_t )
    with l^{PG} from cfg.policy_loss, w the off-policy weights, kl from cfg.kl_estimator against
    ref_logp (when β > 0), H the token entropy (when α > 0), agg = cfg.loss_agg_mode with global
    normalizers (see aggregation.py).
    """
    pg, metrics = POLICY_LOSSES.get(cfg.policy_loss)(logp, old_logp, advantages, mask, cfg)
    per_token = pg if is_weights is None else pg * is_weights
    if cfg.kl_loss_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_loss_coef > 0 needs reference log-probs")
        kl = kl_penalty(logp, ref_logp, cfg.kl_estimator)
        per_token = per_token + cfg.kl_loss_coef * kl
        metrics["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs token entropies")
        per_token = per_token - cfg.entropy_coef * entropy
    if entropy is not None:
        metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
    agg = lambda x: aggregate(x, mask, cfg.loss_agg_mode, global_num_tokens, global_num_seqs,
                              cfg.seq_token_sum_norm)
    loss = agg(per_token)
    metrics["pg_loss"] = agg(pg.detach())
    return loss, {k: float(v) for k, v in metrics.items()}


__all__ = ["ADVANTAGES", "AlgorithmConfig", "KL_ESTIMATORS", "OFF_POLICY", "POLICY_LOSSES", "aggregate",
           "choose_old_logp", "compute_advantages", "compute_policy_loss", "entropy_from_logits",
           "kl_penalty", "mismatch_metrics", "off_policy_weights"]
