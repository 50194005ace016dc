import copy

import pytest
import torch

from miles_lib.algorithms import AlgorithmConfig
from miles_lib.train.actor import Actor
from miles_lib.train.config import TrainConfig
from tests.helpers_tiny import batch_from, rollout, tiny_model


def test_step0_old_logprobs_match_rollout_and_ratio_is_one():
    model = tiny_model()
    samples = rollout(model)
    actor = Actor(model, TrainConfig(lr=1e-3, micro_batch_size=5), AlgorithmConfig())
    m = actor.train_step(batch_from(samples), temperature=1.0)
    assert m["train_rollout_logprob_abs_diff"] <= 1e-5
    assert m["r3_used_routing_match"] == 1.0
    # the first micro-batch runs before the first optimizer step: ratio exactly 1, nothing clipped
    assert m["clip_frac"] == 0.0
    assert m["skipped_step"] == 0.0


def test_routing_replay_uses_rollout_experts_and_disagreement_shows_without_it():
    model = tiny_model()
    samples = rollout(model)
    with torch.no_grad():  # the policy moved since the rollout: its routers now choose differently
        for layer in model.model.layers:
            layer.mlp.gate.weight.add_(torch.randn_like(layer.mlp.gate.weight) * 0.5)
    on = Actor(copy.deepcopy(model), TrainConfig(routing_replay=True), AlgorithmConfig()).train_step(
        batch_from(samples), 1.0)
    off = Actor(copy.deepcopy(model), TrainConfig(routing_replay=False), AlgorithmConfig()).train_step(
        batch_from(samples), 1.0)
    assert on["r3_used_routing_match"] == 1.0  # trainer forward used the rollout's experts for 100% of tokens
    assert off["r3_used_routing_match"] < 1.0
    assert off["router_topk_mismatch_frac"] > 0.0
    # the routers' own choice still disagrees under R3 (it is measured, then overridden)
    assert on["router_topk_mismatch_frac"] > 0.0


def test_non_finite_loss_skips_step_and_keeps_weights():
    model = tiny_model()
    batch = batch_from(rollout(model))
    batch.advantages_SL[0, -1] = float("nan")
    batch.response_mask_SL[0, -1] = 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    actor = Actor(model, TrainConfig(lr=1e-2), AlgorithmConfig())
    m = actor.train_step(batch, 1.0)
    assert m["skipped_step"] == 1.0 and actor.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not actor.optimizer.state  # no moments were created


def test_micro_batch_size_does_not_change_the_update():
    base = tiny_model()
    samples = rollout(base)
    results = []
    for mbs in (16, 3):
        model = copy.deepcopy(base)
        Actor(model, TrainConfig(lr=1e-3, micro_batch_size=mbs, grad_clip=0), AlgorithmConfig()).train_step(
            batch_from(samples), 1.0)
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss", ["ppo_clip", "gspo"])
def test_updates_raise_the_likelihood_of_positive_advantage_samples(loss):
    model = tiny_model()
    samples = rollout(model, n_samples=8)
    algo = AlgorithmConfig(policy_loss=loss)
    batch = batch_from(samples, algo)
    actor = Actor(model, TrainConfig(lr=3e-3, grad_clip=0), algo)
    from miles_lib.train.logprobs import batched_logprobs
    before = batched_logprobs(model, batch, 1.0, True, 64)["logp"]
    for _ in range(3):
        actor.train_step(batch, 1.0)
    after = batched_logprobs(model, batch, 1.0, True, 64)["logp"]
    delta = ((after - before) * batch.response_mask_SL).sum(-1)
    adv = batch.advantages_SL.sum(-1)
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()
