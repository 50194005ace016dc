"""AlgorithmConfig: the knobs of the GRPO-family objective (one small, validated section).

Symbols used in the algorithm docstrings and the fields that set them:
    ε_low, ε_high    eps_clip_low, eps_clip_high       PPO clip range [1-ε_low, 1+ε_high] ("clip-higher")
    c                dual_clip_c                       dual-clip bound for A < 0 (None = off)
    β                kl_loss_coef                      KL(π_θ || π_ref) loss coefficient
    β_r              kl_in_reward_coef                 per-token KL shaping in REINFORCE++
    α                entropy_coef                      entropy bonus
    γ                gamma                             discount of REINFORCE++ returns
    C, C_low         is_upper, is_lower                TIS / MIS bounds on ρ
                     icepop_low, icepop_high           IcePop mask bounds on ρ
"""

from __future__ import annotations

import dataclasses

from miles_lib.config import ConfigBase, check

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
POLICY_LOSSES = ("ppo_clip", "gspo")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
OFF_POLICY_MODES = ("none", "tis", "tis_seq", "mis", "mis_seq", "icepop", "geo_mean")


@dataclasses.dataclass
class AlgorithmConfig(ConfigBase):
    advantage_estimator: str = "grpo"
    grpo_std_eps: float = 1e-6
    policy_loss: str = "ppo_clip"
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.28
    dual_clip_c: float | None = None
    loss_agg_mode: str = "token_mean"
    seq_token_sum_norm: float = 0.0  # constant normalizer of seq_mean_token_sum (0 = max response length)
    kl_loss_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward_coef: float = 0.0
    entropy_coef: float = 0.0
    gamma: float = 1.0
    off_policy: str = "none"
    is_upper: float = 2.0
    is_lower: float | None = None
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    geo_mean_low: float = 0.999
    geo_mean_high: float = 1.001
    use_rollout_logprobs_as_old: bool = False

    def __post_init__(self) -> None:
        s = "AlgorithmConfig"
        check(self.advantage_estimator in ADVANTAGE_ESTIMATORS, s, "advantage_estimator",
              self.advantage_estimator, f"one of {ADVANTAGE_ESTIMATORS}")
        check(self.policy_loss in POLICY_LOSSES, s, "policy_loss", self.policy_loss, f"one of {POLICY_LOSSES}")
        check(self.loss_agg_mode in LOSS_AGG_MODES, s, "loss_agg_mode", self.loss_agg_mode, f"one of {LOSS_AGG_MODES}")
        check(self.kl_estimator in KL_ESTIMATORS, s, "kl_estimator", self.kl_estimator, f"one of {KL_ESTIMATORS}")
        check(self.off_policy in OFF_POLICY_MODES, s, "off_policy", self.off_policy, f"one of {OFF_POLICY_MODES}")
        check(0 <= self.eps_clip_low < 1, s, "eps_clip_low", self.eps_clip_low, "in [0, 1)")
        check(self.eps_clip_high >= 0, s, "eps_clip_high", self.eps_clip_high, ">= 0")
        check(self.dual_clip_c is None or self.dual_clip_c > 1, s, "dual_clip_c", self.dual_clip_c, "None or > 1")
        check(self.grpo_std_eps > 0, s, "grpo_std_eps", self.grpo_std_eps, "> 0")
        check(self.seq_token_sum_norm >= 0, s, "seq_token_sum_norm", self.seq_token_sum_norm, ">= 0")
        check(self.kl_loss_coef >= 0, s, "kl_loss_coef", self.kl_loss_coef, ">= 0")
        check(self.kl_in_reward_coef >= 0, s, "kl_in_reward_coef", self.kl_in_reward_coef, ">= 0")
        check(self.entropy_coef >= 0, s, "entropy_coef", self.entropy_coef, ">= 0")
        check(0 < self.gamma <= 1, s, "gamma", self.gamma, "in (0, 1]")
        check(self.is_upper > 0, s, "is_upper", self.is_upper, "> 0")
        check(self.is_lower is None or 0 <= self.is_lower < self.is_upper, s, "is_lower", self.is_lower,
              f"None or in [0, is_upper={self.is_upper})")
        check(0 < self.geo_mean_low <= 1 <= self.geo_mean_high, s, "geo_mean_low/high",
              (self.geo_mean_low, self.geo_mean_high), "0 < low <= 1 <= high")
        check(0 <= self.icepop_low < 1 < self.icepop_high, s, "icepop_low/high",
              (self.icepop_low, self.icepop_high), "0 <= low < 1 < high")
        if self.use_rollout_logprobs_as_old:
            check(self.off_policy == "none", s, "off_policy", self.off_policy,
                  "'none' when use_rollout_logprobs_as_old is on: the PPO ratio is then already taken "
                  "against the rollout policy, an IS weight on top would correct the mismatch twice")
        if self.kl_in_reward_coef > 0:
            check(self.advantage_estimator.startswith("reinforce_plus_plus"), s, "kl_in_reward_coef",
                  self.kl_in_reward_coef, "0 unless advantage_estimator is reinforce_plus_plus(_baseline): "
                  "only REINFORCE++ shapes rewards with per-token KL")
