"""One GRPO cycle, colocated: rollout -> reward -> advantages -> train -> weight sync, K times.

Plain Python (no Flyte): a Flyte task, a notebook or a test calls ``run_cycle``. A cycle starts from
a training checkpoint (weights, optimizer moments, LR-schedule position, RNG states, prompt-data
position, weight version) and ends by writing the next one, so N cycles of K steps are the same run
as one uninterrupted run of N*K steps.

Per step:
    prompts (prompts_per_step rows) -> n_samples_per_prompt requests each, seeded per request
    engine.generate -> Samples (tokens, rollout_log_probs, rollout_routed_experts, versions)
    reward fn -> rewards; [dynamic sampling: drop zero-variance groups, over-sample to refill]
    advantage estimator -> per-token advantages
    actor.train_step (old-logprob recompute with routing replay, IS correction, PPO/GSPO loss)
    weight_sync -> engine (zero-copy when the engine runs the trainer's module), version + 1
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from miles_lib import algorithms
from miles_lib.data.dataset import PromptBatcher
from miles_lib.data.rewards import compute_rewards
from miles_lib.model.tokenizer import Tokenizer
from miles_lib.pipeline_config import GRPOConfig
from miles_lib.rollout import RolloutEngine, SamplingParams
from miles_lib.train import distributed as dist_utils
from miles_lib.train.actor import Actor
from miles_lib.train.batch import collate
from miles_lib.types import Sample
from miles_lib.weight_sync import sync_weights


@dataclasses.dataclass
class GRPOState:
    """Everything a running GRPO job holds; ``checkpointing`` saves/restores it."""

    cfg: GRPOConfig
    model: torch.nn.Module
    tokenizer: Tokenizer
    actor: Actor
    engine: RolloutEngine
    batcher: PromptBatcher
    step: int = 0  # GRPO steps done
    weight_version: int = 0
    last_samples: list[Sample] = dataclasses.field(default_factory=list)  # the last step's rollouts


def request_seed(run_seed: int, step: int, request: int) -> int:
    """Deterministic per-request sampling seed (independent of batching and of other requests)."""
    return (run_seed * 1_000_003 + step * 10_007 + request) % (2**63 - 1)


def _make_requests(state: GRPOState, rows: list[dict], group_offset: int) -> tuple[list[list[int]], list[SamplingParams], list[Sample]]:
    """Requests for this rank's share of the groups (rank r takes groups r, r + W, ...); seeds and
    indices are global, so a sample is the same whatever the number of ranks."""
    cfg = state.cfg.rollout
    ids, params, meta = [], [], []
    stop = list(state.tokenizer.stop_token_ids)
    rank, world = dist_utils.world()
    for g, row in enumerate(rows):
        if g % world != rank:
            continue
        prompt_ids = state.tokenizer.encode(row["prompt"])
        for j in range(cfg.n_samples_per_prompt):
            req = (group_offset + g) * cfg.n_samples_per_prompt + j
            ids.append(prompt_ids)
            params.append(SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                         max_new_tokens=cfg.max_new_tokens, stop_token_ids=stop,
                                         seed=request_seed(state.cfg.seed, state.step, req)))
            meta.append(Sample(index=req, group_index=group_offset + g, prompt=row["prompt"],
                               label=row.get("label"), metadata=dict(row.get("metadata") or {})))
    return ids, params, meta


def _finish_samples(state: GRPOState, generated: list[Sample], meta: list[Sample]) -> list[Sample]:
    out = []
    for s, m in zip(generated, meta):
        s.index, s.group_index, s.prompt, s.label = m.index, m.group_index, m.prompt, m.label
        s.metadata = {**m.metadata, **s.metadata}
        s.response = state.tokenizer.decode(s.response_tokens, skip_special_tokens=True)
        out.append(s)
    return out


def rollout_groups(state: GRPOState, num_groups: int, group_offset: int) -> list[Sample]:
    rows = state.batcher.next_batch(num_groups)
    ids, params, meta = _make_requests(state, rows, group_offset)
    samples = _finish_samples(state, state.engine.generate(ids, params), meta)
    compute_rewards(samples, state.cfg.reward)
    return samples


def group_reward_std(samples: list[Sample]) -> dict[int, float]:
    groups: dict[int, list[float]] = {}
    for s in samples:
        groups.setdefault(s.group_index, []).append(float(s.reward))
    return {g: float(torch.tensor(r).std(unbiased=False)) if len(r) > 1 else 0.0 for g, r in groups.items()}


def collect_rollouts(state: GRPOState) -> tuple[list[Sample], dict[str, float]]:
    """Rollout one step's groups; with dynamic sampling, replace zero-variance groups by new ones."""
    cfg = state.cfg.rollout
    t0 = time.perf_counter()
    want = cfg.prompts_per_step
    kept: list[Sample] = []
    all_samples: list[Sample] = []
    dropped = rounds = next_group = 0
    while True:
        need = want - len({s.group_index for s in kept})
        batch = rollout_groups(state, need, group_offset=next_group)
        next_group += need
        all_samples += batch
        rounds += 1
        if not cfg.dynamic_sampling:
            kept += batch
            break
        std = group_reward_std(batch)
        good = [s for s in batch if std[s.group_index] > 0]
        dropped += len({g for g, v in std.items() if v == 0})
        kept += good
        if len({s.group_index for s in kept}) >= want or rounds >= cfg.max_sampling_rounds:
            break
    seconds = time.perf_counter() - t0
    gen_tokens = sum(s.response_length for s in all_samples)
    rewards = torch.tensor([float(s.reward) for s in all_samples])
    lengths = torch.tensor([float(s.response_length) for s in all_samples])
    metrics = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
        "accuracy": float((rewards > 0.5).float().mean()),
        "response_length_mean": float(lengths.mean()),
        "truncated_frac": float(sum(s.status.value == "truncated" for s in all_samples) / len(all_samples)),
        "rollout_seconds": seconds, "rollout_tokens_per_s": gen_tokens / max(seconds, 1e-9),
        "rollout_samples": float(len(all_samples)), "rollout_rounds": float(rounds),
        "dynamic_groups_dropped": float(dropped), "train_groups": float(len({s.group_index for s in kept})),
    }
    if cfg.dynamic_sampling and not kept:  # every group had zero variance: train on nothing useful
        kept = all_samples
    return kept, metrics


def grpo_step(state: GRPOState) -> dict[str, float]:
    """One GRPO step; returns its metrics row."""
    cfg = state.cfg
    samples, metrics = collect_rollouts(state)
    samples.sort(key=lambda s: (s.group_index, s.index))
    state.last_samples = samples
    rewards = torch.tensor([float(s.reward) for s in samples])
    group_ids = torch.tensor([s.group_index for s in samples])
    R = max(s.response_length for s in samples)
    resp_mask = torch.zeros(len(samples), R)
    for i, s in enumerate(samples):
        resp_mask[i, : s.response_length] = 1.0
    advantages = algorithms.compute_advantages(rewards, group_ids, resp_mask, cfg.algorithm)
    batch = collate(samples, advantages, with_routing=True)
    # log-probs are taken at the sampling temperature (T = 0, greedy, scores at T = 1)
    temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
    metrics.update(state.actor.train_step(batch, temperature=temperature))
    state.weight_version += 1
    # sharded trainer (FSDP2): push the gathered full weights to this rank's engine copy
    full = dist_utils.full_model_state(state.model) if dist_utils.world()[1] > 1 else None
    sync = sync_weights(state.model, state.engine, state.weight_version, state=full)
    state.step += 1
    metrics.update({"step": float(state.step), "weight_version": float(state.weight_version),
                    "sync_seconds": sync.seconds,
                    "train_tokens_per_s": metrics["train_tokens"] / max(metrics["train_seconds"], 1e-9)})
    return metrics


def samples_table(samples: list[Sample], step: int) -> pd.DataFrame:
    """The rollouts a step trained on, one row per sample (stored as parquet next to the checkpoint)."""
    return pd.DataFrame({
        "step": step, "group_index": [s.group_index for s in samples], "index": [s.index for s in samples],
        "prompt": [str(s.prompt) for s in samples], "response": [s.response for s in samples],
        "label": [str(s.label) for s in samples], "reward": [float(s.reward) for s in samples],
        "response_length": [s.response_length for s in samples], "status": [s.status.value for s in samples],
        "tokens": [list(s.tokens) for s in samples],
        "rollout_log_probs": [list(s.rollout_log_probs or []) for s in samples],
        "weight_version": [s.weight_versions[-1] if s.weight_versions else -1 for s in samples],
    })


def run_steps(state: GRPOState, num_steps: int, progress: bool = True,
              on_step: Callable[[int, dict], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``num_steps`` GRPO steps; returns (metrics table, one row per step; rollout samples).
    ``on_step(step, metrics_row)`` is called after every step (progress hooks, fault injection)."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    samples: list[pd.DataFrame] = []
    bar = tqdm(range(num_steps), desc="grpo", disable=not progress)
    for _ in bar:
        row = grpo_step(state)
        rows.append(row)
        samples.append(samples_table(state.last_samples, state.step))
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}",
                        dlogp=f"{row.get('train_rollout_logprob_abs_diff', float('nan')):.1e}")
        if on_step is not None:
            on_step(state.step, row)
    return pd.DataFrame(rows), pd.concat(samples, ignore_index=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
