
import pytest
import torch

from miles_lib.train.batch import collate, response_values
from miles_lib.train.config import TrainConfig
from miles_lib.train.schedule import lr_multiplier
from miles_lib.types import Sample
from miles_lib.weight_sync import iter_buckets, shares_storage


def _sample(tokens, R, idx=0, nl=2, k=2):
    L = len(tokens) - 1
    return Sample(index=idx, tokens=tokens, response_length=R,
                  rollout_log_probs=[-0.1 * (i + 1) for i in range(R)],
                  rollout_routed_experts=torch.arange(L * nl * k).view(L, nl, k) % 4)


def test_collate_aligns_response_tokens_with_targets():
    s0 = _sample([5, 6, 7, 8, 9], R=2)  # prompt 5 6 7, response 8 9
    s1 = _sample([1, 2, 3], R=1, idx=1)  # prompt 1 2, response 3
    adv = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    b = collate([s0, s1], adv)
    assert b.input_ids_SL.tolist() == [[5, 6, 7, 8], [1, 2, 0, 0]]
    assert b.targets_SL.tolist() == [[6, 7, 8, 9], [2, 3, 0, 0]]
    assert b.attention_mask_SL.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # response token i sits at target position P - 1 + i
    assert b.response_mask_SL.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert b.rollout_logp_SL[0, 2:].tolist() == pytest.approx([-0.1, -0.2])
    assert b.advantages_SL.tolist() == [[0, 0, 1, 2], [0, 3, 0, 0]]
    assert b.routed_experts_SLnK.shape == (2, 4, 2, 2)
    assert torch.equal(b.routed_experts_SLnK[1, :2], s1.rollout_routed_experts)
    assert [t.tolist() for t in response_values(b.targets_SL, [s0, s1])] == [[8, 9], [3]]
    assert b.num_tokens == 3


def test_collate_rejects_misaligned_routing_and_logprobs():
    s = _sample([1, 2, 3, 4], R=2)
    s.rollout_routed_experts = s.rollout_routed_experts[:-1]
    with pytest.raises(ValueError, match="len\\(tokens\\) - 1"):
        collate([s])
    s = _sample([1, 2, 3, 4], R=2)
    s.rollout_log_probs = [0.0]
    with pytest.raises(ValueError, match="rollout_log_probs"):
        collate([s])


def test_loss_mask_is_respected():
    s = _sample([1, 2, 3, 4], R=2)
    s.loss_mask = [1, 0]
    assert collate([s]).response_mask_SL.tolist() == [[0, 1, 0]]


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, lr_schedule="cosine", total_steps=6, min_lr_ratio=0.1)
    m = [lr_multiplier(s, cfg) for s in range(7)]
    assert m[:2] == [0.5, 1.0]
    assert m[2] == pytest.approx(1.0)  # p = 0
    assert m[4] == pytest.approx(0.1 + 0.9 * 0.5)  # p = 0.5
    assert m[6] == pytest.approx(0.1)
    lin = TrainConfig(lr_schedule="linear", total_steps=4)
    assert [lr_multiplier(s, lin) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert lr_multiplier(100, TrainConfig()) == 1.0


def test_iter_buckets_bounds_bucket_size():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(iter_buckets(named, bucket_bytes=4 * 25))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert sum(len(b) for b in buckets) == len(named)


def test_shares_storage():
    a = torch.nn.Linear(3, 3)
    b = torch.nn.Linear(3, 3)
    assert shares_storage(a, a)
    assert not shares_storage(a, b)
    b.weight, b.bias = a.weight, a.bias
    assert shares_storage(a, b)
