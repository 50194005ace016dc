"""Prompt datasets, reward functions and synthetic tasks."""

from miles_lib.data.dataset import (
    CHAT_TEMPLATES,
    BadRow,
    DataConfig,
    PromptBatcher,
    PromptDataset,
)
from miles_lib.data.rewards import (
    REWARDS,
    RewardError,
    batched_reward,
    compute_rewards,
    compute_rewards_async,
    extract_answer,
    resolve_reward,
)

__all__ = [
    "CHAT_TEMPLATES",
    "REWARDS",
    "BadRow",
    "DataConfig",
    "PromptBatcher",
    "PromptDataset",
    "RewardError",
    "batched_reward",
    "compute_rewards",
    "compute_rewards_async",
    "extract_answer",
    "resolve_reward",
]
