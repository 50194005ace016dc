"""Rollout engine: batched generation with KV cache, logprobs, routing capture, partial rollout."""

from miles_lib.rollout.engine import RolloutEngine
from miles_lib.rollout.sampling import SamplingParams

__all__ = ["RolloutEngine", "SamplingParams"]
