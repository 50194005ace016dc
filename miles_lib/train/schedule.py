"""Learning-rate multiplier lr(step) / lr_max with linear warmup.

    warmup:   m(s) = (s + 1) / warmup_steps                       for s < warmup_steps
    constant: m(s) = 1
    linear:   m(s) = r + (1 - r) * (1 - p)                         p = (s - warmup) / (total - warmup)
    cosine:   m(s) = r + (1 - r) * 0.5 * (1 + cos(pi * p))         r = min_lr_ratio, p clipped to [0, 1]
"""

from __future__ import annotations

import math

from miles_lib.train.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    p = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    r = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return r + (1 - r) * (1 - p)
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
