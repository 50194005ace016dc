"""TrainConfig: optimizer, schedule, micro-batching, routing replay and device for the actor."""

from __future__ import annotations

import dataclasses

from miles_lib.config import ConfigBase, check

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000  # horizon of the cosine / linear schedule (optimizer steps)
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 8  # samples per forward/backward
    num_mini_batches: int = 1  # optimizer steps per rollout batch (PPO mini-batches)
    routing_replay: bool = True  # R3: replay the rollout's expert ids in every training forward
    dtype: str = "float32"  # parameter/compute dtype of the trainer
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        s = "TrainConfig"
        check(self.lr > 0, s, "lr", self.lr, "> 0")
        check(self.weight_decay >= 0, s, "weight_decay", self.weight_decay, ">= 0")
        check(0 <= self.adam_beta1 < 1, s, "adam_beta1", self.adam_beta1, "in [0, 1)")
        check(0 <= self.adam_beta2 < 1, s, "adam_beta2", self.adam_beta2, "in [0, 1)")
        check(self.adam_eps > 0, s, "adam_eps", self.adam_eps, "> 0")
        check(self.grad_clip >= 0, s, "grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        check(self.lr_schedule in LR_SCHEDULES, s, "lr_schedule", self.lr_schedule, f"one of {LR_SCHEDULES}")
        check(self.warmup_steps >= 0, s, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.total_steps > 0, s, "total_steps", self.total_steps, "> 0")
        check(0 <= self.min_lr_ratio <= 1, s, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(self.micro_batch_size > 0, s, "micro_batch_size", self.micro_batch_size, "> 0")
        check(self.num_mini_batches > 0, s, "num_mini_batches", self.num_mini_batches, "> 0")
        check(self.dtype in ("float32", "bfloat16"), s, "dtype", self.dtype, "float32 or bfloat16")
        check(self.device in ("cpu", "cuda", "auto"), s, "device", self.device, "cpu, cuda or auto")
