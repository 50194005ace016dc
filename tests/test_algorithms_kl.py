"""KL estimators (hand values, exact expectations) and the entropy (against torch.distributions)."""

import math

import pytest
import torch

from miles_lib.algorithms import KL_ESTIMATORS, entropy_from_logits, kl_penalty

LOGP = torch.tensor([-1.0, -2.0], dtype=torch.float64)
REF = torch.tensor([-1.5, -1.0], dtype=torch.float64)


def test_hand_values():
    # logp - ref = 0.5, -1.0;  d = ref - logp = -0.5, 1.0
    assert kl_penalty(LOGP, REF, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(LOGP, REF, "k2").tolist() == pytest.approx([0.5 * 0.25, 0.5 * 1.0])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]  # 0.10653, 0.71828
    assert kl_penalty(LOGP, REF, "k3").tolist() == pytest.approx(k3)
    assert kl_penalty(LOGP, REF, "low_var_kl").tolist() == pytest.approx(k3)


def test_k3_is_clamped_and_its_gradient_finite():
    logp = torch.tensor([0.0, 0.0, -50.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([20.0, -30.0, 0.0], dtype=torch.float64)
    k = kl_penalty(logp, ref, "k3")
    assert k.tolist() == [10.0, 10.0, 10.0]  # e^20 - 21; clamp(d=-30 -> -20): e^-20 + 19; d = 50 -> 20
    k.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_estimators_are_unbiased_or_not_as_documented():
    # exact expectations under tokens sampled from p: E_p[k1] = E_p[k3] = KL(p || q); k2 is biased
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    kl = float((p * (p / q).log()).sum())
    expect = {name: float((p * kl_penalty(p.log(), q.log(), name)).sum()) for name in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(kl) and expect["k3"] == pytest.approx(kl)
    assert expect["k2"] != pytest.approx(kl, rel=1e-3)
    assert (kl_penalty(p.log(), q.log(), "k3") >= 0).all()


def test_reference_is_not_differentiated():
    logp = LOGP.clone().requires_grad_(True)
    ref = REF.clone().requires_grad_(True)
    kl_penalty(logp, ref, "k1").sum().backward()
    assert ref.grad is None and logp.grad.tolist() == [1.0, 1.0]


def test_entropy_matches_torch_distributions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11) * 3
    torch.testing.assert_close(entropy_from_logits(logits),
                               torch.distributions.Categorical(logits=logits).entropy())
    assert entropy_from_logits(torch.zeros(4, 7)).tolist() == pytest.approx([math.log(7)] * 4)


def test_entropy_is_stable_for_huge_and_minus_inf_logits():
    big = torch.tensor([[1e4, 1e4, -1e4]])
    assert entropy_from_logits(big).tolist() == pytest.approx([math.log(2)])
    z = torch.tensor([[0.0, float("-inf"), 0.0]], requires_grad=True)  # a masked vocabulary entry
    h = entropy_from_logits(z)
    h.sum().backward()
    assert h.tolist() == pytest.approx([math.log(2)])
    assert torch.isfinite(z.grad).all() and z.grad[0, 1] == 0


def test_entropy_chunked_equals_unchunked_with_gradients():
    torch.manual_seed(1)
    a = torch.randn(3, 5, 9, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ha, hb = entropy_from_logits(a), entropy_from_logits(b, chunk_size=4)
    torch.testing.assert_close(ha, hb)
    ha.sum().backward()
    hb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert entropy_from_logits(torch.zeros(2, 3, 5, dtype=torch.bfloat16)).dtype == torch.float32


def test_every_estimator_is_zero_on_policy():
    for name in KL_ESTIMATORS.names():
        assert torch.equal(kl_penalty(LOGP, LOGP, name), torch.zeros_like(LOGP))
