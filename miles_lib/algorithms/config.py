"""AlgorithmConfig: the knobs of the GRPO-family objective (one small, validated section).

The numeric functions of ``miles_lib.algorithms`` take tensors plus this config, never a pipeline
config. Symbols in their docstrings -> fields here:

    ε               adv_std_eps          std-division epsilon of advantage estimators
    γ               gamma                REINFORCE++ discount
    ε_low, ε_high   eps_clip_low/high    PPO/GSPO clip range [1 - ε_low, 1 + ε_high]
    c               dual_clip_c          dual-clip bound -c·A for A < 0 (ppo_clip)
    C               seq_token_sum_norm   constant normalizer of the seq_mean_token_sum aggregation
    β               kl_loss_coef         KL(π_θ || π_ref) loss coefficient (estimator: kl_estimator)
    β_r             kl_in_reward_coef    per-token KL reward shaping (REINFORCE++ only)
    α               entropy_coef         entropy bonus
    C, C_low        is_upper, is_lower   TIS truncation / MIS mask bounds on ρ (tis, tis_seq, mis, mis_seq)
    [a, b]          icepop_low/high      IcePop mask bounds on ρ
    [g_low, g_high] geo_mean_low/high    geometric-mean sequence filter bounds

Validation names the field and the valid range, and rejects combinations where a setting would be
silently ignored or would double-count a correction; it never rewrites a value.
"""

from __future__ import annotations

import dataclasses

from miles_lib.algorithms.advantages import ADVANTAGES
from miles_lib.algorithms.aggregation import AGGREGATIONS
from miles_lib.algorithms.kl import KL_ESTIMATORS
from miles_lib.algorithms.off_policy import OFF_POLICY
from miles_lib.algorithms.policy_loss import POLICY_LOSSES
from miles_lib.config import ConfigBase, check

# off-policy bound fields and the modes that read them (a bound set for another mode is an error)
_BOUND_FIELDS = {
    "is_upper": ("tis", "tis_seq", "mis", "mis_seq"),
    "is_lower": ("tis", "tis_seq", "mis", "mis_seq"),
    "icepop_low": ("icepop",),
    "icepop_high": ("icepop",),
    "geo_mean_low": ("geo_mean",),
    "geo_mean_high": ("geo_mean",),
}
REINFORCE_ESTIMATORS = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass
class AlgorithmConfig(ConfigBase):
    # --- advantages (advantages.py)
    advantage_estimator: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline
    adv_std_eps: float = 1e-6  # ε in A = (R - mean) / (std + ε) and in REINFORCE++ whitening
    gamma: float = 1.0  # REINFORCE++ discount of the return-to-go, in (0, 1]
    # --- policy loss (policy_loss.py)
    policy_loss: str = "ppo_clip"  # ppo_clip | gspo
    eps_clip_low: float = 0.2  # ratio clipped below at 1 - eps_clip_low
    eps_clip_high: float = 0.28  # ratio clipped above at 1 + eps_clip_high (DAPO clip-higher: 0.28)
    dual_clip_c: float | None = None  # ppo_clip, A < 0: loss <= -c·A; None = off; e.g. 3.0
    # --- aggregation (aggregation.py)
    loss_agg_mode: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum
    seq_token_sum_norm: float | None = None  # constant C of seq_mean_token_sum (e.g. max_new_tokens)
    # --- KL and entropy (kl.py)
    kl_loss_coef: float = 0.0  # β: loss += β·agg(kl(π_θ, π_ref)); needs reference log-probs
    kl_estimator: str = "k3"  # k1 | k2 | k3 (= low_var_kl), for the loss and the reward shaping
    kl_in_reward_coef: float = 0.0  # β_r: REINFORCE++ token reward -= β_r·kl_t
    entropy_coef: float = 0.0  # α: loss -= α·agg(H)
    # --- train-inference mismatch (off_policy.py)
    off_policy: str = "none"  # none | tis | tis_seq | mis | mis_seq | icepop | geo_mean
    is_upper: float = 2.0  # C: TIS truncation / MIS upper bound on ρ (>= 1)
    is_lower: float | None = None  # C_low: TIS lower clip / MIS lower bound (None = none), <= 1
    icepop_low: float = 0.5  # IcePop keeps tokens with icepop_low <= ρ <= icepop_high
    icepop_high: float = 5.0
    geo_mean_low: float = 0.999  # geo_mean keeps sequences with geo_mean_low <= exp(mean log ρ) <= geo_mean_high
    geo_mean_high: float = 1.001
    use_rollout_logprobs_as_old: bool = False  # π_old := π_rollout (skip trusting the trainer's recompute)

    def __post_init__(self) -> None:
        s = "AlgorithmConfig"
        for name, reg in (("advantage_estimator", ADVANTAGES), ("policy_loss", POLICY_LOSSES),
                          ("loss_agg_mode", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS),
                          ("off_policy", OFF_POLICY)):
            check(getattr(self, name) in reg, s, name, getattr(self, name), f"one of {reg.names()}")
        optional = {"dual_clip_c", "seq_token_sum_norm", "is_lower"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", "float | None") and not (v is None and f.name in optional):
                check(_is_number(v), s, f.name, v, "a number")
        check(isinstance(self.use_rollout_logprobs_as_old, bool), s, "use_rollout_logprobs_as_old",
              self.use_rollout_logprobs_as_old, "true or false")
        self._check_ranges(s)
        self._check_combinations(s)

    def _check_ranges(self, s: str) -> None:
        check(self.adv_std_eps > 0, s, "adv_std_eps", self.adv_std_eps, "> 0")
        check(0 < self.gamma <= 1, s, "gamma", self.gamma, "in (0, 1]")
        check(0 <= self.eps_clip_low < 1, s, "eps_clip_low", self.eps_clip_low, "in [0, 1)")
        check(self.eps_clip_high >= 0, s, "eps_clip_high", self.eps_clip_high, ">= 0")
        check(self.dual_clip_c is None or self.dual_clip_c > 1, s, "dual_clip_c", self.dual_clip_c,
              "None (off) or > 1, e.g. 3.0")
        check(self.seq_token_sum_norm is None or self.seq_token_sum_norm > 0, s, "seq_token_sum_norm",
              self.seq_token_sum_norm, "None or > 0")
        for name in ("kl_loss_coef", "kl_in_reward_coef", "entropy_coef"):
            check(getattr(self, name) >= 0, s, name, getattr(self, name), ">= 0")
        # a perfectly aligned token (ρ = 1) must always be kept with weight 1
        check(self.is_upper >= 1, s, "is_upper", self.is_upper, ">= 1")
        check(self.is_lower is None or 0 <= self.is_lower <= 1, s, "is_lower", self.is_lower,
              "None or in [0, 1]")
        check(0 <= self.icepop_low <= 1, s, "icepop_low", self.icepop_low, "in [0, 1]")
        check(self.icepop_high >= 1, s, "icepop_high", self.icepop_high, ">= 1")
        check(0 < self.geo_mean_low <= 1, s, "geo_mean_low", self.geo_mean_low, "in (0, 1]")
        check(self.geo_mean_high >= 1, s, "geo_mean_high", self.geo_mean_high, ">= 1")

    def _check_combinations(self, s: str) -> None:
        reinforce = self.advantage_estimator in REINFORCE_ESTIMATORS
        check(self.kl_in_reward_coef == 0 or reinforce, s, "kl_in_reward_coef", self.kl_in_reward_coef,
              f"0 with advantage_estimator={self.advantage_estimator!r}: only {REINFORCE_ESTIMATORS} shape "
              "token rewards with KL (use kl_loss_coef for a KL term with the group estimators)")
        check(self.gamma == 1 or reinforce, s, "gamma", self.gamma,
              f"1 with advantage_estimator={self.advantage_estimator!r}: only {REINFORCE_ESTIMATORS} "
              "discount token returns")
        check(self.dual_clip_c is None or self.policy_loss == "ppo_clip", s, "dual_clip_c", self.dual_clip_c,
              f"None with policy_loss={self.policy_loss!r}: dual clip is defined for token ratios (ppo_clip)")
        needs_norm = self.loss_agg_mode == "seq_mean_token_sum"
        check((self.seq_token_sum_norm is not None) == needs_norm, s, "seq_token_sum_norm",
              self.seq_token_sum_norm,
              "a constant > 0 such as the generation budget (max_new_tokens) with loss_agg_mode="
              "'seq_mean_token_sum' (the padded length would change between micro-batches)"
              if needs_norm else f"None: loss_agg_mode={self.loss_agg_mode!r} does not read it")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, modes in _BOUND_FIELDS.items():
            check(self.off_policy in modes or getattr(self, name) == defaults[name], s, name,
                  getattr(self, name), f"left at its default {defaults[name]!r}: off_policy="
                  f"{self.off_policy!r} does not read it (it is used by {list(modes)})")
        check(not self.use_rollout_logprobs_as_old or self.off_policy in ("none", "geo_mean"), s,
              "off_policy", self.off_policy,
              "'none' or 'geo_mean' with use_rollout_logprobs_as_old=True: the PPO ratio is then taken "
              "against π_rollout and already corrects the mismatch; an IS weight would correct it twice")
