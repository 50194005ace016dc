"""Token log-probabilities of a batch under a model (the trainer's side of train-inference alignment).

    logp_t = log_softmax(logits_t / T)[target_t]          (full vocabulary, DESIGN §4)

Computed exactly as the rollout engine computes ``rollout_log_probs`` so that, with the same weights
and routing, the two agree to fp32 rounding. With R3 the forward replays the rollout's expert ids.
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.kl import entropy_from_logits
from miles_lib.train.batch import TrainBatch


def token_logprobs(logits_SLV: torch.Tensor, targets_SL: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits_SLV.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, targets_SL[..., None]).squeeze(-1)


def forward_logprobs(model, batch: TrainBatch, temperature: float, replay: bool,
                     return_entropy: bool = False, return_routing: bool = False):
    """One forward over ``batch``; returns dict with 'logp' [S, L] (and 'entropy', 'routed_experts')."""
    routed = batch.routed_experts_SLnK if replay else None
    out = model(batch.input_ids_SL, attention_mask=batch.attention_mask_SL, routed_experts=routed,
                return_routing=return_routing)
    result = {"logp": token_logprobs(out.logits, batch.targets_SL, temperature)}
    if return_entropy:
        result["entropy"] = entropy_from_logits(out.logits.float() / (temperature if temperature > 0 else 1.0))
    if return_routing:
        result["routed_experts"] = out.routed_experts
        result["router_topk"] = out.router_topk
    return result


@torch.no_grad()
def batched_logprobs(model, batch: TrainBatch, temperature: float, replay: bool,
                     micro_batch_size: int, return_routing: bool = False) -> dict[str, torch.Tensor]:
    """``forward_logprobs`` over micro-batches, no grad (old / reference log-probs)."""
    parts: dict[str, list[torch.Tensor]] = {}
    S = batch.input_ids_SL.shape[0]
    for start in range(0, S, micro_batch_size):
        mb = batch.select(slice(start, start + micro_batch_size))
        res = forward_logprobs(model, mb, temperature, replay, return_routing=return_routing)
        for k, v in res.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v, 0) for k, v in parts.items()}
