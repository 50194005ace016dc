import pytest

from miles_lib.algorithms import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    OFF_POLICY,
    POLICY_LOSSES,
    Registry,
)
from miles_lib.errors import ConfigError


def test_register_get_and_aliases():
    reg = Registry("widget", params=("x", "cfg"))

    @reg.register("a", "alias_a")
    def a(x, cfg, *, extra=None):
        return x + 1

    assert reg.get("a") is a and reg.get("alias_a") is a
    assert reg.get("a")(1, None) == 2
    assert reg.names() == ["a", "alias_a"]
    assert "a" in reg and "b" not in reg and None not in reg


def test_duplicate_name_is_an_error_and_registers_nothing():
    reg = Registry("widget")

    @reg.register("a")
    def first(x):
        return 1

    with pytest.raises(ValueError, match=r"widget 'a' is already registered \(by .*first\)"):
        @reg.register("b", "a")
        def second(x):
            return 2

    assert reg.get("a") is first and "b" not in reg  # a failed registration leaves no half-entry


def test_unknown_name_lists_the_valid_ones():
    reg = Registry("widget")
    reg.register("beta")(lambda x: x)
    reg.register("alpha")(lambda x: x)
    with pytest.raises(ConfigError, match=r"unknown widget 'gamma'; valid: \['alpha', 'beta'\]"):
        reg.get("gamma")
    with pytest.raises(ConfigError, match="unknown widget"):
        reg.get(["not", "hashable"])


def test_signature_is_enforced():
    reg = Registry("widget", params=("x", "cfg"))
    with pytest.raises(TypeError, match=r"must take exactly \['x', 'cfg'\]"):
        reg.register("bad")(lambda x, y, cfg: x)
    with pytest.raises(TypeError):
        reg.register("missing")(lambda x: x)
    with pytest.raises(ValueError, match="at least one name"):
        reg.register()


def test_library_registries_hold_the_documented_names():
    assert ADVANTAGES.names() == ["dr_grpo", "grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                                  "rloo"]
    assert POLICY_LOSSES.names() == ["gspo", "ppo_clip"]
    assert AGGREGATIONS.names() == ["seq_mean_token_mean", "seq_mean_token_sum", "token_mean"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3", "low_var_kl"]
    assert KL_ESTIMATORS.get("low_var_kl") is KL_ESTIMATORS.get("k3")
    assert OFF_POLICY.names() == ["geo_mean", "icepop", "mis", "mis_seq", "none", "tis", "tis_seq"]
