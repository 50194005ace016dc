"""Trainer -> rollout engine weight updates.

Two paths, chosen by what the engine holds:

* zero-copy (colocated, same module): the engine runs the trainer's own ``nn.Module``; its
  parameters *are* the trainer's storage, so an update moves no bytes — the engine only bumps its
  weight version and drops its KV cache (``engine.mark_weights_updated(version)``).
* bucketed copy (engine holds its own weights, e.g. another dtype, FP8/INT4 rollout weights, or
  another process): full tensors are streamed in buckets of at most ``bucket_bytes`` through
  ``engine.update_weights(named_tensors, version)``, so peak extra memory is one bucket, not a copy
  of the model.

Every sync increments the weight version; the version is recorded per generated token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator

import torch


@dataclasses.dataclass
class SyncResult:
    version: int
    mode: str  # "zero_copy" or "bucketed"
    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists whose total size is <= bucket_bytes (a single larger
    tensor forms its own bucket)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def shares_storage(trainer_model: torch.nn.Module, engine_model: torch.nn.Module) -> bool:
    """True iff every engine parameter is the trainer's parameter (same storage pointer)."""
    if trainer_model is engine_model:
        return True
    t = {n: p.data_ptr() for n, p in trainer_model.named_parameters()}
    e = {n: p.data_ptr() for n, p in engine_model.named_parameters()}
    return t == e


@torch.no_grad()
def sync_weights(trainer_model: torch.nn.Module, engine, version: int,
                 state: dict[str, torch.Tensor] | None = None, bucket_bytes: int = 64 << 20) -> SyncResult:
    """Push the trainer's weights to ``engine`` as ``version``.

    ``state`` is the full (unsharded) state dict when the trainer is sharded; by default the
    trainer's own state dict is used.
    """
    t0 = time.perf_counter()
    if state is None and shares_storage(trainer_model, engine.model):
        engine.mark_weights_updated(version)
        return SyncResult(version, "zero_copy", 0, 0, 0, time.perf_counter() - t0)
    named = list((state if state is not None else trainer_model.state_dict()).items())
    total = sum(t.numel() * t.element_size() for _, t in named)
    buckets = list(iter_buckets(named, bucket_bytes))
    for bucket in buckets:  # generation is paused during a sync, so no half-updated model is run
        engine.update_weights(bucket, version)
    return SyncResult(version, "bucketed", len(named), total, len(buckets), time.perf_counter() - t0)
