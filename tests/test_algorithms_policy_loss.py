"""Policy losses at ratios 0.5 / 1.0 / 1.5 (NeMo-RL style), gradients against hand derivations."""

import math

import pytest
import torch

from miles_lib.algorithms import POLICY_LOSSES, AlgorithmConfig, aggregate

OLD = -1.0  # old log-prob of every token


def tokens(ratios, advantages, mask=None, requires_grad=True):
    """logp/old_logp/advantages/mask [1, T] with r_t = ratios[t]."""
    old = torch.full((1, len(ratios)), OLD, dtype=torch.float64)
    logp = (old + torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64)).requires_grad_(requires_grad)
    a = torch.tensor([advantages], dtype=torch.float64)
    m = torch.ones_like(a) if mask is None else torch.tensor([mask], dtype=torch.float64)
    return logp, old, a, m


def ppo(ratios, advantages, mask=None, **cfg):
    logp, old, a, m = tokens(ratios, advantages, mask)
    cfg = AlgorithmConfig(**{"eps_clip_low": 0.2, "eps_clip_high": 0.2, **cfg})
    loss, metrics = POLICY_LOSSES.get("ppo_clip")(logp, old, a, m, cfg)
    loss.sum().backward()
    return loss.detach()[0].tolist(), logp.grad[0].tolist(), metrics


def test_ppo_clip_positive_advantage():
    # A = +1, r = 0.5 / 1.0 / 1.5, ε = 0.2:
    #   -r·A            = -0.5, -1.0, -1.5
    #   -clip(r)·A      = -0.8, -1.0, -1.2
    #   max             = -0.5, -1.0, -1.2     (r = 1.5 clipped at 1.2: no gradient)
    loss, grad, m = ppo([0.5, 1.0, 1.5], [1.0, 1.0, 1.0])
    assert loss == pytest.approx([-0.5, -1.0, -1.2])
    # d l / d logp = -r·A where unclipped -> -0.5, -1.0, 0
    assert grad == pytest.approx([-0.5, -1.0, 0.0])
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 3)
    assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac"]) == pytest.approx(1 / 3)
    # ppo_kl = mean(old - logp) = -mean(log r) = -(log 0.5 + 0 + log 1.5) / 3
    assert float(m["ppo_kl"]) == pytest.approx(-(math.log(0.5) + math.log(1.5)) / 3)
    assert float(m["ratio_mean"]) == pytest.approx(1.0)


def test_ppo_clip_negative_advantage():
    # A = -1: -r·A = 0.5, 1.0, 1.5; -clip(r)·A = 0.8, 1.0, 1.2; max = 0.8, 1.0, 1.5 (r = 0.5 clipped)
    loss, grad, m = ppo([0.5, 1.0, 1.5], [-1.0, -1.0, -1.0])
    assert loss == pytest.approx([0.8, 1.0, 1.5])
    assert grad == pytest.approx([0.0, 1.0, 1.5])  # -r·A = +r where unclipped
    assert float(m["clip_frac_low"]) == pytest.approx(1 / 3) and float(m["clip_frac_high"]) == 0.0
    assert float(m["clip_frac_dual"]) == 0.0


def test_ppo_clip_advantage_scales_the_loss():
    # A = 2 at r = 0.5: max(-1.0, -1.6) = -1.0, gradient -r·A = -1.0; A = 0 gives 0 and no clip count
    loss, grad, m = ppo([0.5, 0.5], [2.0, 0.0])
    assert loss == pytest.approx([-1.0, 0.0]) and grad == pytest.approx([-1.0, 0.0])
    assert float(m["clip_frac"]) == 0.0


def test_clip_higher_asymmetric_bounds():
    # r = 1.25, A = +1: symmetric ε = 0.2 clips at 1.2 -> -1.2 (no gradient);
    # ε_high = 0.28 leaves it unclipped -> -1.25, gradient -1.25. Low side still at 1 - 0.2 = 0.8.
    loss, grad, _ = ppo([1.25], [1.0])
    assert loss == pytest.approx([-1.2]) and grad == pytest.approx([0.0])
    loss, grad, m = ppo([1.25, 1.5, 0.7], [1.0, 1.0, -1.0], eps_clip_high=0.28)
    # r = 1.5 -> clipped at 1.28; r = 0.7, A = -1: max(0.7, 0.8) = 0.8 (low clip)
    assert loss == pytest.approx([-1.25, -1.28, 0.8])
    assert grad == pytest.approx([-1.25, 0.0, 0.0])
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 3) and float(m["clip_frac_low"]) == pytest.approx(1 / 3)


def test_dual_clip_bounds_negative_advantage_loss():
    # A = -1, c = 3: r = 0.5 -> 0.8 (low clip); r = 1.5 -> 1.5; r = 4 -> max(4, 1.2) = 4 -> min(4, 3) = 3
    loss, grad, m = ppo([0.5, 1.5, 4.0], [-1.0, -1.0, -1.0], dual_clip_c=3.0)
    assert loss == pytest.approx([0.8, 1.5, 3.0])
    assert grad == pytest.approx([0.0, 1.5, 0.0])  # the dual-clipped token has no gradient
    assert float(m["clip_frac_dual"]) == pytest.approx(1 / 3)
    # positive advantages are never dual clipped: r = 4, A = +1 -> -1.2
    loss, _, m = ppo([4.0], [1.0], dual_clip_c=3.0)
    assert loss == pytest.approx([-1.2]) and float(m["clip_frac_dual"]) == 0.0
    # without dual clip the r = 4 token would cost 4
    assert ppo([4.0], [-1.0])[0] == pytest.approx([4.0])


def test_masked_tokens_contribute_nothing_even_with_garbage_logprobs():
    logp, old, a, m = tokens([0.5, 1.0, 1.5], [1.0, 1.0, 1.0], mask=[1, 1, 0], requires_grad=False)
    logp = logp.clone()
    logp[0, 2] = float("inf")  # padding garbage: exp would overflow
    a[0, 2] = float("nan")
    logp.requires_grad_(True)
    for name in POLICY_LOSSES.names():
        loss, metrics = POLICY_LOSSES.get(name)(logp, old, a, m, AlgorithmConfig())
        assert torch.isfinite(loss).all() and loss[0, 2] == 0
        assert all(torch.isfinite(v) for v in metrics.values())
        loss.sum().backward()
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
        logp.grad = None


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_all_tokens_masked_gives_zero_loss_and_metrics(name):
    logp, old, a, m = tokens([0.5, 1.5], [1.0, -1.0], mask=[0, 0])
    loss, metrics = POLICY_LOSSES.get(name)(logp, old, a, m, AlgorithmConfig())
    assert torch.equal(loss, torch.zeros_like(loss))
    assert all(float(v) == 0.0 for v in metrics.values())
    total = aggregate(loss, m, "token_mean")
    total.backward()
    assert float(total.detach()) == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))


def test_every_loss_reports_the_same_metric_keys():
    logp, old, a, m = tokens([0.5, 1.5], [1.0, -1.0])
    keys = {name: set(POLICY_LOSSES.get(name)(logp, old, a, m, AlgorithmConfig())[1])
            for name in POLICY_LOSSES.names()}
    expected = {"clip_frac", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "ppo_kl", "ratio_mean"}
    assert all(k == expected for k in keys.values())


# ---- GSPO -------------------------------------------------------------------------------------------
def gspo_batch():
    # three sequences, up to 2 tokens; log-ratios (logp - old):
    #   seq 0: [0.2, -0.1]  mean 0.05 -> s = e^0.05 = 1.05127 (inside [0.8, 1.28]), A = +1
    #   seq 1: [0.6,  0.4]  mean 0.5  -> s = e^0.5  = 1.64872 (> 1.28: clipped),     A = +1
    #   seq 2: [-1.0, pad]  mean -1.0 -> s = e^-1   = 0.36788 (< 0.8: clipped),      A = -1
    d = torch.tensor([[0.2, -0.1], [0.6, 0.4], [-1.0, 7.0]], dtype=torch.float64)
    old = torch.full_like(d, OLD)
    logp = (old + d).requires_grad_(True)
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    return logp, old, a, m


def test_gspo_uses_the_clipped_sequence_ratio_on_every_token():
    logp, old, a, m = gspo_batch()
    cfg = AlgorithmConfig(policy_loss="gspo", eps_clip_low=0.2, eps_clip_high=0.28)
    loss, metrics = POLICY_LOSSES.get("gspo")(logp, old, a, m, cfg)
    s0 = math.exp(0.05)
    expected = [[-s0, -s0], [-1.28, -1.28], [0.8, 0.0]]
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float64))
    # 2 of 5 tokens upper-clipped (seq 1), 1 of 5 lower-clipped (seq 2)
    assert float(metrics["clip_frac_high"]) == pytest.approx(2 / 5)
    assert float(metrics["clip_frac_low"]) == pytest.approx(1 / 5)
    assert float(metrics["ratio_mean"]) == pytest.approx((2 * s0 + 2 * math.exp(0.5) + math.exp(-1.0)) / 5)
    # per-token gradient: d l_t / d logp_t = -A·s_i (unclipped), nothing across tokens, 0 when clipped
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0, -s0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_gspo_gradient_equals_the_sequence_level_objective():
    # unclipped sequences: seq_mean_token_mean of the GSPO-token loss must have the gradient of
    # J = mean_i [ -A_i · exp(mean_t(logp - old)) ]  (the paper's sequence-level objective)
    torch.manual_seed(0)
    old = torch.randn(3, 4, dtype=torch.float64)
    d = 0.01 * torch.randn(3, 4, dtype=torch.float64)  # near on-policy: nothing clipped
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    a_S = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    a = a_S[:, None].expand(3, 4)
    cfg = AlgorithmConfig(policy_loss="gspo")
    logp = (old + d).requires_grad_(True)
    loss, metrics = POLICY_LOSSES.get("gspo")(logp, old, a, m, cfg)
    assert float(metrics["clip_frac"]) == 0.0
    aggregate(loss, m, "seq_mean_token_mean").backward()
    ref = (old + d).requires_grad_(True)
    s = torch.exp(((ref - old) * m).sum(-1) / m.sum(-1))
    (-(a_S * s)).mean().backward()
    torch.testing.assert_close(logp.grad, ref.grad * m)


def test_gspo_ratio_ignores_padding_and_is_one_on_policy():
    _, old, a, m = gspo_batch()
    cfg = AlgorithmConfig(policy_loss="gspo")
    loss, metrics = POLICY_LOSSES.get("gspo")(old.clone().requires_grad_(True), old, a, m, cfg)
    # ratio 1 everywhere: loss = -A on masked tokens
    torch.testing.assert_close(loss.detach(), -a * m)
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["ppo_kl"]) == 0.0
