"""Advantage estimators against hand-computed values (the arithmetic is written out)."""

import math
import statistics

import pytest
import torch

from miles_lib.algorithms import ADVANTAGES, AlgorithmConfig, compute_advantages
from miles_lib.algorithms.advantages import discounted_returns, masked_whiten

EPS = 1e-6


def adv(name, rewards, groups, mask, kl=None, **cfg):
    cfg = AlgorithmConfig(advantage_estimator=name, **cfg)
    return compute_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups),
                              torch.tensor(mask, dtype=torch.float64), cfg,
                              kl_SR=None if kl is None else torch.tensor(kl, dtype=torch.float64))


# group 5: rewards 1, 0, 0 (samples 0, 2, 3); group 9: rewards 2, 4 (samples 1, 4): ids need not be
# contiguous or sorted. Response lengths 3, 1, 2, 3, 2.
REWARDS = [1.0, 2.0, 0.0, 0.0, 4.0]
GROUPS = [5, 9, 5, 5, 9]
MASK = [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]]


def expect_tokens(per_sample, mask=MASK):
    return torch.tensor([[a * m for m in row] for a, row in zip(per_sample, mask)], dtype=torch.float64)


def test_grpo_normalizes_by_unbiased_group_std():
    # group 5: mean 1/3; deviations 2/3, -1/3, -1/3; unbiased var = (4/9 + 1/9 + 1/9) / (3 - 1) = 1/3
    s5 = math.sqrt(1 / 3) + EPS
    # group 9: mean 3; deviations -1, +1; unbiased var = (1 + 1) / (2 - 1) = 2
    s9 = math.sqrt(2) + EPS
    expected = [(2 / 3) / s5, -1 / s9, (-1 / 3) / s5, (-1 / 3) / s5, 1 / s9]
    torch.testing.assert_close(adv("grpo", REWARDS, GROUPS, MASK), expect_tokens(expected))


def test_grpo_std_convention_is_unbiased_not_population():
    # rewards 1..4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # unbiased std = sqrt(5 / 3) = 1.29099 -> A(4) = 1.5 / 1.29099 = 1.16190  (population std would give 1.34164)
    a = adv("grpo", [1.0, 2.0, 3.0, 4.0], [0, 0, 0, 0], [[1]] * 4)
    assert a[3, 0].item() == pytest.approx(1.5 / (math.sqrt(5 / 3) + EPS), rel=1e-12)
    assert a[3, 0].item() == pytest.approx(1.16190, abs=1e-5)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_identical_rewards_and_singleton_groups_give_exactly_zero(name):
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not depend on the mean's rounding
    # (plain reinforce_plus_plus has no group baseline, so it is not in this list)
    rewards = [0.1, 0.1, 0.1, 0.7, 1.0, 1.0]
    groups = [0, 0, 0, 1, 2, 2]  # group 1 has one sample
    a = adv(name, rewards, groups, [[1, 1]] * 6)
    assert torch.equal(a, torch.zeros(6, 2, dtype=torch.float64))


def test_dr_grpo_drops_the_std_division():
    expected = [1 - 1 / 3, 2 - 3, 0 - 1 / 3, 0 - 1 / 3, 4 - 3]
    torch.testing.assert_close(adv("dr_grpo", REWARDS, GROUPS, MASK), expect_tokens(expected))


def test_rloo_uses_the_leave_one_out_mean():
    # group 5: A_0 = 1 - (0 + 0)/2 = 1; A_2 = 0 - (1 + 0)/2 = -0.5; A_3 = -0.5
    # group 9: A_1 = 2 - 4 = -2; A_4 = 4 - 2 = 2
    expected = [1.0, -2.0, -0.5, -0.5, 2.0]
    torch.testing.assert_close(adv("rloo", REWARDS, GROUPS, MASK), expect_tokens(expected))
    # identity: A_i = n/(n-1) (R_i - mean)
    assert expected[0] == pytest.approx(3 / 2 * (1 - 1 / 3))


def test_reinforce_plus_plus_reward_at_last_token_then_batch_whitening():
    # rewards 1 and 0; lengths 3 and 2; no KL; γ = 1 -> returns [1, 1, 1] and [0, 0]
    a = adv("reinforce_plus_plus", [1.0, 0.0], [0, 1], [[1, 1, 1], [1, 1, 0]])
    masked = [1, 1, 1, 0, 0]  # mean 0.6; unbiased var = (3·0.16 + 2·0.36) / 4 = 0.3
    mu, sd = statistics.mean(masked), statistics.stdev(masked)
    assert (mu, sd) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.3)))
    hi, lo = (1 - mu) / (sd + EPS), (0 - mu) / (sd + EPS)
    torch.testing.assert_close(a, torch.tensor([[hi, hi, hi], [lo, lo, 0.0]], dtype=torch.float64))
    assert hi == pytest.approx(0.730297, abs=1e-5)


def test_reinforce_plus_plus_kl_shaping_and_discount():
    kl = [[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]]  # 99 sits on padding: ignored
    # token rewards r = -0.1·kl, plus R_i at the last token: [-0.1, -0.2, -0.3 + 1], [-0.4, -0.5 + 0]
    for gamma, returns in [
        (1.0, [[0.4, 0.5, 0.7], [-0.9, -0.5]]),  # sums of the future rewards
        (0.5, [[-0.1 + 0.5 * (-0.2 + 0.5 * 0.7), -0.2 + 0.5 * 0.7, 0.7], [-0.4 + 0.5 * -0.5, -0.5]]),
    ]:
        a = adv("reinforce_plus_plus", [1.0, 0.0], [0, 1], [[1, 1, 1], [1, 1, 0]], kl=kl,
                kl_in_reward_coef=0.1, gamma=gamma)
        flat = returns[0] + returns[1]
        mu, sd = statistics.mean(flat), statistics.stdev(flat)
        w = [[(g - mu) / (sd + EPS) for g in row] for row in returns]
        torch.testing.assert_close(a, torch.tensor([w[0], w[1] + [0.0]], dtype=torch.float64))


def test_reinforce_plus_plus_baseline_subtracts_group_mean_first():
    # groups (1, 0) and (1, 1): centered rewards 0.5, -0.5, 0, 0 (one token each)
    # whitening: mean 0, unbiased var = (0.25 + 0.25) / 3 = 1/6
    a = adv("reinforce_plus_plus_baseline", [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], [[1]] * 4)
    z = 0.5 / (math.sqrt(1 / 6) + EPS)
    torch.testing.assert_close(a.flatten(), torch.tensor([z, -z, 0.0, 0.0], dtype=torch.float64))


def test_reinforce_last_token_respects_holes_in_the_loss_mask():
    # loss mask [1, 0, 1, 0]: the reward sits at position 2 (last trained token), not at 3
    a = adv("reinforce_plus_plus", [1.0, 0.0], [0, 1], [[1, 0, 1, 0], [1, 0, 0, 0]])
    # returns (γ = 1): row 0 -> [1, 1, 1, 0], masked [1, 1]; row 1 -> [0]; mean 2/3, std sqrt(1/3)
    z = (1 / 3) / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(a, torch.tensor([[z, 0, z, 0], [-2 * z, 0, 0, 0]], dtype=torch.float64))


def test_discounted_returns_and_whitening_helpers():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    assert discounted_returns(r, 1.0).tolist() == [[7.0, 6.0, 4.0]]
    assert discounted_returns(r, 0.5).tolist() == [[1 + 0.5 * 4.0, 2 + 0.5 * 4, 4.0]]
    w = masked_whiten(torch.tensor([[5.0, 100.0]]), torch.tensor([[1.0, 0.0]]), EPS)
    assert w.tolist() == [[0.0, 0.0]]  # one masked value: centered to 0, no NaN from std of one value


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_zero_outside_mask_and_empty_mask_is_finite(name):
    a = adv(name, REWARDS, GROUPS, MASK)
    assert torch.all(a[torch.tensor(MASK) == 0] == 0)
    empty = adv(name, REWARDS, GROUPS, [[0, 0, 0]] * 5)
    assert torch.equal(empty, torch.zeros(5, 3, dtype=torch.float64))


def test_output_dtype_follows_rewards():
    cfg = AlgorithmConfig()
    a = compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 2), cfg)
    assert a.dtype == torch.float32
    a = compute_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.ones(2, 2), cfg)  # int rewards
    assert a.dtype == torch.float32 and a[0, 0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + EPS))


def test_bad_inputs_name_the_problem():
    cfg = AlgorithmConfig()
    ok_g, ok_m = torch.tensor([0, 0]), torch.ones(2, 3)
    with pytest.raises(ValueError, match="rewards_S must be 1-D"):
        compute_advantages(torch.ones(2, 1), ok_g, ok_m, cfg)
    with pytest.raises(ValueError, match="one group id per sample"):
        compute_advantages(torch.ones(2), torch.tensor([0]), ok_m, cfg)
    with pytest.raises(ValueError, match="integer tensor"):
        compute_advantages(torch.ones(2), torch.tensor([0.0, 0.0]), ok_m, cfg)
    with pytest.raises(ValueError, match="response_mask_SR must be"):
        compute_advantages(torch.ones(2), ok_g, torch.ones(3, 3), cfg)
    with pytest.raises(ValueError, match=r"not finite at samples \[1\]"):
        compute_advantages(torch.tensor([0.0, float("nan")]), ok_g, ok_m, cfg)
    kl_cfg = AlgorithmConfig(advantage_estimator="reinforce_plus_plus", kl_in_reward_coef=0.1)
    with pytest.raises(ValueError, match="needs kl_SR"):
        compute_advantages(torch.ones(2), ok_g, ok_m, kl_cfg)
