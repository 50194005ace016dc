"""Collate ``Sample``s into padded training tensors.

The model is fed ``tokens[:-1]`` and predicts ``tokens[1:]`` (the last token is never an input, which
is also why ``rollout_routed_experts`` has ``len(tokens) - 1`` rows: they line up with the inputs
one for one). Response token i of a sample with prompt length P sits at target position P - 1 + i.

Shape legend: S samples, L = max(len(tokens)) - 1 input positions, R = max response length,
nL MoE layers, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch

from miles_lib.types import Sample


@dataclasses.dataclass
class TrainBatch:
    input_ids_SL: torch.Tensor  # int64, right-padded with 0
    attention_mask_SL: torch.Tensor  # 1 = real input token
    targets_SL: torch.Tensor  # int64, next token at each input position
    response_mask_SL: torch.Tensor  # float, 1 where the target is a trained response token
    routed_experts_SLnK: torch.Tensor | None  # rollout routing for replay (R3), padded with 0
    rollout_logp_SL: torch.Tensor | None  # rollout log-probs scattered to target positions
    advantages_SL: torch.Tensor | None  # token advantages scattered to target positions

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask_SL.sum().item())

    def select(self, idx: slice | torch.Tensor) -> "TrainBatch":
        return TrainBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                             for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                             for f in dataclasses.fields(self)})


def collate(samples: list[Sample], advantages_SR: torch.Tensor | None = None,
            with_routing: bool = True) -> TrainBatch:
    """Pad ``samples`` into a TrainBatch. ``advantages_SR`` are per response token (row i = sample i)."""
    if not samples:
        raise ValueError("collate: no samples")
    S = len(samples)
    L = max(len(s.tokens) for s in samples) - 1
    input_ids = torch.zeros(S, L, dtype=torch.long)
    targets = torch.zeros(S, L, dtype=torch.long)
    attn = torch.zeros(S, L, dtype=torch.long)
    resp = torch.zeros(S, L)
    rollout_logp = torch.zeros(S, L) if all(s.rollout_log_probs is not None for s in samples) else None
    adv = torch.zeros(S, L) if advantages_SR is not None else None
    routing = None
    if with_routing and all(s.rollout_routed_experts is not None for s in samples):
        r0 = torch.as_tensor(samples[0].rollout_routed_experts)
        if r0.numel() > 0:
            routing = torch.zeros(S, L, *r0.shape[1:], dtype=torch.long)
    for i, s in enumerate(samples):
        toks = torch.as_tensor(s.tokens, dtype=torch.long)
        n, R = len(s.tokens) - 1, s.response_length
        P = len(s.tokens) - R
        if R < 0 or P < 1:
            raise ValueError(f"sample {s.index}: response_length={R} does not fit {len(s.tokens)} tokens")
        input_ids[i, :n], targets[i, :n], attn[i, :n] = toks[:-1], toks[1:], 1
        mask = torch.ones(R) if s.loss_mask is None else torch.as_tensor(s.loss_mask, dtype=torch.float)
        resp[i, P - 1: P - 1 + R] = mask
        if rollout_logp is not None:
            lp = torch.as_tensor(s.rollout_log_probs, dtype=torch.float)
            if lp.numel() != R:
                raise ValueError(f"sample {s.index}: {lp.numel()} rollout_log_probs for {R} response tokens")
            rollout_logp[i, P - 1: P - 1 + R] = lp
        if adv is not None:
            adv[i, P - 1: P - 1 + R] = advantages_SR[i, :R]
        if routing is not None:
            r = torch.as_tensor(s.rollout_routed_experts, dtype=torch.long)
            if r.shape[0] != n:
                raise ValueError(f"sample {s.index}: rollout_routed_experts has {r.shape[0]} rows, "
                                 f"expected len(tokens) - 1 = {n}")
            routing[i, :n] = r
    return TrainBatch(input_ids, attn, targets, resp, routing, rollout_logp, adv)


def response_values(batch_values_SL: torch.Tensor, samples: list[Sample]) -> list[torch.Tensor]:
    """Inverse of the scatter in ``collate``: per-sample [R] slices of a [S, L] tensor."""
    out = []
    for i, s in enumerate(samples):
        P = len(s.tokens) - s.response_length
        out.append(batch_values_SL[i, P - 1: P - 1 + s.response_length])
    return out
