"""Loss aggregation: hand values, and the split invariance the trainer relies on."""

import pytest
import torch

from miles_lib.algorithms import AGGREGATIONS, aggregate
from miles_lib.errors import ConfigError

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_hand_values():
    assert float(aggregate(LOSS, MASK, "token_mean")) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(aggregate(LOSS, MASK, "seq_mean_token_mean")) == pytest.approx((6 / 3 + 4 / 1) / 2)
    # Dr.GRPO: sum per sequence / constant C, averaged over sequences: (6/4 + 4/4) / 2
    assert float(aggregate(LOSS, MASK, "seq_mean_token_sum", seq_token_sum_norm=4.0)) == pytest.approx(1.25)


def test_fully_masked_sequences_do_not_count_as_sequences():
    loss = torch.cat([LOSS, torch.tensor([[9.0, 9.0, 9.0]])])
    mask = torch.cat([MASK, torch.zeros(1, 3)])
    assert float(aggregate(loss, mask, "seq_mean_token_mean")) == pytest.approx(3.0)
    assert float(aggregate(loss, mask, "token_mean")) == pytest.approx(2.5)


def _ragged_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 1, 6, 2, 5]
    loss = torch.randn(5, 6, generator=g, dtype=torch.float64)
    mask = torch.zeros(5, 6, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return loss, mask


@pytest.mark.parametrize("mode", AGGREGATIONS.names())
def test_two_ranks_with_global_normalizers_sum_to_the_full_batch(mode):
    loss, mask = _ragged_batch()
    leaf = loss.clone().requires_grad_(True)
    full = aggregate(leaf, mask, mode, seq_token_sum_norm=8.0)
    full.backward()
    n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    # "rank 0" holds rows 0-1 padded to 3 positions, "rank 1" rows 2-4 at the full 6: different padding
    parts = [(slice(0, 2), 3), (slice(2, 5), 6)]
    leaves = [loss[rows, :width].clone().requires_grad_(True) for rows, width in parts]
    total = 0.0
    for (rows, width), part in zip(parts, leaves):
        value = aggregate(part, mask[rows, :width], mode, global_num_tokens=n_tok, global_num_seqs=n_seq,
                          seq_token_sum_norm=8.0)
        value.backward()
        total = total + value
    torch.testing.assert_close(total, full.detach())
    # the gradients are the full-batch gradients too
    torch.testing.assert_close(leaves[0].grad, leaf.grad[0:2, :3])
    torch.testing.assert_close(leaves[1].grad, leaf.grad[2:5])


def test_local_normalizers_would_not_add_up():
    # why the global count is needed: per-part token means averaged over parts != full token mean
    loss, mask = _ragged_batch()
    full = float(aggregate(loss, mask, "token_mean"))
    local = (float(aggregate(loss[:2], mask[:2], "token_mean")) + float(aggregate(loss[2:], mask[2:], "token_mean"))) / 2
    assert abs(local - full) > 1e-3


def test_empty_mask_is_zero_not_nan():
    for mode in AGGREGATIONS.names():
        out = aggregate(LOSS, torch.zeros_like(MASK), mode, seq_token_sum_norm=1.0)
        assert float(out) == 0.0


def test_padding_values_never_leak_but_masked_nan_does():
    loss = LOSS.clone()
    loss[1, 1], loss[1, 2] = float("inf"), float("nan")  # padding
    for mode in AGGREGATIONS.names():
        assert torch.isfinite(aggregate(loss, MASK, mode, seq_token_sum_norm=1.0))
    loss[0, 0] = float("nan")  # a real token: must show (the trainer skips non-finite steps)
    assert torch.isnan(aggregate(loss, MASK, "token_mean"))


def test_token_weights_in_the_mask():
    # a fractional mask weights tokens: (1·1 + 0.5·2 + 0·3 + 1·4) / (1 + 0.5 + 0 + 1)
    w = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert float(aggregate(LOSS, w, "token_mean")) == pytest.approx(6 / 2.5)


def test_errors():
    with pytest.raises(ValueError, match="pass global_num_seqs"):
        aggregate(LOSS, MASK, "seq_mean_token_mean", global_num_tokens=4)
    with pytest.raises(ValueError, match="constant seq_token_sum_norm > 0"):
        aggregate(LOSS, MASK, "seq_mean_token_sum")
    with pytest.raises(ConfigError, match=r"unknown loss aggregation mode 'mean'; valid: \["):
        aggregate(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match="loss has shape"):
        aggregate(LOSS, MASK[:, :2])
