"""compute_policy_loss: the combined objective, its split invariance, and the sign of its update."""

import pytest
import torch

from miles_lib.algorithms import (
    AlgorithmConfig,
    compute_advantages,
    compute_policy_loss,
)

# two sequences, lengths 2 and 1, on-policy (ratio 1): l^PG_t = -A_t
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0], [-0.5, 0.0]], dtype=torch.float64)
OLD = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64)


def logp():
    return OLD.clone().requires_grad_(True)


def test_pg_only_token_mean():
    lp = logp()
    loss, m = compute_policy_loss(lp, OLD, ADV, MASK, AlgorithmConfig())
    # (-1 - 1 + 0.5) / 3 tokens
    assert float(loss.detach()) == pytest.approx(-1.5 / 3)
    loss.backward()
    # d/dlogp_t = -r_t·A_t / N = -A_t / 3 on masked tokens
    torch.testing.assert_close(lp.grad, -ADV * MASK / 3)
    assert float(m["pg_loss"]) == pytest.approx(-0.5) and "loss" not in m
    assert float(m["clip_frac"]) == 0.0 and "kl_loss" not in m and "entropy" not in m


def test_weights_kl_and_entropy_terms():
    is_w = torch.tensor([[2.0, 1.0], [0.5, 7.0]], dtype=torch.float64)
    ref = OLD - torch.tensor([[0.3, -0.3], [0.6, 9.0]], dtype=torch.float64)  # k1 = logp - ref = 0.3, -0.3, 0.6
    ent = torch.tensor([[1.0, 2.0], [6.0, 100.0]], dtype=torch.float64)
    cfg = AlgorithmConfig(kl_loss_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    lp = logp()
    loss, m = compute_policy_loss(lp, OLD, ADV, MASK, cfg, is_weights=is_w, ref_logp=ref, entropy=ent)
    pg = (2 * -1.0 + 1 * -1.0 + 0.5 * 0.5) / 3  # weighted PG: -2.75 / 3
    kl = (0.3 - 0.3 + 0.6) / 3  # 0.2
    h = (1 + 2 + 6) / 3  # 3
    assert float(loss.detach()) == pytest.approx(pg + 0.1 * kl - 0.01 * h)
    assert float(m["pg_loss"]) == pytest.approx(pg)
    assert float(m["kl_loss"]) == pytest.approx(kl) and float(m["entropy"]) == pytest.approx(h)
    loss.backward()
    # d/dlogp = (-w·A + β·1) / 3  (k1's derivative is 1; the entropy tensor is an input here)
    torch.testing.assert_close(lp.grad, (-is_w * ADV + 0.1) * MASK / 3)
    assert all(not v.requires_grad for v in m.values())


def test_entropy_bonus_gradient_and_weights_not_differentiated():
    ent = torch.tensor([[1.0, 2.0], [6.0, 0.0]], dtype=torch.float64, requires_grad=True)
    w = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    loss, _ = compute_policy_loss(logp(), OLD, ADV, MASK, AlgorithmConfig(entropy_coef=0.01), entropy=ent,
                                  is_weights=w)
    loss.backward()
    torch.testing.assert_close(ent.grad, -0.01 * MASK / 3)
    assert w.grad is None


@pytest.mark.parametrize("mode,extra", [("token_mean", {}), ("seq_mean_token_mean", {}),
                                        ("seq_mean_token_sum", {"seq_token_sum_norm": 8.0})])
def test_micro_batches_with_global_normalizers_equal_the_full_batch(mode, extra):
    torch.manual_seed(0)
    S, R = 6, 5
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = (torch.arange(R)[None] < lengths[:, None]).double()
    old = -torch.rand(S, R, dtype=torch.float64) * 3
    base = old + 0.3 * torch.randn(S, R, dtype=torch.float64)  # ratios far enough from 1 to clip some
    adv = torch.randn(S, 1, dtype=torch.float64).expand(S, R) * mask
    ref = old + 0.1 * torch.randn(S, R, dtype=torch.float64)
    ent = torch.rand(S, R, dtype=torch.float64)
    isw = 0.5 + torch.rand(S, R, dtype=torch.float64)
    cfg = AlgorithmConfig(loss_agg_mode=mode, kl_loss_coef=0.05, entropy_coef=0.01, dual_clip_c=3.0, **extra)

    def run(rows, **glob):
        lp = base[rows].clone().requires_grad_(True)
        loss, m = compute_policy_loss(lp, old[rows], adv[rows], mask[rows], cfg, is_weights=isw[rows],
                                      ref_logp=ref[rows], entropy=ent[rows], **glob)
        loss.backward()
        return loss.detach(), lp.grad, m

    full, full_grad, full_m = run(slice(0, S))
    assert 0 < float(full_m["clip_frac"]) < 1  # the case exercises clipping
    glob = {"global_num_tokens": float(mask.sum()), "global_num_seqs": float((mask.sum(-1) > 0).sum())}
    parts = [run(slice(0, 2), **glob), run(slice(2, 3), **glob), run(slice(3, S), **glob)]
    torch.testing.assert_close(sum(p[0] for p in parts), full)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full_grad)


def test_all_tokens_masked_micro_batch_is_zero_and_finite():
    lp = logp()
    cfg = AlgorithmConfig(kl_loss_coef=0.1, entropy_coef=0.1)
    loss, m = compute_policy_loss(lp, OLD, ADV, torch.zeros_like(MASK), cfg, ref_logp=OLD - 1,
                                  entropy=torch.ones_like(OLD), global_num_tokens=10.0, global_num_seqs=4.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))
    assert all(torch.isfinite(v) for v in m.values())


def test_errors_name_the_missing_input():
    with pytest.raises(ValueError, match="needs ref_logp"):
        compute_policy_loss(logp(), OLD, ADV, MASK, AlgorithmConfig(kl_loss_coef=0.1))
    with pytest.raises(ValueError, match="needs the token entropies"):
        compute_policy_loss(logp(), OLD, ADV, MASK, AlgorithmConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 1\)"):
        compute_policy_loss(logp(), OLD, ADV[:, :1], MASK, AlgorithmConfig())


@pytest.mark.parametrize("policy_loss", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_one_step_raises_the_probability_of_the_rewarded_answer(policy_loss, estimator):
    # a one-token "policy" over 4 answers; a group of 4 samples where only answer 2 is rewarded.
    # A sign error anywhere (advantage, ratio, loss, aggregation) would lower p(2).
    logits = torch.zeros(4, requires_grad=True)
    answers = torch.tensor([0, 1, 2, 3])
    rewards = (answers == 2).float()
    mask = torch.ones(4, 1)
    cfg = AlgorithmConfig(advantage_estimator=estimator, policy_loss=policy_loss)
    adv = compute_advantages(rewards, torch.zeros(4, dtype=torch.long), mask, cfg)
    lp = logits.log_softmax(-1)[answers][:, None]
    loss, _ = compute_policy_loss(lp, lp.detach(), adv, mask, cfg)
    loss.backward()
    with torch.no_grad():
        before = logits.softmax(-1)[2].item()
        after = (logits - 1.0 * logits.grad).softmax(-1)[2].item()
    assert after > before
