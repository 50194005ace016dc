import os
import subprocess
import sys

import pandas as pd
import torch

from miles_lib.checkpoint import load_training_checkpoint
from miles_lib.cycle import run_cycle
from miles_lib.pipeline_config import GRPOConfig
from tests.helpers_tiny import tiny_base_checkpoint, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(prompts: str, **over) -> GRPOConfig:
    cfg = GRPOConfig.from_dict({
        "data": {"path": prompts},
        "rollout": {"prompts_per_step": 4, "n_samples_per_prompt": 4, "max_new_tokens": 3},
        "train": {"lr": 1e-3, "micro_batch_size": 8},
        "eval": {"path": prompts, "k": 2, "max_new_tokens": 3},
        "steps_per_cycle": 2,
    })
    return cfg.override(**over) if over else cfg


def test_cycle_writes_checkpoint_and_metrics(tmp_path):
    base = tiny_base_checkpoint(tmp_path)
    cfg = small_config(write_prompts(tmp_path / "p.jsonl"))
    res = run_cycle(cfg, base, str(tmp_path / "c1"), progress=False)
    assert isinstance(res.metrics, pd.DataFrame) and len(res.metrics) == 2
    for col in ("reward_mean", "accuracy", "response_length_mean", "train_rollout_logprob_abs_diff",
                "clip_frac", "r3_used_routing_match", "rollout_tokens_per_s", "train_tokens_per_s",
                "sync_seconds", "weight_version", "grad_norm"):
        assert col in res.metrics.columns, col
    assert res.metrics["weight_version"].tolist() == [1.0, 2.0]
    assert (res.metrics["r3_used_routing_match"] == 1.0).all()
    # the colocated engine runs the trainer's own tensors: step-0 recompute matches the rollout
    assert res.metrics["train_rollout_logprob_abs_diff"].iloc[0] <= 1e-5
    ckpt = load_training_checkpoint(res.checkpoint_uri)
    assert ckpt.step == 2 and ckpt.extra["weight_version"] == 2


def _cycle_in_subprocess(cfg: GRPOConfig, src: str, dst: str, steps: int) -> None:
    code = ("import sys; from miles_lib.cycle import run_cycle; from miles_lib.pipeline_config import GRPOConfig;"
            "run_cycle(GRPOConfig.from_json(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), progress=False)")
    r = subprocess.run([sys.executable, "-c", code, cfg.to_json(), src, dst, str(steps)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_split_run_equals_uninterrupted_run(tmp_path):
    base = tiny_base_checkpoint(tmp_path)
    cfg = small_config(write_prompts(tmp_path / "p.jsonl"))
    _cycle_in_subprocess(cfg, base, str(tmp_path / "full"), 4)
    _cycle_in_subprocess(cfg, base, str(tmp_path / "half"), 2)
    _cycle_in_subprocess(cfg, str(tmp_path / "half"), str(tmp_path / "resumed"), 2)
    full = load_training_checkpoint(str(tmp_path / "full"))
    resumed = load_training_checkpoint(str(tmp_path / "resumed"))
    assert full.step == resumed.step == 4
    for k, v in full.model_state.items():
        assert torch.equal(v, resumed.model_state[k]), k
    assert full.extra["batcher"] == resumed.extra["batcher"]
    opt_a, opt_b = full.extra["actor"]["optimizer"]["state"], resumed.extra["actor"]["optimizer"]["state"]
    for i in opt_a:
        assert torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"])


def test_kl_loss_uses_reference_checkpoint(tmp_path):
    import pytest

    from miles_lib.errors import ConfigError

    base = tiny_base_checkpoint(tmp_path)
    prompts = write_prompts(tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="reference_checkpoint"):
        small_config(prompts, algorithm={"kl_loss_coef": 0.1})
    cfg = small_config(prompts, algorithm={"kl_loss_coef": 0.1}, reference_checkpoint=base)
    res = run_cycle(cfg, base, str(tmp_path / "c1"), num_steps=1, progress=False)
    assert res.metrics["kl_loss"].iloc[0] == 0.0  # policy == reference before the first update
    other = tiny_base_checkpoint(tmp_path / "other", seed=1)  # a different reference policy
    cfg = cfg.override(reference_checkpoint=other)
    res = run_cycle(cfg, base, str(tmp_path / "c2"), num_steps=1, progress=False)
    assert res.metrics["kl_loss"].iloc[0] > 0.0


def test_samples_table_and_dynamic_sampling_drop_zero_variance_groups(tmp_path):
    base = tiny_base_checkpoint(tmp_path)
    prompts = write_prompts(tmp_path / "p.jsonl")
    # the random tiny model never answers right: every group has zero reward variance
    cfg = small_config(prompts, rollout={"dynamic_sampling": True, "max_sampling_rounds": 3})
    res = run_cycle(cfg, base, str(tmp_path / "c1"), num_steps=1, progress=False)
    row = res.metrics.iloc[0]
    assert row["rollout_rounds"] == 3  # kept over-sampling to refill the batch
    assert row["dynamic_groups_dropped"] == 3 * 4
    assert row["rollout_samples"] == 3 * 4 * 4
    s = res.samples
    assert len(s) == row["rollout_samples"] and set(s["step"]) == {1}
    assert {"prompt", "response", "reward", "tokens", "rollout_log_probs", "weight_version"} <= set(s.columns)


def test_bucketed_sync_to_an_engine_with_its_own_weights():
    from miles_lib.rollout import RolloutEngine, SamplingParams
    from miles_lib.weight_sync import sync_weights
    from tests.helpers_tiny import tiny_model

    trainer, engine_model = tiny_model(seed=1), tiny_model(seed=2)
    engine = RolloutEngine(engine_model)
    res = sync_weights(trainer, engine, version=5, bucket_bytes=4096)
    assert res.mode == "bucketed" and res.num_buckets > 1 and engine.weight_version == 5
    for k, v in trainer.state_dict().items():
        assert torch.equal(engine_model.state_dict()[k], v)
    shared = RolloutEngine(trainer)
    res = sync_weights(trainer, shared, version=6)
    assert res.mode == "zero_copy" and res.num_bytes == 0 and shared.weight_version == 6
    out = shared.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, seed=0))[0]
    assert out.weight_versions == [6, 6, 6]
