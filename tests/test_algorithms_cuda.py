"""Every registered algorithm on CUDA tensors gives the CPU result (no device mix-ups)."""

import pytest
import torch

from miles_lib.algorithms import (
    ADVANTAGES,
    OFF_POLICY,
    POLICY_LOSSES,
    AlgorithmConfig,
    compute_advantages,
    compute_policy_loss,
    entropy_from_logits,
    mismatch_metrics,
    off_policy_weights,
)

pytestmark = pytest.mark.gpu


def _batch():
    g = torch.Generator().manual_seed(0)
    S, R = 8, 6
    mask = (torch.arange(R)[None] < torch.randint(1, R + 1, (S,), generator=g)[:, None]).float()
    old = -torch.rand(S, R, generator=g) * 3
    return {"rewards": torch.randint(0, 2, (S,), generator=g).float(), "groups": torch.arange(S) // 4,
            "mask": mask, "old": old, "logp": old + 0.2 * torch.randn(S, R, generator=g),
            "rollout": old + 0.05 * torch.randn(S, R, generator=g), "kl": torch.rand(S, R, generator=g),
            "entropy": torch.rand(S, R, generator=g), "logits": torch.randn(S, R, 33, generator=g)}


def _on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _close(a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_advantages_on_cuda(name):
    extra = {"kl_in_reward_coef": 0.1, "gamma": 0.9} if name.startswith("reinforce") else {}
    cfg = AlgorithmConfig(advantage_estimator=name, **extra)
    out = [compute_advantages(b["rewards"], b["groups"], b["mask"], cfg, kl_SR=b["kl"])
           for b in (_on(_batch(), "cpu"), _on(_batch(), "cuda"))]
    assert out[1].is_cuda
    _close(*out)


@pytest.mark.parametrize("mode", OFF_POLICY.names())
def test_off_policy_on_cuda(mode):
    cfg = AlgorithmConfig(off_policy=mode)
    cpu, gpu = (off_policy_weights(b["logp"], b["rollout"], b["mask"], cfg)
                for b in (_on(_batch(), "cpu"), _on(_batch(), "cuda")))
    _close(cpu[0], gpu[0])
    _close(cpu[1], gpu[1])
    assert cpu[2] == pytest.approx(gpu[2], abs=1e-5)


@pytest.mark.parametrize("policy_loss", POLICY_LOSSES.names())
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_policy_loss_and_gradient_on_cuda(policy_loss, mode):
    cfg = AlgorithmConfig(policy_loss=policy_loss, loss_agg_mode=mode, kl_loss_coef=0.1, entropy_coef=0.01,
                          seq_token_sum_norm=6.0 if mode == "seq_mean_token_sum" else None)
    results = []
    for device in ("cpu", "cuda"):
        b = _on(_batch(), device)
        lp = b["logp"].clone().requires_grad_(True)
        adv = compute_advantages(b["rewards"], b["groups"], b["mask"], cfg)
        w, keep, _ = off_policy_weights(b["old"], b["rollout"], b["mask"], AlgorithmConfig(off_policy="none"))
        loss, m = compute_policy_loss(lp, b["old"], adv, b["mask"] * keep, cfg, is_weights=w,
                                      ref_logp=b["old"], entropy=b["entropy"],
                                      global_num_tokens=float(b["mask"].sum()), global_num_seqs=8.0)
        loss.backward()
        results.append((loss.detach(), lp.grad, m, mismatch_metrics(b["old"], b["rollout"], b["mask"]),
                        entropy_from_logits(b["logits"], chunk_size=5)))
    (l0, g0, m0, mm0, h0), (l1, g1, m1, mm1, h1) = results
    assert l1.is_cuda and g1.is_cuda
    _close(l0, l1)
    _close(g0, g1)
    _close(h0, h1)
    for k in m0:
        _close(m0[k], m1[k])
    assert mm0 == pytest.approx(mm1, abs=1e-5)
