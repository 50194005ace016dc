import pytest

from miles_lib.algorithms import AlgorithmConfig
from miles_lib.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    cfg = AlgorithmConfig()
    assert AlgorithmConfig.from_dict(cfg.to_dict()) == cfg
    custom = AlgorithmConfig.from_dict({"advantage_estimator": "reinforce_plus_plus", "gamma": 0.99,
                                        "kl_in_reward_coef": 0.01, "off_policy": "icepop", "icepop_high": 4,
                                        "dual_clip_c": 3, "loss_agg_mode": "seq_mean_token_sum",
                                        "seq_token_sum_norm": 1024})
    assert AlgorithmConfig.from_dict(custom.to_dict()) == custom


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['eps_clip'\]"):
        AlgorithmConfig.from_dict({"eps_clip": 0.2})


@pytest.mark.parametrize("field,value,valid", [
    ("advantage_estimator", "gpro", r"one of \['dr_grpo', 'grpo', "),
    ("policy_loss", "ppo", r"one of \['gspo', 'ppo_clip'\]"),
    ("loss_agg_mode", "mean", "one of"),
    ("kl_estimator", "k4", r"one of \['k1', 'k2', 'k3', 'low_var_kl'\]"),
    ("off_policy", "is", "one of"),
    ("eps_clip_low", 1.0, r"in \[0, 1\)"),
    ("eps_clip_high", -0.1, ">= 0"),
    ("dual_clip_c", 1.0, "None .off. or > 1"),
    ("gamma", 0.0, r"in \(0, 1\]"),
    ("adv_std_eps", 0.0, "> 0"),
    ("kl_loss_coef", -0.1, ">= 0"),
    ("entropy_coef", -1e-3, ">= 0"),
    ("eps_clip_low", "0.2", "a number"),
    ("kl_loss_coef", True, "a number"),
    ("use_rollout_logprobs_as_old", "yes", "true or false"),
])
def test_invalid_values_name_field_and_range(field, value, valid):
    with pytest.raises(ConfigError, match=rf"AlgorithmConfig\.{field}=.* is invalid: must be {valid}"):
        AlgorithmConfig(**{field: value})


@pytest.mark.parametrize("kwargs,field,reason", [
    ({"off_policy": "tis", "is_upper": 0.5}, "is_upper", ">= 1"),
    ({"off_policy": "mis", "is_lower": 1.5}, "is_lower", r"None or in \[0, 1\]"),
    ({"off_policy": "icepop", "icepop_low": 2.0}, "icepop_low", r"in \[0, 1\]"),
    ({"off_policy": "geo_mean", "geo_mean_high": 0.9}, "geo_mean_high", ">= 1"),
])
def test_bounds_must_keep_an_aligned_token(kwargs, field, reason):
    with pytest.raises(ConfigError, match=rf"{field}=.*must be {reason}"):
        AlgorithmConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field,reason", [
    ({"kl_in_reward_coef": 0.1}, "kl_in_reward_coef", "only .*reinforce_plus_plus.* shape token rewards"),
    ({"gamma": 0.9}, "gamma", "only .* discount token returns"),
    ({"policy_loss": "gspo", "dual_clip_c": 3.0}, "dual_clip_c", "defined for token ratios"),
    ({"loss_agg_mode": "seq_mean_token_sum"}, "seq_token_sum_norm", "generation budget"),
    ({"seq_token_sum_norm": 512.0}, "seq_token_sum_norm", "does not read it"),
    ({"off_policy": "tis", "icepop_low": 0.4}, "icepop_low", "off_policy='tis' does not read it"),
    ({"is_upper": 3.0}, "is_upper", "off_policy='none' does not read it"),
    ({"use_rollout_logprobs_as_old": True, "off_policy": "tis"}, "off_policy", "correct it twice"),
])
def test_incompatible_settings_are_rejected_with_a_reason(kwargs, field, reason):
    with pytest.raises(ConfigError, match=rf"{field}=.*{reason}"):
        AlgorithmConfig(**kwargs)


def test_compatible_combinations_are_accepted():
    AlgorithmConfig(use_rollout_logprobs_as_old=True, off_policy="geo_mean")  # a pure filter: no double weight
    AlgorithmConfig(advantage_estimator="reinforce_plus_plus_baseline", gamma=0.95, kl_in_reward_coef=0.05,
                    kl_estimator="k1")
    AlgorithmConfig(policy_loss="gspo", eps_clip_low=3e-4, eps_clip_high=4e-4,
                    loss_agg_mode="seq_mean_token_mean")
    AlgorithmConfig(off_policy="mis_seq", is_lower=0.5, is_upper=2.0, kl_loss_coef=0.001, entropy_coef=0.001)
