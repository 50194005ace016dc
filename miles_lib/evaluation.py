"""Held-out evaluation: pass@1 (greedy) and pass@k (sampled) on a prompt file.

pass@k uses the unbiased estimator of Chen et al. 2021 (Codex) from n = k samples per prompt with
c correct:  pass@k = 1 - C(n - c, k) / C(n, k)   (= 1 if c > 0 when n = k).
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from miles_lib.data.rewards import compute_rewards
from miles_lib.model.tokenizer import Tokenizer
from miles_lib.pipeline_config import EvalConfig
from miles_lib.rollout import RolloutEngine, SamplingParams
from miles_lib.types import Sample


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _generate(engine: RolloutEngine, tokenizer: Tokenizer, rows: list[dict], n: int,
              temperature: float, max_new_tokens: int, seed: int, reward: str) -> list[Sample]:
    ids, params, meta = [], [], []
    for g, row in enumerate(rows):
        p = tokenizer.encode(row["prompt"])
        for j in range(n):
            ids.append(p)
            params.append(SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                         stop_token_ids=list(tokenizer.stop_token_ids),
                                         seed=seed + g * n + j))
            meta.append((g, row))
    samples = engine.generate(ids, params)
    for s, (g, row) in zip(samples, meta):
        s.group_index, s.prompt, s.label = g, row["prompt"], row.get("label")
        s.response = tokenizer.decode(s.response_tokens, skip_special_tokens=True)
    compute_rewards(samples, reward)
    return samples


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Tokenizer, rows: list[dict], cfg: EvalConfig,
             reward: str = "math", max_concurrent_seqs: int = 256) -> tuple[pd.DataFrame, dict[str, float]]:
    """Returns (per-prompt table, summary {pass@1, pass@k, mean_response_length, num_prompts})."""
    if cfg.max_prompts:
        rows = rows[: cfg.max_prompts]
    if not rows:
        raise ValueError(f"evaluate: no prompts in {cfg.path}")
    engine = RolloutEngine(model, max_concurrent_seqs=max_concurrent_seqs)
    greedy = _generate(engine, tokenizer, rows, 1, 0.0, cfg.max_new_tokens, cfg.seed, reward)
    table = pd.DataFrame({
        "prompt": [r["prompt"] for r in rows], "label": [str(r.get("label")) for r in rows],
        "greedy_response": [s.response for s in greedy],
        "greedy_correct": [float(s.reward) > 0.5 for s in greedy],
        "response_length": [s.response_length for s in greedy],
    })
    summary = {"num_prompts": float(len(rows)), "pass@1": float(table["greedy_correct"].mean()),
               "mean_response_length": float(table["response_length"].mean())}
    if cfg.k > 0:
        sampled = _generate(engine, tokenizer, rows, cfg.k, cfg.temperature, cfg.max_new_tokens,
                            cfg.seed + 1, reward)
        correct = [0] * len(rows)
        for s in sampled:
            correct[s.group_index] += int(float(s.reward) > 0.5)
        table[f"sampled_correct_of_{cfg.k}"] = correct
        table[f"pass@{cfg.k}"] = [pass_at_k(cfg.k, c, cfg.k) for c in correct]
        summary[f"pass@{cfg.k}"] = float(table[f"pass@{cfg.k}"].mean())
        summary["sampled_accuracy"] = float(sum(correct) / (cfg.k * len(rows)))
    return table, summary


def evaluate_checkpoint(checkpoint_uri: str, cfg) -> tuple[pd.DataFrame, dict[str, float]]:
    """``evaluate`` on a training checkpoint with the eval section of a GRPOConfig.

    The policy is evaluated as the rollout engine runs it: in the config's rollout precision
    (FP8 GEMMs for precision.mode fp8 / fp8_rollout, packed int4 experts for int4_qat)."""
    from miles_lib.cycle import DTYPES, load_policy, resolve_device
    from miles_lib.data.dataset import DataConfig, PromptDataset
    from miles_lib.precision.modes import apply_rollout_precision

    model = load_policy(checkpoint_uri).to(device=resolve_device(cfg.train.device),
                                           dtype=DTYPES[cfg.train.dtype]).eval()
    model.requires_grad_(False)
    apply_rollout_precision(model, cfg.precision)
    tokenizer = Tokenizer.from_pretrained(checkpoint_uri)
    data = DataConfig(path=cfg.eval.path, input_key=cfg.data.input_key, label_key=cfg.data.label_key,
                      chat_template=cfg.data.chat_template, on_bad_row=cfg.data.on_bad_row, shuffle=False)
    dataset = PromptDataset(data)
    rows = [dataset[i] for i in range(len(dataset))]
    return evaluate(model, tokenizer, rows, cfg.eval, reward=cfg.reward,
                    max_concurrent_seqs=cfg.rollout.max_concurrent_seqs)
