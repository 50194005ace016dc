"""The record that flows rollout -> reward -> train.

A ``Sample`` is one response to one prompt. ``group_index`` ties the n_samples_per_prompt responses
of one prompt together (GRPO groups). Token-aligned fields:

  tokens                  prompt + response token ids (len P + R)
  response_length         R
  rollout_log_probs       [R] float: log_softmax(logits / T) at response token i (full vocabulary)
  rollout_routed_experts  [P + R - 1, num_moe_layers, top_k] int: experts chosen when token t was
                          the input (rows 0..P+R-2; the last token was never fed to the model)
  loss_mask               [R] int: 1 = token trained on
  weight_versions         [R] int: weight version that produced response token i
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch


class Status(str, enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"  # stopped on a stop token
    TRUNCATED = "truncated"  # hit max_new_tokens or the context length
    ABORTED = "aborted"  # stopped early by abort(); resumable


@dataclasses.dataclass
class Sample:
    index: int = 0
    group_index: int = 0
    prompt: str | list[int] = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    response: str = ""
    response_length: int = 0
    label: Any = None
    reward: float | None = None
    loss_mask: list[int] | None = None
    status: Status = Status.PENDING
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    rollout_log_probs: list[float] | None = None
    rollout_routed_experts: torch.Tensor | None = None
    weight_versions: list[int] = dataclasses.field(default_factory=list)

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def prompt_tokens(self) -> list[int]:
        return self.tokens[: self.prompt_length]

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[self.prompt_length:]
