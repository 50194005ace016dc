"""Train-inference mismatch corrections: hand values, inclusive bounds, log-space sequence products."""

import math

import numpy as np
import pytest
import torch

from miles_lib.algorithms import (
    OFF_POLICY,
    AlgorithmConfig,
    choose_old_logp,
    mismatch_metrics,
    off_policy_weights,
)

RHOS = [0.25, 0.5, 1.0, 2.0, 4.0]


def token_case(rhos=RHOS, mask=None):
    """rollout logp 0 and train logp = log ρ (float32), so Δ is exactly float32(log ρ)."""
    train = torch.tensor([[math.log(r) for r in rhos]], dtype=torch.float32)
    rollout = torch.zeros_like(train)
    m = torch.ones_like(train) if mask is None else torch.tensor([mask], dtype=torch.float32)
    return train, rollout, m


def run(mode, *case, **cfg):
    w, keep, metrics = off_policy_weights(*case, AlgorithmConfig(off_policy=mode, **cfg))
    return w[0].tolist(), keep[0].tolist(), metrics


def test_tis_truncates_above_c_and_a_rho_on_the_bound_is_not_clipped():
    w, keep, m = run("tis", *token_case())  # C = 2
    assert w == pytest.approx([0.25, 0.5, 1.0, 2.0, 2.0])
    assert w[4] == 2.0  # the truncated value is exactly C
    assert keep == [1, 1, 1, 1, 1]
    assert m["is_clip_frac"] == pytest.approx(1 / 5)  # only ρ = 4; ρ = 2 sits on the bound (inclusive)
    assert m["is_weight_mean"] == pytest.approx((0.25 + 0.5 + 1 + 2 + 2) / 5)
    w, _, m = run("tis", *token_case(), is_lower=0.5, is_upper=3.0)
    assert w == pytest.approx([0.5, 0.5, 1.0, 2.0, 3.0]) and m["is_clip_frac"] == pytest.approx(2 / 5)


def test_mis_masks_outside_inclusive_bounds():
    w, keep, m = run("mis", *token_case(), is_lower=0.5, is_upper=2.0)
    assert w == pytest.approx([0.0, 0.5, 1.0, 2.0, 0.0])  # 0.5 and 2.0 are ON the bounds: kept
    assert keep == [0, 1, 1, 1, 0]
    assert m["is_mask_frac"] == pytest.approx(2 / 5) and m["is_clip_frac"] == 0.0
    w, keep, _ = run("mis", *token_case())  # no lower bound by default
    assert keep == [1, 1, 1, 1, 0]


def test_one_float32_ulp_past_the_bound_is_masked():
    log2 = np.float32(math.log(2.0))
    above = float(np.nextafter(log2, np.float32(np.inf)))
    train = torch.tensor([[float(log2), above]])
    _, keep, _ = run("mis", train, torch.zeros_like(train), torch.ones_like(train))
    assert keep == [1, 0]
    w, _, m = run("tis", train, torch.zeros_like(train), torch.ones_like(train))
    assert w[1] == 2.0 and m["is_clip_frac"] == 0.5


def test_icepop_default_bounds_half_to_five():
    w, keep, m = run("icepop", *token_case([0.25, 0.5, 1.0, 2.0, 5.0, 6.0]))
    assert w == pytest.approx([0.0, 0.5, 1.0, 2.0, 5.0, 0.0])  # kept tokens keep their IS weight ρ
    assert keep == [0, 1, 1, 1, 1, 0] and m["is_mask_frac"] == pytest.approx(2 / 6)


def seq_case():
    # seq 0: ρ = 2, 2      -> Π = 4;  geometric mean 2
    # seq 1: ρ = 0.5, 1.5  -> Π = 0.75
    # seq 2: ρ = 3, pad    -> Π = 3   (the padding's huge Δ must not count)
    train = torch.tensor([[math.log(2), math.log(2)], [math.log(0.5), math.log(1.5)], [math.log(3), 50.0]])
    return train, torch.zeros_like(train), torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])


def test_tis_seq_truncates_the_sequence_product():
    w, keep, m = off_policy_weights(*seq_case(), AlgorithmConfig(off_policy="tis_seq", is_upper=2.0))
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0], [0.75, 0.75], [2.0, 0.0]]))
    assert keep.tolist() == [[1, 1], [1, 1], [1, 0]]
    assert m["is_clip_frac"] == pytest.approx(3 / 5)  # tokens of sequences 0 and 2


def test_tis_seq_is_computed_in_log_space():
    # Π over 1000 tokens of e^1 overflows any float; in log space the weight is exactly C
    train = torch.ones(1, 1000)
    w, _, _ = off_policy_weights(train, torch.zeros_like(train), torch.ones_like(train),
                                 AlgorithmConfig(off_policy="tis_seq"))
    assert torch.equal(w, torch.full_like(w, 2.0))
    w, _, _ = off_policy_weights(-train, torch.zeros_like(train), torch.ones_like(train),
                                 AlgorithmConfig(off_policy="tis_seq"))
    assert torch.equal(w, torch.zeros_like(w))  # e^-1000 underflows to 0, no NaN


def test_mis_seq_masks_whole_sequences_on_the_sum_of_log_ratios():
    w, keep, m = off_policy_weights(*seq_case(), AlgorithmConfig(off_policy="mis_seq", is_lower=0.5, is_upper=3.0))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0], [0.75, 0.75], [3.0, 0.0]]))
    assert keep.tolist() == [[0, 0], [1, 1], [1, 0]]
    assert m["is_mask_frac"] == pytest.approx(2 / 5)


def test_geo_mean_filter_keeps_sequences_near_one():
    # geometric means: exp(0.0005) = 1.0005 (kept), exp(0.0015) = 1.0015 (> 1.001: dropped),
    # exp(-0.002) = 0.998 (< 0.999: dropped)
    train = torch.tensor([[0.0005, 0.0005, 0.0], [0.003, 0.0, 0.0], [-0.004, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w, keep, m = off_policy_weights(train, torch.zeros_like(train), mask, AlgorithmConfig(off_policy="geo_mean"))
    expected = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert w.tolist() == expected and keep.tolist() == expected  # a filter: weight 1 where kept
    assert m["is_mask_frac"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("mode", OFF_POLICY.names())
def test_every_mode_detached_zero_outside_mask_same_keys(mode):
    train, rollout, _ = token_case()
    train = train.clone().requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    w, keep, metrics = off_policy_weights(train, rollout, mask, AlgorithmConfig(off_policy=mode))
    assert not w.requires_grad and not keep.requires_grad
    assert w.shape == keep.shape == mask.shape
    assert w[0, 3:].tolist() == [0.0, 0.0] and keep[0, 3:].tolist() == [0.0, 0.0]
    assert set(metrics) == {"is_weight_mean", "is_clip_frac", "is_mask_frac"}
    assert all(isinstance(v, float) for v in metrics.values())
    # all tokens masked: no NaN anywhere
    w, keep, metrics = off_policy_weights(train, rollout, torch.zeros_like(mask), AlgorithmConfig(off_policy=mode))
    assert torch.equal(w, torch.zeros_like(w)) and all(v == 0.0 for v in metrics.values())


def test_none_mode_and_missing_rollout_logprobs():
    train, _, _ = token_case()
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    w, keep, _ = off_policy_weights(train, None, mask, AlgorithmConfig())
    assert w.tolist() == mask.tolist() and keep.tolist() == mask.tolist()
    with pytest.raises(ValueError, match="off_policy='tis' needs rollout log-probs"):
        off_policy_weights(train, None, mask, AlgorithmConfig(off_policy="tis"))


def test_mismatch_metrics_hand_values():
    train = torch.tensor([[-1.0, -2.0, 5.0]])
    rollout = torch.tensor([[-1.1, -1.5, -9.0]])  # third position is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = mismatch_metrics(train, rollout, mask)
    d = [0.1, -0.5]  # Δ = train - rollout
    assert m["train_rollout_logprob_abs_diff"] == pytest.approx(0.3, abs=1e-6)
    assert m["train_rollout_logprob_abs_diff_max"] == pytest.approx(0.5, abs=1e-6)
    assert m["train_rollout_exp_abs_diff"] == pytest.approx((math.exp(0.1) + math.exp(0.5)) / 2, abs=1e-6)
    assert m["train_rollout_prob_abs_diff"] == pytest.approx(
        (abs(math.exp(-1.0) - math.exp(-1.1)) + abs(math.exp(-2.0) - math.exp(-1.5))) / 2, abs=1e-6)
    assert m["train_rollout_k3_kl"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 2, abs=1e-6)
    empty = mismatch_metrics(train, rollout, torch.zeros_like(mask))
    assert all(v == 0.0 for v in empty.values())


def test_k3_mismatch_kl_is_unbiased_for_kl_rollout_to_train():
    # exact expectation over tokens sampled from the rollout policy: E_rollout[ρ - log ρ - 1] = KL(rollout || train)
    p_roll = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    p_train = torch.tensor([[0.15, 0.15, 0.35, 0.35]], dtype=torch.float64)
    kl = float((p_roll * (p_roll / p_train).log()).sum())
    # a "sample" whose token frequencies are exactly p_roll: token v repeated 1, 2, 3, 4 times
    idx = torch.tensor([[0] + [1] * 2 + [2] * 3 + [3] * 4])
    m = mismatch_metrics(p_train.log()[:, idx[0]], p_roll.log()[:, idx[0]], torch.ones(1, 10))
    assert m["train_rollout_k3_kl"] == pytest.approx(kl, rel=1e-6)


def test_choose_old_logp():
    train, rollout = torch.zeros(1, 2), torch.ones(1, 2)
    assert choose_old_logp(train, rollout, AlgorithmConfig()) is train
    bypass = AlgorithmConfig(use_rollout_logprobs_as_old=True)
    assert choose_old_logp(train, rollout, bypass) is rollout
    assert choose_old_logp(None, rollout, bypass) is rollout  # no recompute needed
    with pytest.raises(ValueError, match="needs rollout log-probs"):
        choose_old_logp(train, None, bypass)
    with pytest.raises(ValueError, match="no old log-probs"):
        choose_old_logp(None, rollout, AlgorithmConfig())
