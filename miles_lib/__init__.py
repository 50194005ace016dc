"""miles_lib: GRPO-family RL post-training for Mixture-of-Experts LLMs (no Flyte imports here)."""

__version__ = "0.1.0"
