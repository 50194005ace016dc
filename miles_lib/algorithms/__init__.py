"""GRPO-family math: pure tensor functions chosen by name from registries (no I/O, no model).

    registry.py      Registry: name -> function, one signature per family, duplicates are errors
    advantages.py    ADVANTAGES: grpo, dr_grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline
    policy_loss.py   POLICY_LOSSES: ppo_clip (clip-higher, dual clip), gspo
    aggregation.py   AGGREGATIONS: token_mean, seq_mean_token_mean, seq_mean_token_sum (split-invariant)
    kl.py            KL_ESTIMATORS: k1, k2, k3 (= low_var_kl); entropy_from_logits
    off_policy.py    OFF_POLICY: none, tis, tis_seq, mis, mis_seq, icepop, geo_mean;
                     mismatch_metrics, choose_old_logp
    objective.py     compute_policy_loss: off-policy-weighted PG loss + KL term - entropy bonus, aggregated
    config.py        AlgorithmConfig (the only config these functions read)

A trainer step is: compute_advantages -> choose_old_logp -> off_policy_weights (+ mismatch_metrics)
-> compute_policy_loss per micro-batch.
"""

from __future__ import annotations

from miles_lib.algorithms.advantages import ADVANTAGES, compute_advantages
from miles_lib.algorithms.aggregation import AGGREGATIONS, aggregate
from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.algorithms.kl import KL_ESTIMATORS, entropy_from_logits, kl_penalty
from miles_lib.algorithms.objective import compute_policy_loss
from miles_lib.algorithms.off_policy import (
    OFF_POLICY,
    choose_old_logp,
    mismatch_metrics,
    off_policy_weights,
)
from miles_lib.algorithms.policy_loss import POLICY_LOSSES
from miles_lib.algorithms.registry import Registry

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "OFF_POLICY", "POLICY_LOSSES", "AlgorithmConfig",
    "Registry", "aggregate", "choose_old_logp", "compute_advantages", "compute_policy_loss",
    "entropy_from_logits", "kl_penalty", "mismatch_metrics", "off_policy_weights",
]
